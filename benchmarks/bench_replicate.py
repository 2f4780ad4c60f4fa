"""Layer replication: a replicated graph next to a model that really has that many layers.

    python benchmarks/bench_replicate.py                # full run (a few minutes on 2 CPU cores)
    python benchmarks/bench_replicate.py --quick        # smoke mode: 2 -> 4 layers (seconds)
    python benchmarks/bench_replicate.py --out x.json   # JSON path (default: results/)

Figures, per layout (LlamaForCausalLM from config; B original layers -> N after replication):
1. parameter memory: bytes of the distinct parameter storages of the graph (`data_ptr`), for the
   replicated graph and for a captured model with N real layers holding the same weights; then
   the replicated graph with an all-linear LoRA adapter (r=8), unmerged and merged (a merge gives
   each extra use of a layer a private copy of its adapted weights, so merged memory approaches the
   real model's).
2. forward latency (eager, `torch.no_grad`, eval, fixed `ids`): replicated graph vs real graph,
   both captured the same way; the ratio replicated/real should be ~1 (the same ops run).
3. `replicate_layers` time (median of repeats, each on a fresh deep copy of the captured graph).
4. max |logit| difference replicated vs real (the same function: ~0).

Method: the real model is built from the same config with N layers, layer p loading the weights of
original layer source[p]. Forward variants run in interleaved rounds, in a shuffled order per round,
one call each, with the garbage collector off; a ratio is the median over rounds of that round's
ratio, shown with its 25th-75th percentile range.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import warnings
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
    quartiles,
    run_meta,
    shuffled_rounds,
    spread,
    table,
    timed,
    write_result,
)
from bench_core import ALPHA, BATCH, HEADS, HIDDEN, INTERMEDIATE, KV_HEADS, MODEL, RANK, SEQ, VOCAB

import lora_fx

DEFAULT_OUT = Path(__file__).parent / "results" / "bench_replicate.json"
MB = 2**20

# (original layers, layer_replication)
FULL = (
    (8, [[0, 8], [0, 8]]),  # 8 -> 16: the whole stack twice
    (8, [[0, 4], [2, 6], [4, 8]]),  # 8 -> 12: overlapping windows (the PEFT docs' pattern)
    (8, [[0, 8], [0, 8], [0, 8], [0, 8]]),  # 8 -> 32
)
QUICK = ((2, [[0, 2], [0, 2]]),)


def really_deep(base: nn.Module, source: list[int]) -> nn.Module:
    """The same model with len(source) real layers, layer p a copy of base layer source[p]."""
    deep = llama(len(source), seq=SEQ, **MODEL)
    state = {}
    for key, value in base.state_dict().items():
        if not key.startswith("model.layers."):
            state[key] = value
            continue
        index, rest = key[len("model.layers.") :].split(".", 1)
        for p, s in enumerate(source):
            if s == int(index):
                state[f"model.layers.{p}.{rest}"] = value
    deep.load_state_dict(state)
    return deep


def param_bytes(module: nn.Module) -> int:
    """Bytes of the distinct parameter storages a module holds."""
    distinct = {p.data_ptr(): p.numel() * p.element_size() for p in module.parameters()}
    return sum(distinct.values())


def capture(model: nn.Module, ids: torch.Tensor) -> torch.fx.GraphModule:
    gm = lora_fx.capture(model, (ids,), {"use_cache": False})
    return gm.eval()


def bench_forward(
    variants: dict[str, Any], ids: torch.Tensor, *, budget_s: float, min_rounds: int
) -> dict[str, Any]:
    """Interleaved rounds of one call per variant; medians of times and of per-round ratios."""
    with torch.no_grad():
        for _ in range(2):  # warm-up
            for fn in variants.values():
                fn(ids)
        round_s, _ = timed(lambda: [fn(ids) for fn in variants.values()])
        rounds = max(min_rounds, min(400, int(budget_s / round_s)))
        samples = shuffled_rounds(
            {name: (lambda fn=fn: fn(ids)) for name, fn in variants.items()}, rounds
        )
    ratio = [r / d for r, d in zip(samples["replicated"], samples["real"], strict=True)]
    return {
        "rounds": rounds,
        "median_ms": {name: median_ms(s) for name, s in samples.items()},
        "ratio": quartiles(ratio),
    }


def bench_layout(layers: int, ranges: list[list[int]], args: argparse.Namespace) -> dict[str, Any]:
    source = [i for start, end in ranges for i in range(start, end)]
    base = llama(layers, seq=SEQ, **MODEL)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    gm0 = capture(base, ids)
    pass_s = []
    for _ in range(args.repeats):
        gm = copy.deepcopy(gm0)
        seconds, _ = timed(lambda gm=gm: lora_fx.replicate_layers(gm, ranges))
        pass_s.append(seconds)
    replicated = lora_fx.replicate_layers(gm0, ranges)
    real = capture(really_deep(base, source), ids)
    with torch.no_grad():
        diff = (logits(replicated(ids)) - logits(real(ids))).abs().max().item()

    # The same adapter on both: inject into the replicated graph (init random so merge matters).
    cfg = lora_fx.LoraConfig(
        r=RANK, lora_alpha=ALPHA, target_modules="all-linear", init_lora_weights=False
    )
    adapted = lora_fx.inject(copy.deepcopy(replicated), cfg)
    unmerged_bytes = param_bytes(adapted)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lora_fx.merge(adapted)
    untied = sum(1 for w in caught if "private copy" in str(w.message))
    row: dict[str, Any] = {
        "layers": layers,
        "layer_replication": ranges,
        "new_layers": len(source),
        "replicate_layers_s": statistics.median(pass_s),
        "replicate_layers_all_s": pass_s,
        "param_bytes": {
            "original": param_bytes(gm0),
            "replicated": param_bytes(replicated),
            "real": param_bytes(real),
            "replicated_lora_unmerged": unmerged_bytes,
            "replicated_lora_merged": param_bytes(adapted),
        },
        "merge_private_copies": untied,
        "graph_nodes": {"replicated": len(replicated.graph.nodes), "real": len(real.graph.nodes)},
        "max_abs_diff_replicated_vs_real": diff,
    }
    del adapted
    row["forward"] = bench_forward(
        {"replicated": replicated, "real": real},
        ids,
        budget_s=args.forward_seconds,
        min_rounds=args.min_rounds,
    )
    return row


def report(result: dict[str, Any]) -> str:
    meta, rows = result["meta"], result["rows"]

    def mb(n: int) -> str:
        return f"{n / MB:.2f}"

    out = [
        f"bench_replicate: lora_fx {meta['lora_fx']} | torch {meta['torch']} | "
        f"transformers {meta['transformers']} | {meta['threads']} thread(s)",
        f"LlamaForCausalLM hidden {HIDDEN}, intermediate {INTERMEDIATE}, heads {HEADS}/{KV_HEADS}, "
        f"vocab {VOCAB} | input {BATCH}x{SEQ} | LoRA all-linear r={RANK}",
        "",
        "parameter memory, MB of distinct storages: replicated graph vs a model with N real layers",
        table(
            [
                "layout",
                "layers",
                "replicated",
                "real",
                "repl/real",
                "+LoRA",
                "+LoRA merged",
                "private copies",
                "pass ms",
            ],
            [
                [
                    str(r["layer_replication"]).replace(" ", ""),
                    f"{r['layers']}->{r['new_layers']}",
                    mb(r["param_bytes"]["replicated"]),
                    mb(r["param_bytes"]["real"]),
                    f"{r['param_bytes']['replicated'] / r['param_bytes']['real']:.3f}",
                    mb(r["param_bytes"]["replicated_lora_unmerged"]),
                    mb(r["param_bytes"]["replicated_lora_merged"]),
                    str(r["merge_private_copies"]),
                    f"{1e3 * r['replicate_layers_s']:.1f}",
                ]
                for r in rows
            ],
        ),
        "",
        "forward latency, median ms (eager, no_grad, eval; interleaved rounds); ratio [p25-p75]",
        table(
            ["layout", "layers", "rounds", "replicated", "real", "repl/real", "max|diff|"],
            [
                [
                    str(r["layer_replication"]).replace(" ", ""),
                    f"{r['layers']}->{r['new_layers']}",
                    str(r["forward"]["rounds"]),
                    f"{r['forward']['median_ms']['replicated']:.2f}",
                    f"{r['forward']['median_ms']['real']:.2f}",
                    spread(r["forward"]["ratio"]),
                    f"{r['max_abs_diff_replicated_vs_real']:.1e}",
                ]
                for r in rows
            ],
        ),
        "",
        f"total {meta['total_s']:.0f} s",
    ]
    return "\n".join(out)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke mode: 2 -> 4 layers")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON output path")
    parser.add_argument("--repeats", type=int, help="replicate_layers repeats")
    parser.add_argument("--forward-seconds", type=float, help="forward time budget per layout")
    parser.add_argument("--min-rounds", type=int, help="forward rounds at least")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: steadier on a busy machine)"
    )
    args = parser.parse_args(argv)
    quick = {"repeats": 1, "forward_seconds": 1.0, "min_rounds": 8}
    full = {"repeats": 5, "forward_seconds": 30.0, "min_rounds": 15}
    return fill_defaults(args, quick=quick, full=full)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*LeafSpec", category=FutureWarning)
    start = time.perf_counter()
    rows = [
        bench_layout(layers, ranges, args) for layers, ranges in (QUICK if args.quick else FULL)
    ]
    result = {
        # No "peft" entry: PEFT plays no part in this benchmark.
        "meta": {k: v for k, v in run_meta(quick=args.quick, start=start).items() if k != "peft"},
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
