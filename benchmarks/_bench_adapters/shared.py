"""What the adapter benchmarks share: sequence length, targets, PEFT configs, compile probes."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from _common import logits, timed
from torch._dynamo.utils import counters

__all__ = [
    "SEQ",
    "TARGETS",
    "gap",
    "guarded_call",
    "new_graphs",
    "peft_config",
    "recompile_cell",
    "recompiles_forbidden",
]

SEQ = 32
TARGETS = "all-linear"


def peft_config(r: int, alpha: int) -> Any:
    import peft

    return peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=TARGETS, init_lora_weights=False)


def gap(out: Any, reference: torch.Tensor) -> float:
    """Max |logit| difference between a model output (or logits) and reference logits."""
    out = out if isinstance(out, torch.Tensor) else logits(out)
    return (out - reference).abs().max().item()


def new_graphs(fn: Callable[[], Any]) -> tuple[float, int, Any]:
    """Seconds of one call, dynamo graphs it compiled, and its result."""
    before = counters["stats"]["unique_graphs"]
    seconds, result = timed(fn)
    return seconds, counters["stats"]["unique_graphs"] - before, result


@contextlib.contextmanager
def recompiles_forbidden() -> Iterator[None]:
    """`torch._dynamo.config.error_on_recompile = True` for the block."""
    torch._dynamo.config.error_on_recompile = True
    try:
        yield
    finally:
        torch._dynamo.config.error_on_recompile = False


def guarded_call(fn: Callable[[], Any]) -> tuple[float, int, Any, str | None]:
    """`new_graphs(fn)`, with a recompile error caught and returned (then run without the ban)."""
    try:
        return (*new_graphs(fn), None)
    except torch._dynamo.exc.RecompileError as e:
        torch._dynamo.config.error_on_recompile = False
        return (*new_graphs(fn), f"RecompileError: {str(e).splitlines()[0][:120]}")


def recompile_cell(row: dict[str, Any]) -> str:
    """A table cell for a row's recompile error: `-` or `RecompileError`."""
    return "-" if row["recompile_error"] is None else "RecompileError"
