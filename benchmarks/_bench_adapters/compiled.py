"""2. Mixed batch under torch.compile: first call per new composition, new graphs, steady calls."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable
from typing import Any

import torch
from _common import median_ms, table, timed

import lora_fx

from .shared import gap, guarded_call, new_graphs, recompile_cell, recompiles_forbidden

__all__ = ["bench_compiled_mixed", "report_compiled_mixed"]


def bench_compiled_mixed(
    m: dict, ids: torch.Tensor, comps: list[list[str]], args: argparse.Namespace
) -> dict[str, Any]:
    """First call per new composition under torch.compile, lora_fx (recompiles banned) vs PEFT."""
    gm, pm = m["gm_mixed"], m["pm"]
    with torch.no_grad():
        reference = [
            pm(input_ids=ids, adapter_names=c, use_cache=False).logits
            for c in comps[: 1 + max(args.fx_compositions, args.peft_compositions)]
        ]
        torch._dynamo.reset()
        rows: list[dict[str, Any]] = []
        lora_fx.set_adapter_batch(gm, comps[0])
        fx = torch.compile(gm, backend=args.backend)
        for k in range(1 + args.fx_compositions):
            set_s, _ = timed(lambda k=k: lora_fx.set_adapter_batch(gm, comps[k]))
            with recompiles_forbidden() if k else contextlib.nullcontext():
                seconds, graphs, out, error = guarded_call(lambda: fx(ids))
            rows.append(_compiled_row("fx", k, set_s, seconds, graphs, error, out, reference[k]))
        peft_fn = torch.compile(pm, backend=args.backend)
        for k in range(1 + args.peft_compositions):
            seconds, graphs, out = new_graphs(
                lambda k=k: peft_fn(input_ids=ids, adapter_names=comps[k], use_cache=False)
            )
            rows.append(_compiled_row("peft", k, 0.0, seconds, graphs, None, out, reference[k]))
        steady = _steady(
            {
                "fx": lambda k: (lora_fx.set_adapter_batch(gm, comps[k]), fx(ids)),
                "peft": lambda k: peft_fn(input_ids=ids, adapter_names=comps[k], use_cache=False),
            },
            n_comps=1 + min(args.fx_compositions, args.peft_compositions),
            rounds=args.steady_rounds,
        )
    lora_fx.set_adapter_batch(gm, None)
    torch._dynamo.reset()
    return {"backend": args.backend, "calls": rows, "steady_ms": steady}


def _compiled_row(side, k, set_s, seconds, graphs, error, out, reference) -> dict[str, Any]:
    return {
        "side": side,
        "composition": k,
        "set_ms": 1e3 * set_s,
        "first_call_s": seconds,
        "new_graphs": graphs,
        "recompile_error": error,
        "max_abs_diff_vs_peft_eager": gap(out, reference),
    }


def _steady(fns: dict[str, Callable[[int], Any]], *, n_comps: int, rounds: int) -> dict:
    """Median ms per side over interleaved calls on compositions each side has compiled."""
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(rounds):
        for name, fn in fns.items():
            samples[name].append(timed(lambda fn=fn, i=i: fn(i % n_comps))[0])
    return {name: median_ms(values) for name, values in samples.items()}


def report_compiled_mixed(cm: dict[str, Any]) -> list[str]:
    return [
        f"mixed batch under torch.compile (backend {cm['backend']}; fx: new compositions with "
        "error_on_recompile=True)",
        table(
            [
                "side",
                "composition",
                "set ms",
                "first call s",
                "new graphs",
                "recompile error",
                "max|diff| vs peft eager",
            ],
            [
                [
                    r["side"],
                    str(r["composition"]) + (" (compile)" if r["composition"] == 0 else ""),
                    f"{r['set_ms']:.2f}",
                    f"{r['first_call_s']:.2f}",
                    str(r["new_graphs"]),
                    recompile_cell(r),
                    f"{r['max_abs_diff_vs_peft_eager']:.1e}",
                ]
                for r in cm["calls"]
            ],
        ),
        "steady compiled call, median ms (compositions already compiled): "
        + ", ".join(f"{k} {v:.1f}" for k, v in cm["steady_ms"].items()),
    ]
