"""DoRA forward overhead and QLoRA training steps, lora_fx next to HF PEFT, in one run.

    python benchmarks/bench_variants.py               # full run (a few minutes on 2 CPU cores)
    python benchmarks/bench_variants.py --quick       # smoke mode: 2 layers, few rounds (seconds)
    python benchmarks/bench_variants.py --out x.json  # JSON (default results/bench_variants.json)

Model: bench_core's Llama-like LlamaForCausalLM from config (hidden 256, intermediate 512),
`target_modules="all-linear"`, r=8, lora_alpha=16, input 4x64, float32, CPU.

Figures, per layer count:
1. DoRA forward (eager, `torch.no_grad`, eval): lora_fx DoRA and plain LoRA on the captured graph
   vs the graph before inject; PEFT DoRA and plain LoRA vs the eager HF model. Ratios are medians of
   per-round ratios with their 25th-75th percentiles; "dora/lora" isolates DoRA's own cost.
2. QLoRA training step (forward, loss, backward, AdamW step on the adapter): lora_fx on
   `quantize(capture(model), "nf4")` vs PEFT on the same model with `bnb.nn.Linear4bit` layers
   (same NF4 codes, double quant, block 64), both loading one PEFT adapter. Also the bytes the
   quantized base linears occupy against float32.

Method: both sides hold the same weights (one base model, deep-copied) and the same adapter (PEFT
creates it with random B and saves it; lora_fx loads it), so outputs are checked against each
other before timing. Variants run in interleaved rounds, shuffled per round, GC off; medians.
"""

from __future__ import annotations

import argparse
import copy
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
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # models.bnb_copy
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_core

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
from bench_core import (
    ALPHA,
    BATCH,
    HIDDEN,
    INTERMEDIATE,
    MODEL,
    RANK,
    SEQ,
    VOCAB,
    max_diff,
)
from models import bnb_copy

import lora_fx
from lora_fx.math import quant

DEFAULT_OUT = Path(__file__).parent / "results" / "bench_variants.json"

_DORA_VARIANTS = ("hf", "graph", "fx_lora", "fx_dora", "peft_lora", "peft_dora")
_DORA_RATIOS = (
    ("fx dora/base", "fx_dora", "graph"),
    ("peft dora/base", "peft_dora", "hf"),
    ("fx lora/base", "fx_lora", "graph"),
    ("peft lora/base", "peft_lora", "hf"),
    ("fx dora/lora", "fx_dora", "fx_lora"),
    ("peft dora/lora", "peft_dora", "peft_lora"),
    ("fx dora/peft dora", "fx_dora", "peft_dora"),
)
_QLORA_VARIANTS = ("fx_qlora", "peft_qlora")


def peft_model(base: nn.Module, *, use_dora: bool = False) -> nn.Module:
    import peft

    cfg = peft.LoraConfig(
        r=RANK,
        lora_alpha=ALPHA,
        target_modules="all-linear",
        use_dora=use_dora,
        init_lora_weights=False,
    )
    torch.manual_seed(2)
    return peft.get_peft_model(copy.deepcopy(base), cfg)


def rounds_of(
    variants: dict[str, Callable[[], Any]], *, budget_s: float, min_rounds: int, warmup: int = 2
) -> tuple[int, dict[str, list[float]]]:
    """Interleaved, shuffled rounds of one call per variant; per-variant seconds."""
    for _ in range(warmup):
        for fn in variants.values():
            fn()
    round_s, _ = timed(lambda: [fn() for fn in variants.values()])
    rounds = max(min_rounds, min(300, int(budget_s / round_s)))
    samples = shuffled_rounds(variants, rounds)
    return rounds, samples


# ------------------------------------------------------------------------------- DoRA forward


