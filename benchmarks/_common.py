"""Pieces the benchmark scripts share: arguments, the model, the run's provenance, timing,
reports (quartiles, ratios, tables) and JSON."""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import random
import statistics
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import lora_fx


def fill_defaults(
    args: argparse.Namespace, *, quick: dict[str, Any], full: dict[str, Any]
) -> argparse.Namespace:
    """Set each argument left as None to its value in `quick` (with --quick) or `full`."""
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def llama(
    layers: int,
    *,
    hidden: int,
    intermediate: int,
    heads: int,
    kv_heads: int,
    vocab: int,
    seq: int,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> nn.Module:
    """A LlamaForCausalLM from config, weights drawn after `torch.manual_seed(seed)`, for inputs up
    to 2*seq tokens, on `device`, in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=2 * seq,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).to(device).eval()


def run_meta(
    *, quick: bool, start: float, versions: dict[str, str] | None = None
) -> dict[str, Any]:
    """Versions, machine (CPU model) and threads of this run, and its wall time since `start`.

    `versions` adds further package versions, listed after transformers'.
    """
    import peft
    import transformers

    return {
        "lora_fx": lora_fx.__version__,
        "peft": peft.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        **(versions or {}),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "quick": quick,
        "total_s": time.perf_counter() - start,
    }


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else the platform's processor string."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    names = (ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name"))
    return next(names, platform.processor())


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """Seconds one call of `fn` takes (GC off, as timeit does), and its result."""
    gc.collect()
    gc.disable()
    try:
        start = time.perf_counter()
        result = fn()
        return time.perf_counter() - start, result
    finally:
        gc.enable()


def logits(out: Any) -> torch.Tensor:
    """The logits of a transformers output or of a graph returning the same structure."""
    return out.logits if hasattr(out, "logits") else out["logits"]


def interleaved(
    variants: dict[str, Callable[[], Any]], *, seconds: float, min_rounds: int
) -> dict[str, list[float]]:
    """Per-variant call times from interleaved rounds: one call each, shuffled order, GC off.

    Two untimed warm-up rounds first; the number of rounds fills about `seconds`.
    """
    for _ in range(2):
        for fn in variants.values():
            fn()
    start = time.perf_counter()
    for fn in variants.values():
        fn()
    rounds = max(min_rounds, min(500, int(seconds / (time.perf_counter() - start))))
    return shuffled_rounds(variants, rounds)


def shuffled_rounds(variants: dict[str, Callable[[], Any]], rounds: int) -> dict[str, list[float]]:
    """Per-variant call times over `rounds` rounds of one call each, shuffled (seed 0), GC off."""
    rng = random.Random(0)
    names = list(variants)
    samples: dict[str, list[float]] = {n: [] for n in names}
    gc.collect()
    gc.disable()
    try:
        for _ in range(rounds):
            rng.shuffle(names)
            for name in names:
                start = time.perf_counter()
                variants[name]()
                samples[name].append(time.perf_counter() - start)
    finally:
        gc.enable()
    return samples


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 1]."""
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def quartiles(values: list[float]) -> dict[str, float]:
    """Median and 25th / 75th percentiles of `values`."""
    return {
        "median": statistics.median(values),
        "p25": percentile(values, 0.25),
        "p75": percentile(values, 0.75),
    }


def ratios(
    samples: dict[str, list[float]], pairs: Iterable[tuple[str, str, str]]
) -> dict[str, dict[str, float]]:
    """Quartiles of the per-round ratios numerator / denominator, for each (label, num, den).

    A pair naming a variant that has no samples (it failed to build) is left out.
    """
    out = {}
    for label, num, den in pairs:
        if num in samples and den in samples:
            out[label] = quartiles([n / d for n, d in zip(samples[num], samples[den], strict=True)])
    return out


def median_ms(values: list[float]) -> float:
    """Median of `values` (seconds), in milliseconds."""
    return 1e3 * statistics.median(values)


def spread(q: dict[str, float], places: int = 3) -> str:
    """Quartiles as `median [p25-p75]`, the median with `places` decimals."""
    return f"{q['median']:.{places}f} [{q['p25']:.2f}-{q['p75']:.2f}]"


def table(header: list[str], rows: list[list[str]]) -> str:
    """Right-aligned text table with a rule under the header."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def write_result(
    result: dict[str, Any], out: Path, report: Callable[[dict[str, Any]], str]
) -> None:
    """Print `report(result)`, write `result` to `out` as indented JSON (atomically), say where."""
    print(report(result))
    write_json(result, out)
    print(f"wrote {out}")


def write_json(
    data: dict[str, Any], out: Path, default: Callable[[Any], Any] | None = None
) -> None:
    """Write `data` to `out` as indented JSON, atomically (a temporary file, then a rename).

    `default` turns what JSON cannot hold into what it can, as in `json.dumps`.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=default) + "\n")
    tmp.replace(out)
