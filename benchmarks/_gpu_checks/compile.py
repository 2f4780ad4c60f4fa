"""Check 2, compile: `torch.compile(gm, fullgraph=True)` gradients, graphs, recompiles, dropout."""

from __future__ import annotations

import time
from typing import Any

import torch

import lora_fx

from .shared import (
    TINY,
    Ctx,
    all_ok,
    compare,
    effect,
    fresh_dynamo,
    frozen_with_grad,
    fx_graph,
    lm_loss,
    logits,
    save_peft_adapter,
    status,
    sync,
    token_ids,
)

__all__ = ["check_compile"]

# Inductor reorders float32 reductions (softmax, RMSNorm, matmul splits): tests/test_compile.py.
COMPILE_TOL = (1e-4, 1e-4)


def _lora_graph(ctx: Ctx, dropout: float) -> tuple[torch.fx.GraphModule, torch.Tensor]:
    """The tiny Llama captured with PEFT's all-linear adapter (random B, `lora_dropout`)."""
    model, ids = TINY.model(ctx.device), token_ids(TINY, ctx.device)
    folder = save_peft_adapter(model, ctx.tmp / f"compile-{dropout}", dropout=dropout)
    return fx_graph(model, ids, folder), ids


def _grads(gm, fn, ids) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss and LoRA gradients of one train-mode step of `fn` (gm or its compiled form)."""
    gm.train()
    gm.zero_grad(set_to_none=True)
    loss = lm_loss(fn(ids), ids)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in lora_fx.trainable_parameters(gm).items()}


def check_compile(ctx: Ctx) -> dict[str, Any]:
    counters = fresh_dynamo()
    gm, ids = _lora_graph(ctx, dropout=0.0)
    compiled = torch.compile(gm, fullgraph=True)
    eager_loss, eager = _grads(gm, gm, ids)
    start = time.perf_counter()
    loss, grads = _grads(gm, compiled, ids)
    sync(ctx)
    train_compile_s = time.perf_counter() - start
    rows = [{"case": "loss", **compare(loss, eager_loss, COMPILE_TOL)}]
    worst = max(grads, key=lambda n: (grads[n] - eager[n]).abs().max().item())
    row = compare(torch.cat([g.flatten() for g in grads.values()]),
                  torch.cat([eager[n].flatten() for n in grads]), COMPILE_TOL)  # fmt: skip
    rows.append({"case": f"LoRA grads ({len(grads)})", **row, "worst": worst})
    zero_grads = sorted(n for n, g in grads.items() if not g.abs().sum() > 0)
    frozen = frozen_with_grad(gm)

    gm.eval()
    with torch.no_grad():
        compiled(ids)  # the eval graph
    optimizer = torch.optim.AdamW(lora_fx.trainable_parameters(gm).values(), lr=1e-3)
    recompile_error = None
    try:
        with torch._dynamo.config.patch(error_on_recompile=True):
            for _ in range(3):
                gm.train()
                lm_loss(compiled(ids), ids).backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                gm.eval()
                with torch.no_grad():
                    compiled(ids)
    except torch._dynamo.exc.RecompileError as e:
        recompile_error = str(e).splitlines()[0]
    gm.eval()
    with torch.no_grad():
        out = logits(compiled(ids))
        rows.append({"case": "eval after 3 steps", **compare(out, logits(gm(ids)), COMPILE_TOL)})
    graphs = counters["stats"]["unique_graphs"]
    breaks = dict(counters["graph_break"])
    dropout = _compile_with_dropout(ctx)
    ok = (
        all_ok(rows)
        and not zero_grads
        and frozen == 0
        and recompile_error is None
        and graphs == 2
        and not breaks
        and dropout["ok"]
    )
    return {
        "status": status(ok),
        "rows": rows,
        "backend": "inductor",
        "train_compile_s": train_compile_s,
        "unique_graphs": graphs,
        "graph_breaks": breaks,
        "recompile_error": recompile_error,
        "lora_params_with_zero_grad": zero_grads,
        "frozen_params_with_grad": frozen,
        "dropout": dropout,
    }


def _compile_with_dropout(ctx: Ctx) -> dict[str, Any]:
    """lora_dropout=0.1: fullgraph compile in train mode, dropout live, eval equals eager."""
    counters = fresh_dynamo()
    gm, ids = _lora_graph(ctx, dropout=0.1)
    compiled = torch.compile(gm, fullgraph=True)
    gm.train()
    first, second = compiled(ids), logits(compiled(ids))
    live = effect(logits(first), second)
    lm_loss(first, ids).backward()
    grads = [p.grad for p in lora_fx.trainable_parameters(gm).values()]
    finite = all(
        g is not None and bool(torch.isfinite(g).all() and g.abs().sum() > 0) for g in grads
    )
    gm.eval()
    with torch.no_grad():
        evaluated = compare(logits(compiled(ids)), logits(gm(ids)), COMPILE_TOL)
    breaks = dict(counters["graph_break"])
    return {
        "ok": live > 0 and finite and not breaks and evaluated["ok"],
        "lora_dropout": 0.1,
        "train_outputs_differ_by": live,
        "grads_finite_nonzero": finite,
        "graph_breaks": breaks,
        "unique_graphs": counters["stats"]["unique_graphs"],
        "eval_vs_eager": evaluated,
        "frozen_params_with_grad": frozen_with_grad(gm),
    }