def bench_dora(base: nn.Module, gm0: torch.fx.GraphModule, ids, args) -> dict[str, Any]:
    """Forward latency of plain LoRA and DoRA, lora_fx vs PEFT."""
    models: dict[str, Any] = {"hf": base, "graph": gm0}
    for use_dora, suffix in ((False, "lora"), (True, "dora")):
        pm = peft_model(base, use_dora=use_dora).eval()
        with tempfile.TemporaryDirectory() as folder:
            pm.save_pretrained(folder)
            models[f"fx_{suffix}"] = lora_fx.load_adapter(copy.deepcopy(gm0), folder).eval()
        models[f"peft_{suffix}"] = pm
    with torch.no_grad():
        out = {name: m(ids) for name, m in models.items()}
        checks = {
            "dora_changes_output (must be >0)": max_diff(out["fx_dora"], out["graph"]),
            "fx_dora_vs_peft_dora": max_diff(out["fx_dora"], out["peft_dora"]),
            "fx_lora_vs_peft_lora": max_diff(out["fx_lora"], out["peft_lora"]),
        }
        variants = {name: (lambda m=m: m(ids)) for name, m in models.items()}
        rounds, samples = rounds_of(
            variants, budget_s=args.forward_seconds, min_rounds=args.min_rounds
        )
    return {
        "rounds": rounds,
        "median_ms": {n: median_ms(s) for n, s in samples.items()},
        "ratios": ratios(samples, _DORA_RATIOS),
        "checks": checks,
    }


# ------------------------------------------------------------------------------- QLoRA step


def quantized_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes of the quantized linears' storage, bytes those weights take in float32)."""
    stored = dense = 0
    for param in model.parameters():
        if quant.is_quantized(param):
            stored += quant.storage_bytes(param)
            dense += 4 * torch.Size(quant.logical_shape(param)).numel()
    return stored, dense


def training_step(model: nn.Module, ids: torch.Tensor) -> Callable[[], float]:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def step() -> float:
        loss = logits(model(ids)).float().square().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.item()

    return step


def bench_qlora(base: nn.Module, ids, args) -> dict[str, Any]:
    """One QLoRA training step, lora_fx (quantize pass) vs PEFT (bnb.nn.Linear4bit model)."""
    bnb_base = bnb_copy(base, "nf4")
    pm = peft_model(bnb_base)
    with tempfile.TemporaryDirectory() as folder:
        pm.save_pretrained(folder)
        gm = lora_fx.capture(copy.deepcopy(base), (ids,), {"use_cache": False})
        lora_fx.quantize(gm, "nf4")
        lora_fx.load_adapter(gm, folder)
    pm.eval()
    with torch.no_grad():
        check = max_diff(gm(ids), pm(ids))
    gm.train()
    pm.train()
    trainable = (
        len(lora_fx.trainable_parameters(gm)),
        sum(p.requires_grad for p in pm.parameters()),
    )
    variants = {"fx_qlora": training_step(gm, ids), "peft_qlora": training_step(pm, ids)}
    rounds, samples = rounds_of(
        variants, budget_s=args.train_seconds, min_rounds=args.min_rounds, warmup=1
    )
    fx_bytes, dense = quantized_bytes(gm)
    peft_bytes, _ = quantized_bytes(pm)
    return {
        "rounds": rounds,
        "median_ms": {n: median_ms(s) for n, s in samples.items()},
        "ratios": ratios(samples, (("fx/peft", "fx_qlora", "peft_qlora"),)),
        "checks": {"fx_vs_peft_logits_before_training": check},
        "trainable_tensors": {"fx": trainable[0], "peft": trainable[1]},
        "base_linear_bytes": {"float32": dense, "fx_nf4": fx_bytes, "peft_nf4": peft_bytes},
        "bits_per_weight": {"fx": 32 * fx_bytes / dense, "peft": 32 * peft_bytes / dense},
    }


def bench_layers(layers: int, args) -> dict[str, Any]:
    base = llama(layers, seq=SEQ, **MODEL)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    gm0 = lora_fx.capture(copy.deepcopy(base), (ids,), {"use_cache": False}).eval()
    return {
        "layers": layers,
        "dora": bench_dora(base, gm0, ids, args),
        "qlora": bench_qlora(base, ids, args),
    }


# ------------------------------------------------------------------------------- report


