"""The rank-r GEMMs of a LoRA branch in both orientations: rank as rows vs rank as columns.

    python benchmarks/bench_rank_gemm.py            # writes benchmarks/results/bench_rank_gemm.json
    python benchmarks/bench_rank_gemm.py --quick    # fewer timing seconds

A branch on a linear site with `tokens` rows of `x [tokens, d]` runs, per step, products whose
output has the rank r as one of its dimensions. Each can be computed in two orientations, and
autograd's `mm` backward picks one from its inputs' memory layout:

    activations    x @ A.T   -> [tokens, r]   (PEFT: lora_A's linear)   vs  A @ x.T   -> [r, tokens]
    grad of low    g @ B     -> [tokens, r]   (PEFT: lora_B's backward) vs  B.T @ g.T -> [r, tokens]
    grad of B      g.T @ low -> [d, r]        (PEFT: lora_B's backward) vs  low.T @ g -> [r, d]

The fused layout (`lora_fx.math.fused_ops`) runs the right-hand forms. Times are medians over
interleaved rounds (1 thread, float32, the shapes of benchmarks/bench_train.py).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import interleaved, run_meta

DEFAULT_OUT = Path(__file__).parent / "results" / "bench_rank_gemm.json"
TOKENS, RANK, WIDTHS = 512, 8, (128, 256, 688)


def cases(d: int) -> dict[str, tuple]:
    """(rank-as-columns product, rank-as-rows product) per GEMM of a branch of width d."""
    gen = torch.Generator().manual_seed(d)
    x, g = torch.randn(TOKENS, d, generator=gen), torch.randn(TOKENS, d, generator=gen)
    a, b = torch.randn(RANK, d, generator=gen), torch.randn(d, RANK, generator=gen)
    low = torch.randn(TOKENS, RANK, generator=gen)
    low_t = low.t().contiguous()
    return {
        "activations": (lambda: torch.mm(x, a.t()), lambda: torch.mm(a, x.t())),
        "grad of low": (lambda: torch.mm(g, b), lambda: torch.mm(b.t(), g.t())),
        "grad of B": (lambda: torch.mm(g.t(), low), lambda: torch.mm(low_t, g)),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer timing seconds")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON output path")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    rows = []
    for d in WIDTHS:
        for gemm, (columns, rows_form) in cases(d).items():
            samples = interleaved(
                {"columns": columns, "rows": rows_form},
                seconds=0.3 if args.quick else 2.0,
                min_rounds=20,
            )
            cols_us = 1e6 * statistics.median(samples["columns"])
            rows_us = 1e6 * statistics.median(samples["rows"])
            rows.append({"d": d, "gemm": gemm, "rank_columns_us": cols_us,
                         "rank_rows_us": rows_us, "speedup": cols_us / rows_us})  # fmt: skip
    print(f"tokens {TOKENS}, r {RANK}, float32, 1 thread: median microseconds per product")
    print(f"{'d':>5}  {'gemm':<12}  {'rank as columns':>15}  {'rank as rows':>12}  {'speed-up':>8}")
    for r in rows:
        print(f"{r['d']:>5}  {r['gemm']:<12}  {r['rank_columns_us']:>15.1f}  "
              f"{r['rank_rows_us']:>12.1f}  {r['speedup']:>7.2f}x")  # fmt: skip
    result = {"meta": run_meta(quick=args.quick, start=start), "tokens": TOKENS, "r": RANK,
              "rows": rows}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(args.out)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
