"""Many adapters on one graph, next to HF PEFT, in one run: mixed batches and hot-swap (issue 3).

    python benchmarks/bench_adapters.py               # full run (~5 min on 2 busy CPU cores)
    python benchmarks/bench_adapters.py --quick       # smoke: 1 layer, few repeats (~2 min)
    python benchmarks/bench_adapters.py --out x.json  # default results/bench_adapters.json
    python benchmarks/bench_adapters.py --backend inductor   # compile figures with inductor
    python benchmarks/bench_adapters.py --no-compile  # eager figures only

Model: LlamaForCausalLM from config (hidden 256, intermediate 512, heads 4/2, vocab 1024, 4 layers),
target_modules="all-linear". Adapters cat, dog, fox: r=8, lora_alpha=16; owl: r=16, lora_alpha=16
(names that are no substring of PEFT's "lora_" prefix, which PEFT warns about).

Figures:
1. Mixed batch, eager (no_grad, eval): 4 adapters x 8 samples, a batch of 32 x seq 32. The row order
   of the composition changes every round (a shuffled 8/8/8/8 split), as a server's would.
   - fx_mixed: `set_adapter_batch(gm, names)` (same batch size: only the index buffer is written)
     and one forward of 32 rows. Each row gathers its own adapter from per-site stacks padded to
     the site's largest rank (branch FLOPs printed beside the table).
   - fx_seq: per adapter, `set_adapter(gm, name)` (a graph rewrite and recompile) and a forward of
     its 8 rows. `capture` specialises the batch size, so this graph is captured with
     `dynamic_shapes={"input_ids": {0: Dim("batch")}, "use_cache": None}` (export wants every
     argument named, the bound `use_cache` included): one graph runs sub-batches of any size, so
     an uneven split works too.
   - fx_seq_graphs: the compute of fx_seq without switching: four graphs captured at batch 8, each
     with one adapter active, each running its 8 rows.
   - peft_mixed: PEFT's `model(input_ids, adapter_names=names)` on the 32 rows.
   - peft_seq: per adapter, `model.set_adapter(name)` (a flag) and a forward of its 8 rows.
   - hf_base / fx_base: the model without adapters on the 32 rows (eager HF / captured graph).
   Switch costs are timed apart: lora_fx `set_adapter`, a new composition, entering and leaving
   mixed mode; PEFT `set_adapter`.
2. Mixed batch under `torch.compile` (`--backend`, default aot_eager; inductor takes minutes per
   compile on 2 cores): the time of the first call on each new composition and the number of new
   dynamo graphs (`counters["stats"]["unique_graphs"]`). lora_fx runs new compositions with
   `torch._dynamo.config.error_on_recompile = True`; PEFT recompiles per composition (its
   `adapter_names` list is guarded as a constant), so it gets fewer of them (`--peft-compositions`).
3. Hot-swap: `load_adapter(gm, dir, hotswap=True)` into a slot prepared with
   `prepare_for_hotswap(gm, 16)` vs re-capturing (`capture` + `load_adapter`) vs PEFT's
   `hotswap_adapter` (after `prepare_model_for_compiled_hotswap(target_rank=16)`) vs PEFT's
   `PeftModel.from_pretrained` on a fresh copy (copy untimed). The adapters cycle through
   second (r=16, alpha 8), third (r=4, alpha 32) and first (r=8, alpha 16), so every swap changes
   rank and scale. Then under `torch.compile` with recompiles forbidden: swap time and first call
   after each swap, for both, and the cost of re-capturing and compiling anew instead.

Method:
1. One base model; PEFT copies it (`get_peft_model` injects in place) and lora_fx captures one other
   copy (graphs share its Parameters). PEFT adapters have random B (`init_lora_weights=False`) and
   are loaded into lora_fx with `load_adapter`, so every output is checked against PEFT's.
2. Eager variants run in interleaved rounds, in a shuffled order per round, one call each, with the
   garbage collector off; a ratio is the median over rounds of that round's ratio, with its
   25th-75th percentile range. Other timings are medians of repeats that alternate the sides.

Figures 1-3 are measured and reported by `benchmarks/_bench_adapters/` (mixed.py, compiled.py,
hotswap.py) and figure 4, many adapters in one batch (issue 19: 4 / 16 / 64 adapters, lora_fx
vs PEFT vs the base, eager and compiled, load and switch times, memory), by counts.py; this
script runs them and writes the record.

    python benchmarks/bench_adapters.py --only-counts --counts 4,16   # figure 4 only, shorter
"""

