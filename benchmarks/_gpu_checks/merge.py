"""Check 3, merge: merge / unmerge / merge_and_unload against the unmerged graph and PEFT."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from helpers import lora_roles
from torch import nn

import lora_fx

from .shared import (
    HF_KW,
    MIN_EFFECT,
    TINY,
    Ctx,
    Shape,
    all_ok,
    compare,
    dtype_name,
    effect,
    fx_graph,
    logits,
    peak_extra_bytes,
    peft_model,
    save_peft_adapter,
    status,
    token_ids,
)

__all__ = ["check_merge"]

# Merged vs unmerged and lora_fx vs PEFT merges: bfloat16 weights hold the merged value rounded
# once (lora_fx) or twice (PEFT rounds B @ A to bf16 first), a 2^-8 relative step per weight.
MERGE_TOL = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (1e-1, 5e-2)}

MERGE_FULL = Shape(hidden=1024, intermediate=2816, heads=16, kv_heads=4, vocab=1024)


def check_merge(ctx: Ctx) -> dict[str, Any]:
    shape = TINY if ctx.quick else MERGE_FULL
    base, ids = shape.model(ctx.device), token_ids(shape, ctx.device)
    folder = save_peft_adapter(base, ctx.tmp / "merge", r=16, alpha=32)
    rows, memory = [], {}
    for dtype in (torch.float32, torch.bfloat16):
        name = dtype_name(dtype)
        model = copy.deepcopy(base).to(dtype)
        with torch.no_grad():
            rows_, memory[name] = _merge_one(ctx, model, ids, folder, MERGE_TOL[dtype])
        rows += [{"case": f"{name} {row.pop('case')}", **row} for row in rows_]
    return {
        "status": status(all_ok(rows)),
        "rows": rows,
        "peak_extra_mb": memory,
        "shape": vars(shape),
        "r": 16,
    }


def _merge_one(ctx: Ctx, model: nn.Module, ids, folder: Path, tol) -> tuple[list, dict]:
    gm = fx_graph(model, ids, folder)
    pm = peft_model(model, folder)
    base = logits(model(ids, **HF_KW))
    unmerged = logits(gm(ids))
    lora = set(lora_fx.trainable_parameters(gm))
    saved = {n: p.detach().clone() for n, p in gm.named_parameters() if n not in lora}
    fx_peak = peak_extra_bytes(ctx, lambda: lora_fx.merge(gm))
    merged = logits(gm(ids))
    params = dict(gm.named_parameters())
    # W + delta rounds once and the subtraction once more: 2 ulps of the largest merged weight.
    top = max(params[n].abs().max().item() for n in saved)
    restore_tol = 2 * torch.finfo(model.dtype).eps * top
    lora_fx.unmerge(gm)
    restore = max((params[n] - w).abs().max().item() for n, w in saved.items())
    lora_fx.merge_and_unload(gm)
    fx_mau = logits(gm(ids))
    leftover = sum(lora_roles(gm).values())  # lora_fx nodes, by their meta tags
    peft_peak = peak_extra_bytes(ctx, pm.merge_adapter)
    pm.unmerge_adapter()
    peft_mau = logits(pm.merge_and_unload()(ids, **HF_KW))
    moved = effect(unmerged, base)
    rows = [
        {"case": "merged vs unmerged", **compare(merged, unmerged, tol), "adapter_effect": moved},
        {"case": "unmerge restores weights", "max_abs_diff": restore, "atol": restore_tol,
         "ok": restore <= restore_tol},
        {"case": "fx merge_and_unload vs unmerged", **compare(fx_mau, unmerged, tol),
         "lora_nodes_left": leftover},
        {"case": "fx merge_and_unload vs peft", **compare(fx_mau, peft_mau, tol)},
        {"case": "peft merge_and_unload vs unmerged (info)", **compare(peft_mau, unmerged, tol),
         "ok": None},
    ]  # fmt: skip
    rows[0]["ok"] = rows[0]["ok"] and moved > MIN_EFFECT
    rows[2]["ok"] = rows[2]["ok"] and not leftover
    mb = {
        "fx merge": None if fx_peak is None else fx_peak / 2**20,
        "peft merge_adapter": None if peft_peak is None else peft_peak / 2**20,
    }
    return rows, mb