def report(result: dict[str, Any]) -> str:
    meta, rows = result["meta"], result["rows"]
    return "\n".join(
        [
            f"bench_variants: lora_fx {meta['lora_fx']} vs peft {meta['peft']} | torch "
            f"{meta['torch']} | bitsandbytes {meta['bitsandbytes']} | {meta['threads']} thread(s)",
            f"LlamaForCausalLM hidden {HIDDEN}, intermediate {INTERMEDIATE}, vocab {VOCAB} | "
            f"all-linear r={RANK} alpha={ALPHA} | input {BATCH}x{SEQ} | float32 CPU",
            "",
            "DoRA forward latency, median ms (eager, no_grad, eval; interleaved rounds)",
            table(
                ["layers", "rounds", *_DORA_VARIANTS],
                [
                    [str(r["layers"]), str(r["dora"]["rounds"])]
                    + [f"{r['dora']['median_ms'][n]:.2f}" for n in _DORA_VARIANTS]
                    for r in rows
                ],
            ),
            "",
            "DoRA forward ratios: median of per-round ratios [p25-p75]; "
            "base: graph (fx), hf (peft)",
            table(
                ["layers"] + [label for label, _, _ in _DORA_RATIOS],
                [
                    [str(r["layers"])]
                    + [spread(r["dora"]["ratios"][label]) for label, _, _ in _DORA_RATIOS]
                    for r in rows
                ],
            ),
            "",
            "QLoRA training step (forward + backward + AdamW), NF4 double-quant base, median ms",
            table(
                [
                    "layers",
                    "rounds",
                    "fx ms",
                    "peft ms",
                    "fx/peft [p25-p75]",
                    "base linears fp32 -> nf4 (fx | peft)",
                    "bits/weight",
                ],
                [
                    [
                        str(r["layers"]),
                        str(r["qlora"]["rounds"]),
                        f"{r['qlora']['median_ms']['fx_qlora']:.1f}",
                        f"{r['qlora']['median_ms']['peft_qlora']:.1f}",
                        spread(r["qlora"]["ratios"]["fx/peft"]),
                        "{float32:,d} -> {fx_nf4:,d} | {peft_nf4:,d} B".format(
                            **r["qlora"]["base_linear_bytes"]
                        ),
                        f"{r['qlora']['bits_per_weight']['fx']:.2f}",
                    ]
                    for r in rows
                ],
            ),
            "",
            "checks: max |logit| differences (fx vs PEFT must be ~0; DoRA vs base must not)",
            table(
                ["layers", "dora vs base", "fx-peft dora", "fx-peft lora", "fx-peft qlora"],
                [
                    [
                        str(r["layers"]),
                        f"{r['dora']['checks']['dora_changes_output (must be >0)']:.1e}",
                        f"{r['dora']['checks']['fx_dora_vs_peft_dora']:.1e}",
                        f"{r['dora']['checks']['fx_lora_vs_peft_lora']:.1e}",
                        f"{r['qlora']['checks']['fx_vs_peft_logits_before_training']:.1e}",
                    ]
                    for r in rows
                ],
            ),
            "",
            f"total {meta['total_s']:.0f} s",
        ]
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke mode: 2 layers, few rounds")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON output path")
    parser.add_argument("--layers", type=int, nargs="+", help="layer counts")
    parser.add_argument("--forward-seconds", type=float, help="DoRA forward budget per layer count")
    parser.add_argument("--train-seconds", type=float, help="QLoRA step budget per layer count")
    parser.add_argument("--min-rounds", type=int, help="rounds at least")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: steadier on a busy machine)"
    )
    args = parser.parse_args(argv)
    quick = {"layers": [2], "forward_seconds": 1.0, "train_seconds": 1.0, "min_rounds": 5}
    full = {"layers": [2, 8], "forward_seconds": 30.0, "train_seconds": 40.0, "min_rounds": 15}
    return fill_defaults(args, quick=quick, full=full)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import bitsandbytes

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*LeafSpec", category=FutureWarning)
    start = time.perf_counter()
    rows = [bench_layers(n, args) for n in args.layers]
    result = {
        "meta": run_meta(
            quick=args.quick, start=start, versions={"bitsandbytes": bitsandbytes.__version__}
        ),
        "config": {
            "model": "LlamaForCausalLM",
            "hidden_size": HIDDEN,
            "intermediate_size": INTERMEDIATE,
            "vocab_size": VOCAB,
            "batch": BATCH,
            "seq": SEQ,
            "r": RANK,
            "lora_alpha": ALPHA,
            "target_modules": "all-linear",
            "quant_type": "nf4 (double quant, block 64)",
            "forward_seconds": args.forward_seconds,
            "train_seconds": args.train_seconds,
        },
        "rows": rows,
    }
    write_result(result, args.out, report)
    return result


if __name__ == "__main__":
    main()