from __future__ import annotations

import argparse
import copy
import gc
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from _bench_adapters.compiled import bench_compiled_mixed, report_compiled_mixed
from _bench_adapters.counts import bench_counts, report_counts
from _bench_adapters.hotswap import (
    SWAP_BATCH,
    SWAP_RANK,
    SWAPS,
    bench_hotswap_compiled,
    bench_hotswap_eager,
    check_hotswap,
    report_hotswap,
    save_swap_adapters,
)
from _bench_adapters.mixed import (
    ADAPTERS,
    BATCH,
    PER_ADAPTER,
    bench_eager,
    bench_switch,
    branch_flops,
    build_mixed,
    check_mixed,
    compositions,
    mixed_variants,
    report_mixed,
)
from _bench_adapters.shared import SEQ, TARGETS
from _common import fill_defaults, llama, run_meta, write_result
from bench_core import HEADS, HIDDEN, INTERMEDIATE, KV_HEADS, MODEL, VOCAB

import lora_fx

DEFAULT_OUT = Path(__file__).parent / "results" / "bench_adapters.json"


def run(args: argparse.Namespace) -> dict[str, Any]:
    base = llama(args.layers, seq=SEQ, **MODEL)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    swap_ids = ids[:SWAP_BATCH].clone()
    fx_model = copy.deepcopy(base)  # every captured graph shares this copy's Parameters
    comps = compositions(args.compositions)
    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if args.counts:
            result["counts"] = bench_counts(base, fx_model, ids, folder / "counts", args)
        if args.only_counts:
            return result
        m = build_mixed(base, fx_model, ids, folder / "mixed")
        variants = mixed_variants(base, m)
        result["mixed"] = {
            "capture_s": m["capture_s"],
            "load_adapter_ms": m["load_adapter_ms"],
            "flops": branch_flops(m["pm"]),
            "checks": check_mixed(variants, ids, comps[1]),
            "eager": bench_eager(
                variants, ids, comps, budget_s=args.forward_seconds, min_rounds=args.min_rounds
            ),
            "switch": bench_switch(m, comps, args.switch_repeats),
        }
        lora_fx.set_adapter_batch(m["gm_mixed"], None)
        if args.compile:
            result["compiled_mixed"] = bench_compiled_mixed(m, ids, comps, args)
        del m, variants
        gc.collect()
        reference = save_swap_adapters(base, swap_ids, folder / "swap")
        eager, gm, pm = bench_hotswap_eager(
            base, fx_model, swap_ids, folder / "swap", args.swap_repeats
        )
        eager["checks"] = check_hotswap(gm, pm, reference, eager["last_adapter"], swap_ids)
        result["hotswap"] = eager
        if args.compile:
            result["hotswap_compiled"] = bench_hotswap_compiled(
                gm, pm, fx_model, swap_ids, folder / "swap", reference, args
            )
    return result


