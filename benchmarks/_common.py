"""Pieces the benchmark scripts share: the run's provenance, interleaved timing, tables."""

from __future__ import annotations

import gc
import math
import os
import platform
import random
import time
from collections.abc import Callable
from typing import Any

import torch

import lora_fx


def run_meta(*, quick: bool, start: float) -> dict[str, Any]:
    """Versions, machine and threads of this run, and its wall time since `start`."""
    import peft
    import transformers

    return {
        "lora_fx": lora_fx.__version__,
        "peft": peft.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "quick": quick,
        "total_s": time.perf_counter() - start,
    }


def interleaved(
    variants: dict[str, Callable[[], Any]], *, seconds: float, min_rounds: int
) -> dict[str, list[float]]:
    """Per-variant call times from interleaved rounds: one call each, shuffled order, GC off.

    Two untimed warm-up rounds first; the number of rounds fills about `seconds`.
    """
    rng = random.Random(0)
    names = list(variants)
    for _ in range(2):
        for fn in variants.values():
            fn()
    start = time.perf_counter()
    for fn in variants.values():
        fn()
    rounds = max(min_rounds, min(500, int(seconds / (time.perf_counter() - start))))
    samples: dict[str, list[float]] = {n: [] for n in names}
    gc.collect()
    gc.disable()
    try:
        for _ in range(rounds):
            rng.shuffle(names)
            for name in names:
                t0 = time.perf_counter()
                variants[name]()
                samples[name].append(time.perf_counter() - t0)
    finally:
        gc.enable()
    return samples


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 1]."""
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def table(header: list[str], rows: list[list[str]]) -> str:
    """Right-aligned text table with a rule under the header."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)
