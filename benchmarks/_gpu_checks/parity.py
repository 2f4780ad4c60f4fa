"""Check 1, peft_parity: `capture` + `load_adapter` logits against `PeftModel`'s, every layout."""

from __future__ import annotations

import copy
from typing import Any

import torch

import lora_fx

from .shared import (
    HF_KW,
    MIN_EFFECT,
    TINY,
    Ctx,
    all_ok,
    compare,
    dtype_name,
    effect,
    fx_graph,
    logits,
    peft_model,
    save_peft_adapter,
    status,
    token_ids,
)

__all__ = ["check_peft_parity"]

# Tolerances (atol, rtol), elementwise as torch.allclose. float32 with TF32 off: only summation
# order differs (fused addmm vs PEFT's three ops, SDPA kernels). bfloat16: one rounding of an
# activation is 2^-8 relative, and the two sides round in different places.
TOL = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (5e-2, 5e-2)}


def check_peft_parity(ctx: Ctx) -> dict[str, Any]:
    base, ids = TINY.model(ctx.device), token_ids(TINY, ctx.device)
    folder = save_peft_adapter(base, ctx.tmp / "parity")
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        model = copy.deepcopy(base).to(dtype)
        with torch.no_grad():
            expected = logits(peft_model(model, folder)(ids, **HF_KW))
            moved = effect(expected, logits(model(ids, **HF_KW)))
            gm = fx_graph(model, ids, folder)
            for layout in lora_fx.LAYOUTS:
                lora_fx.set_layout(gm, layout)
                row = compare(logits(gm(ids)), expected, TOL[dtype])
                row["ok"] = row["ok"] and moved > MIN_EFFECT
                rows.append(
                    {"case": f"{dtype_name(dtype)} {layout}", **row, "adapter_effect": moved}
                )
    return {"status": status(all_ok(rows)), "rows": rows, "shape": vars(TINY)}
