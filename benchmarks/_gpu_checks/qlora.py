"""Check 4, qlora: `lora_fx.quantize` + `load_adapter` against PEFT on bitsandbytes layers."""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
from torch import nn

import lora_fx

from .shared import (
    HF_KW,
    MIN_EFFECT,
    TINY,
    Ctx,
    all_ok,
    compare,
    effect,
    error_text,
    lm_loss,
    logits,
    peft_model,
    save_peft_adapter,
    status,
    token_ids,
)

__all__ = ["check_qlora"]

# bitsandbytes' 4-bit / int8 matmuls on both sides, on the same codes (compared bit for bit); the
# rest is float32 but PEFT's bitsandbytes LoRA layers add the branch in another order.
QLORA_TOL = (1e-4, 1e-4)
QUANT_TYPES = (("nf4", True), ("nf4", False), ("fp4", True), ("int8", False))


def check_qlora(ctx: Ctx) -> dict[str, Any]:
    try:
        import bitsandbytes
    except Exception as e:  # a missing or broken build (no CUDA library) fails at import
        return {"status": "not available", "reason": f"import bitsandbytes failed: {e!r}"}
    base, ids = TINY.model(torch.device("cpu")), token_ids(TINY, ctx.device)
    bnb_log = logging.getLogger("bitsandbytes")  # int8 logs "inputs will be cast" per call
    level, rows = bnb_log.level, []
    bnb_log.setLevel(logging.ERROR)
    try:
        for quant_type, double in QUANT_TYPES:
            name = f"{quant_type}{' double' if double else ''}"
            print(f"  qlora {name}", flush=True)
            try:
                rows.append({"case": name, **_qlora_one(ctx, base, ids, quant_type, double)})
            except Exception as e:  # one type failing must not hide the others
                rows.append({"case": name, "ok": False, "error": error_text(e)})
    finally:
        bnb_log.setLevel(level)
    return {
        "status": status(all_ok(rows)),
        "rows": rows,
        "bitsandbytes": bitsandbytes.__version__,
        "shape": vars(TINY),
    }


def _qlora_one(ctx: Ctx, base: nn.Module, ids, quant_type: str, double: bool) -> dict[str, Any]:
    from models import bnb_copy

    from lora_fx.math import quant

    reference = bnb_copy(copy.deepcopy(base).to(ctx.device), quant_type, compress_statistics=double)
    _quantize_int8_params(reference, ctx.device)
    folder = save_peft_adapter(reference, ctx.tmp / f"qlora-{quant_type}-{double}", r=4, alpha=8)
    gm = lora_fx.capture(copy.deepcopy(base).to(ctx.device), (ids,), HF_KW)
    lora_fx.quantize(gm, quant_type, compress_statistics=double)
    lora_fx.load_adapter(gm, folder).eval()
    with torch.no_grad():
        expected = logits(peft_model(reference, folder)(ids, **HF_KW))
        moved = effect(expected, logits(reference(ids, **HF_KW)))
        row = compare(logits(gm(ids)), expected, QLORA_TOL)
    ref_params = dict(reference.named_parameters())
    packed = {n: p for n, p in gm.named_parameters() if quant.is_quantized(p)}
    codes_equal = sum(torch.equal(p.data, ref_params[n].data) for n, p in packed.items())
    stored = sum(quant.storage_bytes(p) for p in packed.values())
    weights = sum(torch.Size(quant.logical_shape(p)).numel() for p in packed.values())
    before = {n: p.data.clone() for n, p in packed.items()}

    gm.train()
    trainable = lora_fx.trainable_parameters(gm)
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-3)
    loss = lm_loss(gm(ids), ids)
    loss.backward()
    params = dict(gm.named_parameters())
    with_grad = {n for n, p in params.items() if p.grad is not None}
    grads_finite = all(bool(torch.isfinite(params[n].grad).all()) for n in with_grad)
    optimizer.step()
    codes_kept = all(torch.equal(p.data, before[n]) for n, p in packed.items())
    train_ok = with_grad == set(trainable) and grads_finite and codes_kept
    row["ok"] = row["ok"] and moved > MIN_EFFECT and train_ok and bool(torch.isfinite(loss))
    return {
        **row,
        "adapter_effect": moved,
        "quantized_weights": len(packed),
        "codes_equal_reference": f"{codes_equal}/{len(packed)}",
        "bits_per_weight": 8 * stored / max(weights, 1),
        "loss": loss.item(),
        "grads_only_lora": with_grad == set(trainable),
        "codes_unchanged_by_step": codes_kept,
    }


def _quantize_int8_params(model: nn.Module, device: torch.device) -> None:
    """Quantize, in place on `device`, the Int8Params that bnb_copy left in float.

    `Int8Params.to` quantizes only when the weight leaves the CPU, so bnb_copy of a CUDA model
    keeps float int8-layer weights; moving a CPU-quantized model instead would leave the
    weights' CB / SCB statistics behind on the CPU (`Module.to` swaps `.data` only).
    """
    for param in model.parameters():
        if type(param).__name__ == "Int8Params" and param.dtype != torch.int8:
            param.data = param.data.cpu()
            param.to(device)  # bitsandbytes' own quantization, on `device`, into `param`
