"""Mixed-batch inference: each sample of one batch runs with its own adapter (or the base model).

    y' = y + sum_k mask[k, row] * branch_k(x)      mask: [n_adapters, batch] buffer on the graph

Rules:
1. Entering mixed mode puts a branch of every unmerged adapter on the graph, each scaled per row by
   its row of the mask buffer `lora_fx_batch_mask`. A new composition of the same batch size only
   writes new mask values, so a compiled graph is reused (PEFT compiles anew per composition).
2. `"__base__"` rows get no adapter. Merged adapters must be unmerged first; as in PEFT, mixed
   batches are for inference and refused in training mode.
3. Each sample's output equals running it alone with its adapter (up to float summation order).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence

import torch
import torch.fx

from lora_fx.core import graph as _graph
from lora_fx.core.state import require_state
from lora_fx.errors import AdapterError
from lora_fx.passes._rollback import transactional
from lora_fx.passes._sync import MASK_BUFFER, sync

__all__ = ["BASE", "adapter_batch", "set_adapter_batch"]

log = logging.getLogger(__name__)

BASE = "__base__"


@transactional
def set_adapter_batch(
    gm: torch.fx.GraphModule, adapter_names: Sequence[str] | None
) -> torch.fx.GraphModule:
    """Choose an adapter per batch row (`None` returns to the active adapters), in place.

    Args:
        gm: A graph with adapters, in eval mode.
        adapter_names: One name per batch row (`"__base__"` for the base model), or None.

    Returns:
        The same GraphModule.

    Raises:
        AdapterError: Unknown names (the known ones are listed), merged adapters, or training mode.

    Example:
        >>> lora_fx.set_adapter_batch(gm, ["a", "b", "__base__"])
        >>> logits = compiled(ids)   # row 0 uses a, row 1 b, row 2 the base model
    """
    state = require_state(gm)
    if adapter_names is None:
        if state.batch_adapters is not None:
            state.batch_adapters = None
            _graph.delete_attr(gm, MASK_BUFFER)
            sync(gm)
        return gm
    names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
    unknown = sorted({n for n in names if n != BASE and n not in state.adapters})
    if unknown:
        raise AdapterError(
            f"unknown adapter(s) {unknown} in the batch; adapters on this graph: "
            f"{list(state.adapters)} (or {BASE!r} for the base model)"
        )
    merged = [n for n, rec in state.adapters.items() if rec.merged]
    if merged:
        raise AdapterError(f"adapters {merged} are merged; unmerge them before a mixed batch")
    if gm.training:
        raise AdapterError("mixed-batch adapters are for inference; call gm.eval() first")
    order = list(state.adapters)
    device = next(gm.parameters()).device
    mask = torch.zeros(len(order), len(names), device=device)
    for row, name in enumerate(names):
        if name != BASE:
            mask[order.index(name), row] = 1.0
    current = getattr(gm, MASK_BUFFER, None)
    if current is not None and current.shape == mask.shape:
        current.copy_(mask)  # same tensor, new values: compiled graphs are reused
    else:
        gm.register_buffer(MASK_BUFFER, mask, persistent=False)
    if state.batch_adapters != order:
        state.batch_adapters = order
        sync(gm)
    log.debug("set_adapter_batch: %s", names)
    return gm


@contextlib.contextmanager
def adapter_batch(
    gm: torch.fx.GraphModule, adapter_names: Sequence[str]
) -> Iterator[torch.fx.GraphModule]:
    """Run the block with one adapter per batch row; the active adapters come back on exit.

    Example:
        >>> with lora_fx.adapter_batch(gm, ["a", "b", "__base__"]):
        ...     logits = gm(ids).logits
    """
    was_on = require_state(gm).batch_adapters is not None
    set_adapter_batch(gm, adapter_names)
    try:
        yield gm
    finally:
        if not was_on:
            set_adapter_batch(gm, None)
