"""One site's mixed-batch delta: gathered per-row factors vs rows grouped per adapter vs masked.

    python benchmarks/bench_gather.py                   # results/bench_gather.json
    python benchmarks/bench_gather.py --site embedding  # results/bench_gather_embedding.json
    python benchmarks/bench_gather.py --site conv       # results/bench_gather_conv.json

The measurement behind `lora_fx/passes/_gather.py`'s choice (issue 19): a linear site (in 256,
out 512, r 16) under a batch of 32 x 32 tokens and of 8 x 1 token (decode), 4 / 16 / 64 adapters,
each row drawing its adapter at random, 1 thread, no_grad; median ms of 30 calls after 3 warm-ups.
- base: the site alone;
- gathered: `gathered_linear` with `[slots, in, r]` / `[slots, r, out]` stacks (what lora_fx runs);
- gathered_peft_layout: the same with PEFT's `[slots, r, in]` / `[slots, out, r]` orientation;
- grouped: rows sorted per adapter, one GEMM pair and an `index_add_` per adapter (segment GEMMs);
- masked: every adapter's branch on every row, weighted by a one-hot row mask (the old layout).

`--site conv`: a Conv2d site (64 -> 64 channels, 3x3, padding 1, 16 x 16, r 16), batch 32 and 8:
- gathered: `gathered_conv`, one grouped conv over the batch (`groups=batch`) with each row's A;
- unfold: the same per-row A as im2col (`F.unfold`) + bmm;
- masked: every adapter's A and B convs on every row, weighted by the row mask.

`--site embedding`: an embedding site (8192 rows, dim 512, r 16), same batches and adapters:
- base: the lookup alone;
- gathered: `gathered_embedding` over `[slots, num, r]` / `[slots, r, dim]` stacks (lora_fx now);
- masked: every adapter's lookup in its `A^T` and GEMM with its `B^T`, weighted by the row mask
  (what embedding sites ran before they gathered).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import table, write_json

from lora_fx.math.stack import gathered_conv, gathered_embedding, gathered_linear

RESULTS = Path(__file__).parent / "results"
IN, OUT_F, RANK = 256, 512, 16
NUM, DIM = 8192, 512  # the embedding site
CHANNELS = 64  # the conv site: Conv2d 64 -> 64, 3x3, padding 1


def _ms(fn, n: int = 30) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def _variants(batch: int, m: int, n: int) -> dict:
    x, w = torch.randn(batch, m, IN), torch.randn(OUT_F, IN)
    a, b = torch.randn(n + 1, RANK, IN), torch.randn(n + 1, OUT_F, RANK)
    a_t, b_t = a.transpose(1, 2).contiguous(), b.transpose(1, 2).contiguous()
    index = torch.randint(0, n, (batch,))

    def grouped():
        y = F.linear(x, w)
        order, counts = torch.argsort(index), torch.bincount(index, minlength=n + 1).tolist()
        start = 0
        for k, c in enumerate(counts):
            if c:
                rows = order[start : start + c]
                start += c
                y.index_add_(0, rows, (x.index_select(0, rows) @ a[k].T) @ b[k].T)
        return y

    return {
        "base": lambda: F.linear(x, w),
        "gathered": lambda: gathered_linear(F.linear(x, w), x, index, a_t, b_t),
        "gathered_peft_layout": lambda: gathered_linear(
            F.linear(x, w), x, index, a.transpose(1, 2), b.transpose(1, 2)
        ),
        "grouped": grouped,
        "masked": _masked(
            lambda: F.linear(x, w),
            lambda k: F.linear(x, a[k]),
            lambda low, k: F.linear(low, b[k]),
            index,
            n,
        ),
    }


def _embedding_variants(batch: int, m: int, n: int) -> dict:
    ids, w = torch.randint(0, NUM, (batch, m)), torch.randn(NUM, DIM)
    a, b = torch.randn(n + 1, RANK, NUM), torch.randn(n + 1, DIM, RANK)  # PEFT's A, scale * B
    a_t, b_t = a.transpose(1, 2).contiguous(), b.transpose(1, 2).contiguous()
    index = torch.randint(0, n, (batch,))

    return {
        "base": lambda: F.embedding(ids, w),
        "gathered": lambda: gathered_embedding(F.embedding(ids, w), ids, index, a_t, b_t),
        "masked": _masked(
            lambda: F.embedding(ids, w),
            lambda k: F.embedding(ids, a_t[k]),
            lambda low, k: F.linear(low, b[k]),
            index,
            n,
        ),
    }


def _conv_variants(batch: int, side: int, n: int) -> dict:
    x, w = torch.randn(batch, CHANNELS, side, side), torch.randn(CHANNELS, CHANNELS, 3, 3)
    a, b = torch.randn(n + 1, RANK, CHANNELS, 3, 3), torch.randn(n + 1, CHANNELS, RANK, 1, 1)
    a_t, b_t = a.transpose(1, 2), b.transpose(1, 2)  # lora_fx's stacks (views are fine)
    index = torch.randint(0, n, (batch,))

    def unfold():  # per-row A as im2col + bmm, then B as a bmm
        cols = F.unfold(x, 3, padding=1)  # [batch, in * 9, side * side]
        low = torch.bmm(a.index_select(0, index).flatten(2), cols)  # [batch, r, positions]
        up = torch.bmm(b.index_select(0, index).flatten(2), low)
        return F.conv2d(x, w, padding=1) + up.view(batch, CHANNELS, side, side)

    base = functools.partial(F.conv2d, x, w, padding=1)
    return {
        "base": base,
        "gathered": lambda: gathered_conv(base(), x, index, a_t, b_t, [1, 1], [1, 1], [1, 1]),
        "unfold": unfold,
        "masked": _masked(
            base,
            lambda k: F.conv2d(x, a[k], padding=1),
            lambda low, k: F.conv2d(low, b[k]),
            index,
            n,
        ),
    }


def _masked(base: Callable, down: Callable, up: Callable, index: torch.Tensor, n: int) -> Callable:
    """The old layout: every adapter's branch on every row, weighted by a one-hot row mask."""

    def run():
        y = base()
        mask = F.one_hot(index, n + 1).T.float()
        for k in range(n):
            rows = mask[k].view(-1, *([1] * (y.dim() - 1)))
            y = y + up(down(k) * rows, k)
        return y

    return run


