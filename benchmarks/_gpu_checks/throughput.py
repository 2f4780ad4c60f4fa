"""Check 6, throughput: training steps of fx / PEFT, eager / compiled, tokens/s and memory."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import bench_train
import torch
from _common import interleaved, ratios

from .shared import (
    Ctx,
    Shape,
    error_text,
    fresh_dynamo,
    lm_loss,
    peak_extra_bytes,
    save_peft_adapter,
    status,
    sync,
    token_ids,
)

__all__ = ["check_throughput"]

# Speed ratios "a / b" (throughput of a over b) = per-round step time of b over step time of a:
# (label, b, a) for `_common.ratios`, which divides the first variant's time by the second's.
_RATIOS = (
    ("fx compiled / peft compiled", "peft compiled", "fx compiled"),
    ("fx compiled / peft eager", "peft eager", "fx compiled"),
    ("fx eager / peft eager", "peft eager", "fx eager"),
)
_TRAIN_VARIANTS = ("fx eager", "fx compiled", "peft eager", "peft compiled")

TRAIN_FULL = Shape(
    hidden=1024, intermediate=2752, layers=8, heads=16, kv_heads=4, vocab=32000, batch=8, seq=512
)
TRAIN_QUICK = Shape(batch=2, seq=32)


def _train_step(variant: bench_train.Variant, ids: torch.Tensor) -> torch.Tensor:
    """Forward, float32 cross-entropy, backward, AdamW step, zero_grad (bench_train's step)."""
    loss = lm_loss(variant.forward(ids), ids)
    loss.backward()
    variant.grad_bytes = sum(p.grad.nbytes for p in variant.trainable if p.grad is not None)
    variant.optimizer.step()
    variant.optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def check_throughput(ctx: Ctx) -> dict[str, Any]:
    shape = TRAIN_QUICK if ctx.quick else TRAIN_FULL
    fresh_dynamo()
    base = shape.model(ctx.device).to(torch.bfloat16)
    ids = token_ids(shape, ctx.device)
    folder = save_peft_adapter(base, ctx.tmp / "train", r=16, alpha=32)
    variants, first, errors = {}, {}, {}
    for name in _TRAIN_VARIANTS:  # a variant that fails is left out; the others still run
        try:
            variants[name] = bench_train.build(name, base, str(folder), ids)
            first[name] = _first_step(ctx, variants[name], ids)
            print(f"  {name}: first step {first[name]['seconds']:.1f} s", flush=True)
        except Exception as e:
            variants.pop(name, None)
            errors[name] = error_text(e)
            print(f"  {name}: {errors[name][:200]}", flush=True)
    del base

    def timed_step(v: bench_train.Variant) -> Callable[[], None]:
        return lambda: (_train_step(v, ids), sync(ctx))

    print("  timed rounds", flush=True)
    samples = interleaved(
        {n: timed_step(v) for n, v in variants.items()},
        seconds=2.0 if ctx.quick else 20.0,
        min_rounds=3 if ctx.quick else 20,
    )
    tokens = shape.batch * shape.seq
    rows = []
    for name, v in variants.items():
        median = statistics.median(samples[name])
        memory = peak_extra_bytes(ctx, lambda v=v: _train_step(v, ids))
        state = v.state()
        rows.append({
            "case": name,
            "median_step_ms": 1e3 * median,
            "tokens_per_s": tokens / median,
            "compile_s": first[name]["seconds"] - median if "compiled" in name else None,
            "graph_breaks": first[name]["graph_breaks"] if "compiled" in name else None,
            "peak_step_mb": None if memory is None else memory / 2**20,
            "first_loss": first[name]["loss"],
            "trainable_params": state["trainable_params"],
            "frozen_with_grad": state["frozen_with_grad"],
            "frozen_with_optimizer_state": state["frozen_with_optimizer_state"],
        })  # fmt: skip
    losses = [r["first_loss"] for r in rows]
    ok = (
        not any(name.startswith("fx") for name in errors)
        and all(r["frozen_with_grad"] == 0 == r["frozen_with_optimizer_state"] for r in rows)
        and first["fx compiled"]["graph_breaks"] == 0
        and all(torch.isfinite(torch.tensor(losses)))
    )
    return {
        "status": status(ok),
        "rows": rows,
        "variant_errors": errors,
        "speedups": ratios(samples, _RATIOS),
        "rounds": len(next(iter(samples.values()))),
        "first_loss_max_gap": max(losses) - min(losses),
        "precision": "bfloat16 base weights, float32 LoRA (autocast_adapter_dtype), fp32 loss",
        "shape": vars(shape),
        "r": 16,
        "lora_alpha": 32,
        "optimizer": f"AdamW(lr={bench_train.LR})",
    }


def _first_step(ctx: Ctx, variant: bench_train.Variant, ids: torch.Tensor) -> dict[str, Any]:
    """The first training step (compiles a compiled variant): seconds, loss, graph breaks."""
    before = bench_train.graph_breaks()
    sync(ctx)
    start = time.perf_counter()
    loss = _train_step(variant, ids).item()
    sync(ctx)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "loss": loss, "graph_breaks": bench_train.graph_breaks() - before}
