"""3. Hot-swap: `load_adapter(hotswap=True)` vs re-capture vs PEFT's `hotswap_adapter`, eager
and under torch.compile."""

from __future__ import annotations

import argparse
import copy
from pathlib import Path
from typing import Any

import torch
from _common import median_ms, table, timed
from torch import nn

import lora_fx

from .shared import (
    SEQ,
    gap,
    guarded_call,
    new_graphs,
    peft_config,
    recompile_cell,
    recompiles_forbidden,
)

__all__ = [
    "SWAPS",
    "SWAP_BATCH",
    "SWAP_ORDER",
    "SWAP_RANK",
    "bench_hotswap_compiled",
    "bench_hotswap_eager",
    "check_hotswap",
    "report_hotswap",
    "save_swap_adapters",
]

# Hot-swap: the slot is loaded with "first", padded to SWAP_RANK, then cycles through the others.
SWAPS = {"first": (8, 16), "second": (16, 8), "third": (4, 32)}
SWAP_ORDER = ("second", "third", "first")
SWAP_RANK, SWAP_BATCH = 16, 4


def save_swap_adapters(base: nn.Module, ids: torch.Tensor, folder: Path) -> dict[str, Any]:
    """Save the hot-swap adapters with PEFT; return each one's eager PEFT logits."""
    from peft import get_peft_model

    reference = {}
    for k, (name, (r, alpha)) in enumerate(SWAPS.items()):
        torch.manual_seed(20 + k)
        pm = get_peft_model(copy.deepcopy(base), peft_config(r, alpha)).eval()
        pm.save_pretrained(folder / name)
        with torch.no_grad():
            reference[name] = pm(input_ids=ids, use_cache=False).logits
    return reference


def bench_hotswap_eager(
    base: nn.Module, fx_model: nn.Module, ids: torch.Tensor, folder: Path, repeats: int
) -> tuple[dict[str, Any], torch.fx.GraphModule, nn.Module]:
    """Median ms per swap, alternating the four ways; returns the prepared graph and PEFT model."""
    from peft import PeftModel
    from peft.utils.hotswap import hotswap_adapter, prepare_model_for_compiled_hotswap

    kw = {"use_cache": False}
    gm = lora_fx.load_adapter(lora_fx.capture(fx_model, (ids,), kw), folder / "first").eval()
    fx_prepare_s, _ = timed(lambda: lora_fx.prepare_for_hotswap(gm, SWAP_RANK))
    pm = PeftModel.from_pretrained(copy.deepcopy(base), folder / "first").eval()
    peft_prepare_s, _ = timed(lambda: prepare_model_for_compiled_hotswap(pm, target_rank=SWAP_RANK))
    s: dict[str, list[float]] = {
        k: [] for k in ("fx_hotswap", "fx_capture", "fx_load", "peft_hotswap", "peft_reload")
    }
    for i in range(repeats):
        path = folder / SWAP_ORDER[i % len(SWAP_ORDER)]
        s["fx_hotswap"].append(timed(lambda p=path: lora_fx.load_adapter(gm, p, hotswap=True))[0])
        seconds, fresh = timed(lambda: lora_fx.capture(fx_model, (ids,), kw))
        s["fx_capture"].append(seconds)
        s["fx_load"].append(timed(lambda p=path, g=fresh: lora_fx.load_adapter(g, p))[0])
        s["peft_hotswap"].append(timed(lambda p=path: hotswap_adapter(pm, str(p), "default"))[0])
        model = copy.deepcopy(base)
        seconds, fresh_pm = timed(lambda p=path, m=model: PeftModel.from_pretrained(m, p))
        s["peft_reload"].append(seconds)
        del fresh, model, fresh_pm
    recapture = [c + ld for c, ld in zip(s["fx_capture"], s["fx_load"], strict=True)]
    result = {
        "repeats": repeats,
        "fx_prepare_ms": 1e3 * fx_prepare_s,
        "peft_prepare_ms": 1e3 * peft_prepare_s,
        **{f"{k}_ms": median_ms(v) for k, v in s.items()},
        "fx_recapture_ms": median_ms(recapture),
        "last_adapter": SWAP_ORDER[(repeats - 1) % len(SWAP_ORDER)],
    }
    return result, gm, pm


