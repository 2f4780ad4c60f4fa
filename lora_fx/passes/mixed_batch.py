"""Mixed batches: each row of one batch runs with its own adapter (or the base model).

    y' = y + x[i] @ A_t[slot(i)] @ B_t[slot(i)]  per row i    stacks: [capacity + 1, ...] per site
    lora_fx_adapter_index [batch] (long): the slot of each row; "__base__" rows the zero slot

Rules:
1. Adapters live in slots of per-site stacks (`_gather.py`): the slot table is
   `state.batch_adapters`, its length the capacity (at least the unmerged adapters on the graph
   when the batch is first set, or `capacity`). A row pays for one adapter whatever the number
   of slots.
2. A batch naming an adapter that holds no slot puts it into a free slot, else into one no row of
   this batch uses (its values are overwritten; the adapter stays loaded), else the stacks grow
   (a new graph). Every other new composition writes the index buffer only: a compiled graph
   is reused. `load_adapter` / `delete_adapter` while a batch is set fill / free slots by value.
3. Stacks are padded to each site's largest rank on the graph, or `rank` if larger: an adapter
   loaded later with a larger rank on a site rebuilds the graph; reserve room with `rank=`.
4. Training: set the batch in training mode and each site stacks the slots' own parameters in the
   graph, so each adapter gets the gradient it would get trained alone on its rows (PEFT's mixed
   batch is inference only). Switching `gm.train()` / `gm.eval()` needs a new `set_adapter_batch`.
5. Merged adapters must be unmerged first. Each row's output equals running it alone with its
   adapter (up to float summation order).
6. aLoRA adapters take rows like any other (PEFT's `adapter_names=` with aLoRA): a new
   composition resets the batch's offsets buffer (`_gather.py` rule 6), so an aLoRA row is
   unadapted until `set_alora_offsets(gm, input_ids)` computes its offsets from its own adapter's
   invocation tokens; call it after `set_adapter_batch`.
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from collections.abc import Iterator, Sequence

import torch
import torch.fx

from lora_fx.core import graph as _graph
from lora_fx.core.state import LoraState, require_state
from lora_fx.errors import AdapterError
from lora_fx.passes._gather import (
    ALORA_BUFFER,
    INDEX_BUFFER,
    STACKS,
    layout_key,
    site_ranks,
    write_batch_offsets,
    write_slots,
)
from lora_fx.passes._rollback import transactional
from lora_fx.passes._sync import sync
from lora_fx.sites import all_sites

__all__ = ["BASE", "adapter_batch", "set_adapter_batch"]

log = logging.getLogger(__name__)

BASE = "__base__"


def set_adapter_batch(
    gm: torch.fx.GraphModule,
    adapter_names: Sequence[str] | None,
    *,
    capacity: int | None = None,
    rank: int | None = None,
    refresh: bool = False,
) -> torch.fx.GraphModule:
    """Choose an adapter per batch row (`None` returns to the active adapters), in place.

    Args:
        gm: A graph with adapters (eval mode for serving; training mode to train through it).
        adapter_names: One name per batch row (`"__base__"` for the base model), or None.
        capacity: Slots to keep (at least the number of unmerged adapters on the graph): room
            to load more adapters later without a new graph.
        rank: Pad every site's stacks to at least this rank (room for larger adapters).
        refresh: Rewrite every slot from its adapter's tensors (after editing them by hand).

    Returns:
        The same GraphModule.

    Raises:
        AdapterError: Unknown names (the known ones are listed), merged adapters, or a bad
            capacity or rank.

    Example:
        >>> lora_fx.set_adapter_batch(gm, ["a", "b", "__base__"], capacity=16)
        >>> logits = compiled(ids)   # row 0 uses a, row 1 b, row 2 the base model
        >>> lora_fx.set_adapter_batch(gm, ["b", "b", "a"])   # new values only: no recompile
    """
    state = require_state(gm)
    if adapter_names is not None and _index_only(gm, state, adapter_names, capacity, rank, refresh):
        return gm  # every adapter of the batch holds a slot: write the row index, nothing else
    return _set_adapter_batch(gm, adapter_names, capacity=capacity, rank=rank, refresh=refresh)


def _index_only(
    gm: torch.fx.GraphModule,
    state: LoraState,
    adapter_names: Sequence[str],
    capacity: int | None,
    rank: int | None,
    refresh: bool,
) -> bool:
    """Rule 2's fast path: the batch's adapters all hold slots and nothing else changes.

    Then only the index buffer is written (no snapshot, no site matching): a new composition
    costs microseconds whatever the number of adapters.
    """
    slots = state.batch_adapters
    if (
        slots is None
        or state.batch_key is None
        or refresh
        or state.batch_training != gm.training
        or (capacity is not None and capacity > len(slots))
        or (rank is not None and rank > (state.batch_rank or 0))
    ):
        return False
    names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
    held = set(slots)
    if not all(n == BASE or n in held for n in names):
        return False
    _write_index(gm, state, names)
    return True


@transactional
def _set_adapter_batch(
    gm: torch.fx.GraphModule,
    adapter_names: Sequence[str] | None,
    *,
    capacity: int | None,
    rank: int | None,
    refresh: bool,
) -> torch.fx.GraphModule:
    """`set_adapter_batch` when slots, stacks or the graph may change (snapshot and rollback)."""
    state = require_state(gm)
    if adapter_names is None:
        if state.batch_adapters is not None:
            state.batch_adapters, state.batch_key, state.batch_rank = None, None, None
            state.batch_training = False
            _graph.delete_attr(gm, INDEX_BUFFER)
            _graph.delete_attr(gm, ALORA_BUFFER)
            _graph.delete_attr(gm, STACKS)
            sync(gm)
        return gm
    names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
    _check(state, names, capacity, rank)
    fresh = state.batch_adapters is None or state.batch_training != gm.training
    if fresh:
        unmerged = list(state.adapters)
        state.batch_adapters = unmerged + [None] * max(0, (capacity or 0) - len(unmerged))
        state.batch_training, state.batch_key = gm.training, None
    elif capacity is not None and capacity > len(state.batch_adapters):
        state.batch_adapters += [None] * (capacity - len(state.batch_adapters))
    if rank is not None:
        state.batch_rank = max(rank, state.batch_rank or 0)
    placed = _place(state, names)
    _write_index(gm, state, names)
    sites = all_sites(gm)
    ranks = site_ranks(state, sites, gm)
    if layout_key(state, ranks) != state.batch_key:
        sync(gm)  # a new graph: the first batch, more slots, a larger rank, or training
        log.info(
            "set_adapter_batch: %d slots -> new graph; %s",
            len(state.batch_adapters),
            _layout_summary(sites, ranks),
        )
    else:
        write_slots(gm, state, ranks, None if refresh else placed)
    log.debug("set_adapter_batch: %s (slots %s)", names, state.batch_adapters)
    return gm


def _layout_summary(sites: dict, ranks: dict) -> str:
    """`"sites gathered 3 (1 embedding, 2 linear), masked 1 (1 conv)"`: what rule 1 chose."""
    parts = []
    for gathered, word in ((True, "gathered"), (False, "masked")):
        kinds = Counter(sites[fqn].kind for fqn, (_, g) in ranks.items() if g == gathered)
        if kinds:
            detail = ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items()))
            parts.append(f"{word} {kinds.total()} ({detail})")
    return "sites " + (", ".join(parts) or "none")


def _check(state: LoraState, names: list[str], capacity: int | None, rank: int | None) -> None:
    """Refuse unknown or merged adapters and a bad capacity or rank, before any change."""
    unknown = sorted({n for n in names if n != BASE and n not in state.adapters})
    if unknown:
        raise AdapterError(
            f"unknown adapter(s) {unknown} in the batch; adapters on this graph: "
            f"{list(state.adapters)} (or {BASE!r} for the base model)"
        )
    merged = [n for n, rec in state.adapters.items() if rec.merged]
    if merged:
        raise AdapterError(f"adapters {merged} are merged; unmerge them before a mixed batch")
    for label, value in (("capacity", capacity), ("rank", rank)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise AdapterError(f"{label}={value!r} is invalid; pass a positive int or None")


def _place(state: LoraState, names: list[str]) -> list[int]:
    """Give every adapter of the batch a slot (rule 2); returns the slots whose occupant changed."""
    slots, wanted = state.batch_adapters, [n for n in dict.fromkeys(names) if n != BASE]
    missing = [n for n in wanted if n not in slots]
    free = [k for k, n in enumerate(slots) if n is None]
    free += [k for k, n in enumerate(slots) if n is not None and n not in wanted]
    placed = []
    for name in missing:
        if free:
            k = free.pop(0)
            slots[k] = name
        else:
            k = len(slots)
            slots.append(name)  # the stacks grow: a new graph
        placed.append(k)
    return placed


def _write_index(gm: torch.fx.GraphModule, state: LoraState, names: list[str]) -> None:
    """The `[batch]` slot of every row and the reset aLoRA offsets (rule 6), in place if sized."""
    slots = state.batch_adapters
    base = len(slots)  # the zero slot after the last one
    index = [base if n == BASE else slots.index(n) for n in names]
    device = next(gm.parameters()).device
    values = torch.tensor(index, dtype=torch.long, device=device)
    _graph.write_buffer(gm, INDEX_BUFFER, values)  # same batch size: compiled graphs are reused
    write_batch_offsets(gm, state)


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
