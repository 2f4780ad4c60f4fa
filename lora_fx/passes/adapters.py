"""Switch between the adapters on a graph, and report its parameters.

    set_adapter(gm, ["a", "b"]):  y' = y + branch_a(x) + branch_b(x)    (other adapters: no nodes)
    disable_adapters(gm):         y' = y                                  (restored on exit)
    delete_adapter(gm, "a"):      a's nodes, parameters and module copies are gone

Rules (PEFT's, unless noted):
1. Switching is a graph rewrite: an inactive adapter costs nothing at run time.
2. Active adapters train; inactive ones are frozen (`set_adapter`'s requires_grad handling).
3. Switching away from merged adapters unmerges them first, with a warning.
4. Deleting an active adapter leaves the other active ones; if none is left, the first remaining
   adapter becomes active (with a warning); deleting the last adapter leaves none. A merged adapter
   cannot be deleted.
5. `disable_adapters` unmerges merged adapters for its body and merges them back on exit (PEFT
   leaves them unmerged), even when the body raises.
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from collections.abc import Iterator

import torch
import torch.fx
from torch import nn

from lora_fx.core import graph as _graph
from lora_fx.core.keys import HOLDERS
from lora_fx.core.state import require_state, resolve_adapters, state_or_none
from lora_fx.errors import AdapterError
from lora_fx.math import quant
from lora_fx.passes._rollback import rollback_on_error, transactional
from lora_fx.passes._sync import sync
from lora_fx.passes.merge import merge, unmerge

__all__ = [
    "active_adapters",
    "count_parameters",
    "delete_adapter",
    "disable_adapters",
    "print_trainable_parameters",
    "set_adapter",
    "trainable_parameters",
]

log = logging.getLogger(__name__)


@transactional
def set_adapter(gm: torch.fx.GraphModule, adapter_names: str | list[str]) -> torch.fx.GraphModule:
    """Make `adapter_names` the active adapters (summed, in this order), in place.

    Args:
        gm: A graph with adapters.
        adapter_names: One name or a list of names.

    Returns:
        The same GraphModule, recompiled.

    Raises:
        AdapterError: An unknown name (the known ones are listed), or mixed-batch mode is on.

    Example:
        >>> lora_fx.set_adapter(gm, ["a", "b"])
    """
    state = require_state(gm)
    names = resolve_adapters(state, adapter_names)
    if state.batch_adapters is not None:
        raise AdapterError("mixed-batch mode is on; call set_adapter_batch(gm, None) first")
    merged = [n for n, rec in state.adapters.items() if rec.merged]
    if merged:
        warnings.warn(f"set_adapter: unmerging {merged} first", stacklevel=2)
        unmerge(gm, merged)
    state.active = list(dict.fromkeys(names))
    sync(gm)
    log.info("set_adapter: active %s", state.active)
    return gm


def active_adapters(gm: torch.fx.GraphModule) -> list[str]:
    """Names of the active adapters, in summation order (empty without adapters)."""
    state = state_or_none(gm)
    return list(state.active) if state else []


@contextlib.contextmanager
def disable_adapters(gm: torch.fx.GraphModule) -> Iterator[torch.fx.GraphModule]:
    """Run the base model inside the block; the previous adapters come back on exit.

    Example:
        >>> with lora_fx.disable_adapters(gm):
        ...     base_logits = gm(ids).logits
    """
    state = require_state(gm)
    if state.batch_adapters is not None:
        raise AdapterError("mixed-batch mode is on; call set_adapter_batch(gm, None) first")
    previous = list(state.active)
    merged = [n for n, rec in state.adapters.items() if rec.merged]
    with rollback_on_error(gm):
        if merged:
            warnings.warn(f"disable_adapters: unmerging {merged} for the block", stacklevel=3)
            unmerge(gm, merged)
        state.active = []
        sync(gm)
    try:
        yield gm
    finally:
        state.active = previous
        sync(gm)
        if merged:
            merge(gm, merged)


@transactional
def delete_adapter(gm: torch.fx.GraphModule, adapter_name: str) -> torch.fx.GraphModule:
    """Remove an adapter's branches, parameters and module copies, in place.

    Raises:
        AdapterError: An unknown or merged adapter, or an expert an Arrow router routes to.

    Example:
        >>> lora_fx.delete_adapter(gm, "old")
    """
    state = require_state(gm)
    resolve_adapters(state, [adapter_name])
    record = state.adapters[adapter_name]
    if record.merged:
        raise AdapterError(f"adapter {adapter_name!r} is merged; unmerge it before deleting it")
    routers = [
        name
        for name, rec in state.adapters.items()
        if any(adapter_name in (s.arrow.experts if s.arrow else ()) for s in rec.sites.values())
    ]
    if routers:
        raise AdapterError(
            f"adapter {adapter_name!r} is an expert of the Arrow router(s) {routers}; delete "
            "the router(s) first"
        )
    del state.adapters[adapter_name]  # in a mixed batch its slot is freed (no new graph)
    if adapter_name in state.active:
        state.active.remove(adapter_name)
        if not state.active and state.adapters:
            state.active = [next(iter(state.adapters))]
            warnings.warn(
                f"adapter {adapter_name!r} was active and is deleted; "
                f"adapter {state.active[0]!r} is now active",
                stacklevel=2,
            )
    sync(gm)  # no branch or reference reads the adapter's tensors any more
    _delete_parameters(gm, adapter_name, record)
    log.info("delete_adapter: %r (%d sites)", adapter_name, len(record.sites))
    return gm


def _delete_parameters(gm: torch.fx.GraphModule, adapter: str, record) -> None:
    """Drop the adapter's entries from every holder; drop holders left empty."""
    for fqn in record.sites:
        for holder in HOLDERS:
            container = getattr(gm.get_submodule(fqn), holder, None)
            if container is None:
                continue
            if adapter in container:
                del container[adapter]
            if len(container) == 0:
                _graph.delete_attr(gm, f"{fqn}.{holder}")
        _graph.delete_if_empty(gm, fqn)
    for path in record.modules_to_save:
        copies = gm.get_submodule(path).modules_to_save
        del copies[adapter]
        if len(copies) == 0:
            _graph.delete_attr(gm, f"{path}.modules_to_save")