def bench_hotswap_compiled(
    gm: torch.fx.GraphModule,
    pm: nn.Module,
    fx_model: nn.Module,
    ids: torch.Tensor,
    folder: Path,
    reference: dict[str, torch.Tensor],
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Swap + first call under torch.compile with recompiles banned, and re-capture + compile."""
    from peft.utils.hotswap import hotswap_adapter

    swaps = {
        "fx": lambda p: lora_fx.load_adapter(gm, p, hotswap=True),
        "peft": lambda p: hotswap_adapter(pm, str(p), "default"),
    }
    rows: list[dict[str, Any]] = []
    steady = {}
    with torch.no_grad():
        torch._dynamo.reset()
        compiled = {
            "fx": torch.compile(gm, backend=args.backend),
            "peft": torch.compile(pm, backend=args.backend),
        }
        call = {
            "fx": lambda: compiled["fx"](ids),
            "peft": lambda: compiled["peft"](input_ids=ids, use_cache=False),
        }
        for side in ("fx", "peft"):
            swaps[side](folder / "first")
            seconds, graphs, out = new_graphs(call[side])
            rows.append(
                _swap_row(
                    side, "first (compile)", 0.0, seconds, graphs, None, out, reference["first"]
                )
            )
            with recompiles_forbidden():
                for name in SWAP_ORDER:
                    swap_s, _ = timed(lambda side=side, name=name: swaps[side](folder / name))
                    seconds, graphs, out, error = guarded_call(call[side])
                    rows.append(
                        _swap_row(side, name, swap_s, seconds, graphs, error, out, reference[name])
                    )
            steady[side] = median_ms([timed(call[side])[0] for _ in range(args.steady_rounds)])
        # Swapping by re-capturing: a new GraphModule is new code, so dynamo compiles it anew.
        capture_s, fresh = timed(lambda: lora_fx.capture(fx_model, (ids,), {"use_cache": False}))
        load_s, _ = timed(lambda: lora_fx.load_adapter(fresh, folder / "second"))
        fresh.eval()
        fresh_fn = torch.compile(fresh, backend=args.backend)
        compile_s, graphs, out = new_graphs(lambda: fresh_fn(ids))
    torch._dynamo.reset()
    return {
        "backend": args.backend,
        "calls": rows,
        "steady_ms": steady,
        "recapture": {
            "capture_s": capture_s,
            "load_s": load_s,
            "compile_first_call_s": compile_s,
            "total_s": capture_s + load_s + compile_s,
            "new_graphs": graphs,
            "max_abs_diff_vs_peft_eager": gap(out, reference["second"]),
        },
    }


def _swap_row(side, name, swap_s, seconds, graphs, error, out, reference) -> dict[str, Any]:
    return {
        "side": side,
        "adapter": name,
        "swap_ms": 1e3 * swap_s,
        "first_call_ms": 1e3 * seconds,
        "new_graphs": graphs,
        "recompile_error": error,
        "max_abs_diff_vs_peft_eager": gap(out, reference),
    }


def check_hotswap(gm, pm, reference: dict[str, torch.Tensor], last: str, ids) -> dict[str, float]:
    with torch.no_grad():
        return {
            "fx_hotswapped_vs_peft_eager": gap(gm(ids), reference[last]),
            "peft_hotswapped_vs_peft_eager": gap(
                pm(input_ids=ids, use_cache=False), reference[last]
            ),
            "swapped_adapter_changes_output (must be >0)": gap(
                reference[last], reference["first" if last != "first" else "second"]
            ),
        }


def report_hotswap(hs: dict[str, Any], hc: dict[str, Any] | None) -> list[str]:
    out = [
        f"hot-swap, eager: median ms of {hs['repeats']} swaps (second r16/a8 -> third r4/a32 -> "
        f"first r8/a16 ...), batch {SWAP_BATCH} x seq {SEQ}",
        table(
            ["operation", "ms"],
            [
                ["fx load_adapter(hotswap=True), prepared slot", f"{hs['fx_hotswap_ms']:.1f}"],
                ["fx re-capture: capture + load_adapter", f"{hs['fx_recapture_ms']:.1f}"],
                ["  of which capture", f"{hs['fx_capture_ms']:.1f}"],
                ["  of which load_adapter (inject + load)", f"{hs['fx_load_ms']:.1f}"],
                ["peft hotswap_adapter, prepared", f"{hs['peft_hotswap_ms']:.1f}"],
                ["peft from_pretrained on a fresh copy", f"{hs['peft_reload_ms']:.1f}"],
                ["fx prepare_for_hotswap (once)", f"{hs['fx_prepare_ms']:.1f}"],
                ["peft prepare_model_for_compiled_hotswap (once)", f"{hs['peft_prepare_ms']:.1f}"],
            ],
        ),
        "max |logit| differences: " + "; ".join(f"{k} {v:.1e}" for k, v in hs["checks"].items()),
    ]
    if hc is not None:
        rc = hc["recapture"]
        out += [
            "",
            f"hot-swap under torch.compile (backend {hc['backend']}; swaps with "
            "error_on_recompile=True)",
            table(
                [
                    "side",
                    "adapter",
                    "swap ms",
                    "first call ms",
                    "new graphs",
                    "recompile error",
                    "max|diff| vs peft eager",
                ],
                [
                    [
                        r["side"],
                        r["adapter"],
                        f"{r['swap_ms']:.1f}",
                        f"{r['first_call_ms']:.1f}",
                        str(r["new_graphs"]),
                        recompile_cell(r),
                        f"{r['max_abs_diff_vs_peft_eager']:.1e}",
                    ]
                    for r in hc["calls"]
                ],
            ),
            "steady compiled call, median ms: "
            + ", ".join(f"{k} {v:.1f}" for k, v in hc["steady_ms"].items()),
            f"fx swap by re-capture instead: capture {rc['capture_s']:.2f} s + load_adapter "
            f"{rc['load_s']:.2f} s + compile and first call {rc['compile_first_call_s']:.2f} s "
            f"= {rc['total_s']:.2f} s ({rc['new_graphs']} new graph(s); max|diff| vs peft eager "
            f"{rc['max_abs_diff_vs_peft_eager']:.1e})",
        ]
    return out