def report(result: dict[str, Any]) -> str:
    meta, cfg = result["meta"], result["config"]
    adapters = ", ".join(f"{n} r={r} alpha={a}" for n, (r, a) in ADAPTERS.items())
    out = [
        f"bench_adapters: lora_fx {meta['lora_fx']} vs peft {meta['peft']} | torch "
        f"{meta['torch']} | transformers {meta['transformers']} | {meta['threads']} thread(s)",
        f"LlamaForCausalLM {cfg['layers']} layers, hidden {HIDDEN}, intermediate {INTERMEDIATE}, "
        f"heads {HEADS}/{KV_HEADS}, vocab {VOCAB} | {TARGETS} | {adapters}",
    ]
    if "mixed" in result:
        out += ["", *report_mixed(result["mixed"])]
    if "compiled_mixed" in result:
        out += ["", *report_compiled_mixed(result["compiled_mixed"])]
    if "hotswap" in result:
        out += ["", *report_hotswap(result["hotswap"], result.get("hotswap_compiled"))]
    if "counts" in result:
        out += ["", *report_counts(result["counts"])]
    out += ["", f"total {meta['total_s']:.0f} s"]
    return "\n".join(out)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke mode: 1 layer, few repeats")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON output path")
    parser.add_argument("--layers", type=int, help="decoder layers (default 4; quick 1)")
    parser.add_argument("--forward-seconds", type=float, help="eager mixed-batch time budget")
    parser.add_argument("--min-rounds", type=int, help="eager mixed-batch rounds at least")
    parser.add_argument("--compositions", type=int, help="row orders the rounds rotate through")
    parser.add_argument("--switch-repeats", type=int, help="repeats of each switch")
    parser.add_argument("--swap-repeats", type=int, help="eager hot-swap repeats")
    parser.add_argument("--fx-compositions", type=int, help="new compositions, lora_fx compiled")
    parser.add_argument("--peft-compositions", type=int, help="new compositions, PEFT compiled")
    parser.add_argument("--steady-rounds", type=int, help="calls timed on each compiled model")
    parser.add_argument("--backend", default="aot_eager", help="torch.compile backend")
    parser.add_argument(
        "--counts",
        type=lambda text: [int(c) for c in text.split(",") if c],
        help="adapter counts of figure 4, e.g. 4,16 (default 4,16,64; quick 4,16; empty: skip)",
    )
    parser.add_argument("--only-counts", action="store_true", help="run figure 4 only")
    parser.add_argument(
        "--no-compile", dest="compile", action="store_false", help="skip the torch.compile figures"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: steadier on a busy machine)"
    )
    args = parser.parse_args(argv)
    quick = {
        "layers": 1,
        "forward_seconds": 2.0,
        "min_rounds": 4,
        "compositions": 4,
        "switch_repeats": 4,
        "swap_repeats": 3,
        "fx_compositions": 2,
        "peft_compositions": 1,
        "steady_rounds": 3,
        "counts": [4, 16],
    }
    full = {
        "layers": 4,
        "forward_seconds": 45.0,
        "min_rounds": 15,
        "compositions": 8,
        "switch_repeats": 12,
        "swap_repeats": 6,
        "fx_compositions": 3,
        "peft_compositions": 1,
        "steady_rounds": 10,
        "counts": [4, 16, 64],
    }
    return fill_defaults(args, quick=quick, full=full)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    # Deprecation noise from transformers (PEFT calls it) and torch pytree (deepcopy of a graph).
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*LeafSpec", category=FutureWarning)
    start = time.perf_counter()
    result = run(args)
    result = {
        "meta": run_meta(quick=args.quick, start=start),
        "config": {
            "model": "LlamaForCausalLM",
            "layers": args.layers,
            "hidden_size": HIDDEN,
            "intermediate_size": INTERMEDIATE,
            "num_attention_heads": HEADS,
            "num_key_value_heads": KV_HEADS,
            "vocab_size": VOCAB,
            "target_modules": TARGETS,
            "adapters": {n: {"r": r, "lora_alpha": a} for n, (r, a) in ADAPTERS.items()},
            "batch": BATCH,
            "rows_per_adapter": PER_ADAPTER,
            "seq": SEQ,
            "swap_adapters": {n: {"r": r, "lora_alpha": a} for n, (r, a) in SWAPS.items()},
            "swap_rank": SWAP_RANK,
            "swap_batch": SWAP_BATCH,
            **{k: v for k, v in vars(args).items() if k not in ("out", "quick", "threads")},
        },
        **result,
    }
    write_result(result, args.out, report)
    return result


if __name__ == "__main__":
    main()