def trainable_parameters(gm: torch.fx.GraphModule) -> dict[str, nn.Parameter]:
    """The parameters that require grad, by name (what an optimizer should get).

    Example:
        >>> optimizer = torch.optim.AdamW(lora_fx.trainable_parameters(gm).values(), lr=1e-3)
    """
    return {name: p for name, p in gm.named_parameters() if p.requires_grad}


def count_parameters(gm: torch.fx.GraphModule) -> tuple[int, int]:
    """`(trainable, all)` parameter counts; a tied parameter counts once (as in PEFT).

    A bitsandbytes 4-bit weight counts its logical `[out, in]` size, not its packed storage (PEFT
    does the same).
    """
    trainable = total = 0
    for _, param in gm.named_parameters():
        shape = quant.logical_shape(param) if quant.is_quantized(param) else param.shape
        numel = math.prod(shape)
        total += numel
        trainable += numel if param.requires_grad else 0
    return trainable, total


def print_trainable_parameters(gm: torch.fx.GraphModule) -> None:
    """Print `trainable params: N || all params: M || trainable%: P`, with PEFT's figures.

    Example:
        >>> lora_fx.print_trainable_parameters(gm)
        trainable params: 8,192 || all params: 172,736 || trainable%: 4.7425
    """
    trainable, total = count_parameters(gm)
    print(
        f"trainable params: {trainable:,d} || all params: {total:,d} || "
        f"trainable%: {100 * trainable / max(total, 1):.4f}"
    )