SITES = {  # site: (variants, (batch, tokens or spatial side) pairs, shape record, JSON file)
    "linear": (_variants, ((32, 32), (8, 1)), {"in": IN, "out": OUT_F}, "bench_gather.json"),
    "embedding": (
        _embedding_variants,
        ((32, 32), (8, 1)),
        {"num": NUM, "dim": DIM},
        "bench_gather_embedding.json",
    ),
    "conv": (
        _conv_variants,
        ((32, 16), (8, 16)),
        {"channels": CHANNELS, "kernel": 3},
        "bench_gather_conv.json",
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--site", choices=tuple(SITES), default="linear")
    site = parser.parse_args().site
    torch.set_num_threads(1)
    torch.manual_seed(0)
    variants, shapes, shape, name = SITES[site]
    rows, record = [], []
    with torch.no_grad():
        for batch, m in shapes:
            for n in (4, 16, 64):
                ms = {name: _ms(fn) for name, fn in variants(batch, m, n).items()}
                record.append({"batch": batch, "tokens": m, "adapters": n, "median_ms": ms})
                rows.append([f"{batch}x{m}", str(n), *(f"{v:.3f}" for v in ms.values())])
    print(table(["batch", "adapters", *record[0]["median_ms"]], rows))
    out = RESULTS / name
    write_json({"site": site, **shape, "rank": RANK, "threads": 1, "rows": record}, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
