"""Core costs of lora_fx next to HF PEFT, in one run, on a Llama-like model built from config.

    python benchmarks/bench_core.py                # full run (a few minutes on 2 CPU cores)
    python benchmarks/bench_core.py --quick        # smoke mode: 2 layers, few repeats (seconds)
    python benchmarks/bench_core.py --out x.json   # JSON path (default results/bench_core.json)

Figures, per layer count (LlamaForCausalLM, target_modules="all-linear", r=8, lora_alpha=16):
1. inject: `lora_fx.inject(gm, cfg)` vs PEFT `get_peft_model(model, cfg)`; `lora_fx.capture` is
   timed once and reported apart.
2. forward latency (eager, `torch.no_grad`, eval, fixed `ids`), as ratios to a base:
   lora_fx unmerged and merged vs the captured graph before inject; PEFT unmerged and
   `merge_adapter()`-merged vs the eager HF model; and the captured graph vs the eager model.
3. `merge_and_unload`: lora_fx vs PEFT.
4. The analytic extra FLOPs of the LoRA branches, per token: sum of 2*r*(in+out) over the sites,
   against the sites' 2*in*out and against the whole model (all linears plus attention matmuls).

Method:
1. Both sides hold the same weights: one base model, deep-copied per instance (capture shares
   Parameter objects with the model and merge writes in place). PEFT's adapter is made with random
   B (`init_lora_weights=False`) and loaded into lora_fx with `load_adapter`, so outputs can be
   checked against each other and merged == unmerged is not vacuous.
2. Timed calls run with the garbage collector off. Inject and merge_and_unload repeats alternate
   lora_fx and PEFT, each on a fresh copy; medians are reported.
3. Forward variants run in interleaved rounds, in a shuffled order per round, one call each; a ratio
   is the median over rounds of that round's ratio, shown with its 25th-75th percentile range.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    fill_defaults,
    llama,
    logits,
    median_ms,
    ratios,
    run_meta,
    shuffled_rounds,
    spread,
    table,
    timed,
    write_result,
)

import lora_fx

HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, VOCAB = 256, 512, 4, 2, 1024
# The model of this script and of those that import it: `llama(layers, seq=SEQ, **MODEL)`.
MODEL = {
    "hidden": HIDDEN,
    "intermediate": INTERMEDIATE,
    "heads": HEADS,
    "kv_heads": KV_HEADS,
    "vocab": VOCAB,
}
BATCH, SEQ = 4, 64
RANK, ALPHA = 8, 16
DEFAULT_OUT = Path(__file__).parent / "results" / "bench_core.json"

# Forward variants. Bases: "graph" (captured, before inject) for lora_fx, "hf" (eager) for PEFT.
_FORWARD = ("hf", "graph", "fx_unmerged", "fx_merged", "peft_unmerged", "peft_merged")
# (label, numerator, denominator) of the ratios reported.
_RATIOS = (
    ("graph/hf", "graph", "hf"),
    ("fx unmerged/base", "fx_unmerged", "graph"),
    ("peft unmerged/base", "peft_unmerged", "hf"),
    ("fx merged/base", "fx_merged", "graph"),
    ("peft merged/base", "peft_merged", "hf"),
)


def fx_config() -> lora_fx.LoraConfig:
    return lora_fx.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules="all-linear")


def peft_config(init_lora_weights: bool = True) -> Any:
    import peft

    return peft.LoraConfig(
        r=RANK,
        lora_alpha=ALPHA,
        target_modules="all-linear",
        init_lora_weights=init_lora_weights,
    )


def max_diff(a: Any, b: Any) -> float:
    return (logits(a) - logits(b)).abs().max().item()


def bench_inject(base: nn.Module, gm0: torch.fx.GraphModule, repeats: int) -> dict[str, Any]:
    """Median inject time, lora_fx vs PEFT, alternating, each on a fresh copy."""
    from peft import get_peft_model

    fx_s, peft_s = [], []
    for _ in range(repeats):
        gm = copy.deepcopy(gm0)
        seconds, _ = timed(lambda gm=gm: lora_fx.inject(gm, fx_config()))
        fx_s.append(seconds)
        fx_sites = lora_sites(gm)
        del gm
        model = copy.deepcopy(base)
        seconds, pm = timed(lambda model=model: get_peft_model(model, peft_config()))
        peft_s.append(seconds)
        peft_sites = len(peft_layers(pm))
        del model, pm
    return {
        "repeats": repeats,
        "fx_inject_s": statistics.median(fx_s),
        "peft_inject_s": statistics.median(peft_s),
        "fx_over_peft": statistics.median(fx_s) / statistics.median(peft_s),
        "fx_inject_all_s": fx_s,
        "peft_inject_all_s": peft_s,
        "fx_sites": fx_sites,
        "peft_sites": peft_sites,
    }


def bench_merge_and_unload(
    gm0: torch.fx.GraphModule, pm: nn.Module, adapter_dir: str, ids: torch.Tensor, repeats: int
) -> dict[str, Any]:
    """Median merge_and_unload time, lora_fx vs PEFT, alternating, each on a fresh copy."""
    fx_s, peft_s = [], []
    for i in range(repeats):
        gm = lora_fx.load_adapter(copy.deepcopy(gm0), adapter_dir)
        seconds, gm = timed(lambda gm=gm: lora_fx.merge_and_unload(gm))
        fx_s.append(seconds)
        model = copy.deepcopy(pm)
        seconds, plain = timed(lambda model=model: model.merge_and_unload())
        peft_s.append(seconds)
        if i == repeats - 1:
            with torch.no_grad():
                diff = max_diff(gm(ids), plain(ids))
        del gm, model, plain
    return {
        "repeats": repeats,
        "fx_s": statistics.median(fx_s),
        "peft_s": statistics.median(peft_s),
        "fx_over_peft": statistics.median(fx_s) / statistics.median(peft_s),
        "fx_all_s": fx_s,
        "peft_all_s": peft_s,
        "max_abs_diff_fx_vs_peft": diff,
    }


def forward_variants(
    base: nn.Module, gm0: torch.fx.GraphModule, pm: nn.Module, adapter_dir: str
) -> dict[str, Callable[[torch.Tensor], Any]]:
    """The six forward variants, each on its own weights (nothing shared with a merged one)."""
    fx_unmerged = lora_fx.load_adapter(copy.deepcopy(gm0), adapter_dir)
    fx_merged = lora_fx.merge(lora_fx.load_adapter(copy.deepcopy(gm0), adapter_dir))
    peft_merged = copy.deepcopy(pm)
    peft_merged.merge_adapter()
    variants = {
        "hf": base,
        "graph": gm0,
        "fx_unmerged": fx_unmerged,
        "fx_merged": fx_merged,
        "peft_unmerged": pm,
        "peft_merged": peft_merged,
    }
    for model in variants.values():
        model.eval()
    return variants


def check_outputs(variants: dict[str, Callable], ids: torch.Tensor) -> dict[str, float]:
    """Max |logit| gaps that must be ~0, and one that must not (so the rest mean something)."""
    with torch.no_grad():
        out = {name: fn(ids) for name, fn in variants.items()}
    return {
        "adapter_changes_output (must be >0)": max_diff(out["fx_unmerged"], out["graph"]),
        "graph_vs_hf": max_diff(out["graph"], out["hf"]),
        "fx_unmerged_vs_peft_unmerged": max_diff(out["fx_unmerged"], out["peft_unmerged"]),
        "fx_merged_vs_fx_unmerged": max_diff(out["fx_merged"], out["fx_unmerged"]),
        "peft_merged_vs_peft_unmerged": max_diff(out["peft_merged"], out["peft_unmerged"]),
    }


def bench_forward(
    variants: dict[str, Callable], ids: torch.Tensor, *, budget_s: float, min_rounds: int
) -> dict[str, Any]:
    """Interleaved rounds of one call per variant; medians of times and of per-round ratios."""
    with torch.no_grad():
        for _ in range(2):  # warm-up: allocator, first-call paths
            for fn in variants.values():
                fn(ids)
        round_s, _ = timed(lambda: [fn(ids) for fn in variants.values()])
        rounds = max(min_rounds, min(400, int(budget_s / round_s)))
        samples = shuffled_rounds(
            {name: (lambda fn=fn: fn(ids)) for name, fn in variants.items()}, rounds
        )
    return {
        "rounds": rounds,
        "median_ms": {name: median_ms(samples[name]) for name in variants},
        "ratios": ratios(samples, _RATIOS),
    }


def peft_layers(pm: nn.Module) -> list[nn.Module]:
    from peft.tuners.lora import LoraLayer

    return [m for m in pm.modules() if isinstance(m, LoraLayer)]


def lora_sites(gm: torch.fx.GraphModule) -> int:
    """Number of LoRA A matrices on the graph (one per site for one adapter)."""
    return sum(1 for name, _ in gm.named_parameters() if name.endswith(".lora_A.default.weight"))


def extra_flops(base: nn.Module, pm: nn.Module, *, seq: int = SEQ) -> dict[str, float]:
    """Per-token multiply-add FLOPs of the branches vs the adapted sites and vs the whole model."""
    branch = site = 0
    for layer in peft_layers(pm):
        r = layer.r["default"]
        branch += 2 * r * (layer.in_features + layer.out_features)
        site += 2 * layer.in_features * layer.out_features
    linears = sum(
        2 * m.in_features * m.out_features for m in base.modules() if isinstance(m, nn.Linear)
    )
    # Attention per token per layer: scores q.k over SEQ keys + weighted sum of values (full SDPA).
    attention = base.config.num_hidden_layers * 2 * 2 * seq * base.config.hidden_size
    return {
        "branch_flops_per_token": branch,
        "site_flops_per_token": site,
        "model_flops_per_token": linears + attention,
        "extra_vs_sites": branch / site,
        "extra_vs_model": branch / (linears + attention),
    }


def graph_nodes(gm: torch.fx.GraphModule) -> int:
    return len(gm.graph.nodes)


def bench_layers(layers: int, args: argparse.Namespace, *, forward: bool) -> dict[str, Any]:
    from peft import get_peft_model

    base = llama(layers, seq=SEQ, **MODEL)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    fx_model = copy.deepcopy(base)  # the captured graph shares its Parameters with this copy
    capture_s, gm0 = timed(lambda: lora_fx.capture(fx_model, (ids,), {"use_cache": False}))
    gm0.eval()
    row: dict[str, Any] = {"layers": layers, "capture_s": capture_s}
    row["inject"] = bench_inject(base, gm0, args.repeats)
    torch.manual_seed(2)
    pm = get_peft_model(copy.deepcopy(base), peft_config(init_lora_weights=False)).eval()
    row["flops"] = extra_flops(base, pm)
    with tempfile.TemporaryDirectory() as adapter_dir:
        pm.save_pretrained(adapter_dir)
        row["merge_and_unload"] = bench_merge_and_unload(gm0, pm, adapter_dir, ids, args.repeats)
        if forward:
            variants = forward_variants(base, gm0, pm, adapter_dir)
            row["graph_nodes"] = {
                "base": graph_nodes(gm0),
                "unmerged": graph_nodes(variants["fx_unmerged"]),
                "merged": graph_nodes(variants["fx_merged"]),
            }
            row["checks"] = check_outputs(variants, ids)
            row["forward"] = bench_forward(
                variants, ids, budget_s=args.forward_seconds, min_rounds=args.min_rounds
            )
    return row


def report(result: dict[str, Any]) -> str:
    meta, rows = result["meta"], result["rows"]
    out = [
        f"bench_core: lora_fx {meta['lora_fx']} vs peft {meta['peft']} | torch {meta['torch']} | "
        f"transformers {meta['transformers']} | {meta['threads']} thread(s)",
        f"LlamaForCausalLM hidden {HIDDEN}, intermediate {INTERMEDIATE}, heads {HEADS}/{KV_HEADS}, "
        f"vocab {VOCAB} | all-linear r={RANK} alpha={ALPHA} | input {BATCH}x{SEQ}",
        "",
        "inject (median of repeats; capture timed once)",
        table(
            ["layers", "sites fx/peft", "capture s", "fx inject ms", "peft inject ms", "fx/peft"],
            [
                [
                    str(r["layers"]),
                    f"{r['inject']['fx_sites']}/{r['inject']['peft_sites']}",
                    f"{r['capture_s']:.2f}",
                    f"{1e3 * r['inject']['fx_inject_s']:.1f}",
                    f"{1e3 * r['inject']['peft_inject_s']:.1f}",
                    f"{r['inject']['fx_over_peft']:.2f}",
                ]
                for r in rows
            ],
        ),
        "",
        "merge_and_unload (median of repeats)",
        table(
            ["layers", "fx ms", "peft ms", "fx/peft", "max|fx-peft| logits"],
            [
                [
                    str(r["layers"]),
                    f"{1e3 * r['merge_and_unload']['fx_s']:.1f}",
                    f"{1e3 * r['merge_and_unload']['peft_s']:.1f}",
                    f"{r['merge_and_unload']['fx_over_peft']:.2f}",
                    f"{r['merge_and_unload']['max_abs_diff_fx_vs_peft']:.1e}",
                ]
                for r in rows
            ],
        ),
    ]
    fwd = [r for r in rows if "forward" in r]
    if fwd:
        out += [
            "",
            "forward latency, median ms (eager, no_grad, eval; interleaved rounds)",
            table(
                ["layers", "rounds", *_FORWARD],
                [
                    [str(r["layers"]), str(r["forward"]["rounds"])]
                    + [f"{r['forward']['median_ms'][n]:.2f}" for n in _FORWARD]
                    for r in fwd
                ],
            ),
            "",
            "forward ratios: median of per-round ratios [p25-p75]; base: graph (fx), hf (peft)",
            table(
                ["layers"] + [label for label, _, _ in _RATIOS],
                [
                    [str(r["layers"])]
                    + [spread(r["forward"]["ratios"][label]) for label, _, _ in _RATIOS]
                    for r in fwd
                ],
            ),
            "",
            "analytic branch FLOPs per token, 2r(in+out); graph nodes; max |logit| differences",
            table(
                [
                    "layers",
                    "vs sites",
                    "vs model",
                    "nodes base/unm/mrg",
                    "max|fx-peft|",
                    "max|mrg-unm| fx",
                    "max|mrg-unm| peft",
                    "max|lora-base|",
                ],
                [
                    [
                        str(r["layers"]),
                        f"{100 * r['flops']['extra_vs_sites']:.2f}%",
                        f"{100 * r['flops']['extra_vs_model']:.2f}%",
                        "{base}/{unmerged}/{merged}".format(**r["graph_nodes"]),
                        f"{r['checks']['fx_unmerged_vs_peft_unmerged']:.1e}",
                        f"{r['checks']['fx_merged_vs_fx_unmerged']:.1e}",
                        f"{r['checks']['peft_merged_vs_peft_unmerged']:.1e}",
                        f"{r['checks']['adapter_changes_output (must be >0)']:.1e}",
                    ]
                    for r in fwd
                ],
            ),
        ]
    out += ["", f"total {result['meta']['total_s']:.0f} s"]
    return "\n".join(out)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke mode: 2 layers, few repeats")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON output path")
    parser.add_argument("--layers", type=int, nargs="+", help="layer counts (inject, unload)")
    parser.add_argument("--forward-layers", type=int, nargs="+", help="layer counts timed forward")
    parser.add_argument("--repeats", type=int, help="inject / merge_and_unload repeats")
    parser.add_argument("--forward-seconds", type=float, help="forward time budget per layer count")
    parser.add_argument("--min-rounds", type=int, help="forward rounds at least")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: steadier on a busy machine)"
    )
    args = parser.parse_args(argv)
    quick = {"layers": [2], "forward_layers": [2], "repeats": 1, "forward_seconds": 1.0,
             "min_rounds": 8}  # fmt: skip
    full = {"layers": [2, 8, 32], "forward_layers": [2, 8, 32], "repeats": 5,
            "forward_seconds": 40.0, "min_rounds": 15}  # fmt: skip
    return fill_defaults(args, quick=quick, full=full)


def main(argv: list[str] | None = None) -> dict[str, Any]:

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    # Deprecation noise from transformers (PEFT calls it) and torch pytree (deepcopy of a graph).
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*LeafSpec", category=FutureWarning)
    start = time.perf_counter()
    rows = [
        bench_layers(n, args, forward=n in args.forward_layers)
        for n in sorted(set(args.layers) | set(args.forward_layers))
    ]
    result = {
        "meta": run_meta(quick=args.quick, start=start),
        "config": {
            "model": "LlamaForCausalLM",
            "hidden_size": HIDDEN,
            "intermediate_size": INTERMEDIATE,
            "num_attention_heads": HEADS,
            "num_key_value_heads": KV_HEADS,
            "vocab_size": VOCAB,
            "batch": BATCH,
            "seq": SEQ,
            "r": RANK,
            "lora_alpha": ALPHA,
            "target_modules": "all-linear",
            "repeats": args.repeats,
            "forward_seconds": args.forward_seconds,
        },
        "rows": rows,
    }
    write_result(result, args.out, report)
    return result


if __name__ == "__main__":
    main()
