"""aLoRA (PEFT's Activated LoRA) on one site: the per-row offsets buffer its branch reads.

    y' = y + scale * B(A(x) * alora_mask(offsets, .))      mask[b, t] = t >= T - min(offsets[b], T)

Rules:
1. The offsets are a `[batch]` long *buffer* at `<site>.lora_alora_offsets.<adapter>`, never in
   files and never trained. A buffer, not something the graph derives from `input_ids`: a decode
   step sees one new token, but its offsets come from the prompt (PEFT's `generate` computes them
   once), and an `inputs_embeds` graph has no ids at all. New offsets of the same batch size are
   written in place, so a compiled graph is reused (no recompile); the graph stays plain ops.
2. `set_alora_offsets(gm, input_ids)` computes each aLoRA adapter's offsets from its own
   `alora_invocation_tokens` (the last occurrence, counted from the row's end: PEFT's
   `calculate_alora_offsets`); `alora_offsets=[...]` sets them as given (PEFT's kwarg). An offset
   of 0 (PEFT's None: invocation not found) leaves the row the base model's.
3. A fresh adapter's buffer is empty: no row is adapted until offsets are set (PEFT's forward
   without `input_ids` does the same: `alora_offsets=None`, base model only).
4. The mask multiplies the rank-r activations (the output when B has a bias), so positions
   before the invocation get exactly `y + 0`: the base model's values, bitwise, and no gradient.
5. Linear sites only, and no merge, hot-swap, weighted combination or merged ONNX export: each
   refuses aLoRA by name (PEFT refuses conv, embedding and parameter sites, and merging).
6. Mixed batches (`set_adapter_batch`): the branches read the batch's one offsets buffer
   (`_gather.py` rule 6); `set_alora_offsets` writes each row the offsets of its own adapter's
   invocation tokens (PEFT's `calculate_alora_offsets(..., adapter_names=)`), computed on the
   device from the slot index, and checks the batch size first.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.fx
from torch import nn

from lora_fx.core import graph as _graph
from lora_fx.core.state import LoraState, require_state, state_or_none
from lora_fx.errors import AdapterError
from lora_fx.math.alora import alora_offsets as _offsets_from_ids
from lora_fx.passes._gather import ALORA_BUFFER, INDEX_BUFFER, write_batch_offsets
from lora_fx.sites import Site
from lora_fx.sites.kinds import lora_paths

__all__ = ["AloraOffsets", "add_alora", "prompt_offsets", "set_alora_offsets"]

log = logging.getLogger(__name__)


class AloraOffsets(nn.Module):
    """The `lora_alora_offsets` holder: one non-persistent `[batch]` buffer per adapter."""

    def __contains__(self, adapter: str) -> bool:
        return adapter in self._buffers

    def __len__(self) -> int:
        return len(self._buffers)

    def __delitem__(self, adapter: str) -> None:
        del self._buffers[adapter]


def add_alora(gm: torch.fx.GraphModule, site: Site, adapter: str, state: LoraState) -> None:
    """Register `adapter`'s empty offsets buffer on the site (rules 1, 3)."""
    holder = _graph.own_module(gm, site.fqn, state)
    if "lora_alora_offsets" not in holder._modules:
        holder.add_module("lora_alora_offsets", AloraOffsets())
    device = _graph.get_attr(gm, lora_paths(site.kind, site.fqn, adapter).a).device
    empty = torch.zeros(0, dtype=torch.long, device=device)
    holder.lora_alora_offsets.register_buffer(adapter, empty, persistent=False)


def set_alora_offsets(
    gm: Any,
    input_ids: torch.Tensor | None = None,
    *,
    alora_offsets: Sequence[int | None] | torch.Tensor | None = None,
) -> Any:
    """Set where each row's aLoRA adapters start acting, in place (buffer values only).

    Call it before running the graph on a batch, as PEFT computes `alora_offsets` in its forward.

    Args:
        gm: A graph with an aLoRA adapter, or `torch.compile` of one (not recompiled when the
            batch size stays the same).
        input_ids: `[batch, seq]` (or `[seq]`) token ids: each aLoRA adapter's rows are adapted
            from the start of the last occurrence of its `alora_invocation_tokens` on.
        alora_offsets: PEFT's per-row offsets instead, counted from each row's end (`None` or 0:
            the row is not adapted), for every aLoRA adapter.
            With neither argument, the offsets are cleared: no row is adapted.

    Returns:
        `gm` itself.

    Raises:
        AdapterError: The graph has no aLoRA adapter.
        ValueError: Both arguments, non-integer ids, a negative or non-integer offset, or (in a
            mixed batch) rows that differ in number from the batch's adapter names.

    Example:
        >>> lora_fx.set_alora_offsets(gm, ids)
        >>> logits = gm(ids)
    """
    graph = getattr(gm, "_orig_mod", gm)
    targets = _buffers(graph)
    values = _requested(targets, input_ids, alora_offsets)
    batch = _batch_offsets(graph, targets, values)  # checked before anything is written
    if batch is not None:
        write_batch_offsets(graph, require_state(graph), batch)
    for adapter, (_, holders) in targets.items():
        for holder in holders:
            value = values.get(adapter, values.get(None))
            _graph.write_buffer(holder, adapter, value.to(holder._buffers[adapter].device))
    if log.isEnabledFor(logging.DEBUG):  # `tolist` would wait for the device on every batch
        log.debug("set_alora_offsets: %s", {a: v.tolist() for a, v in values.items()})
    return gm


@contextlib.contextmanager
def prompt_offsets(gm: torch.fx.GraphModule, input_ids: torch.Tensor) -> Iterator[bool]:
    """Offsets from the prompt for a generation call, restored on exit; yields whether any.

    The offsets stay those of the prompt for every decode step (PEFT's `generate`).
    """
    state = state_or_none(gm)
    names = [] if state is None else (state.batch_adapters or state.active)  # rows' or active
    if not any(n and state.adapters[n].config.alora_invocation_tokens for n in names):
        yield False
        return
    before = [(h, a, h._buffers[a].clone()) for a, (_, hs) in _buffers(gm).items() for h in hs]
    if ALORA_BUFFER in gm._buffers:  # a mixed batch's offsets (rule 6)
        before.append((gm, ALORA_BUFFER, gm._buffers[ALORA_BUFFER].clone()))
    set_alora_offsets(gm, input_ids)
    try:
        yield True
    finally:
        for holder, adapter, value in before:
            _graph.write_buffer(holder, adapter, value)


def _batch_offsets(
    gm: torch.fx.GraphModule,
    targets: dict[str, tuple[list[int], list[AloraOffsets]]],
    values: dict[str | None, torch.Tensor],
) -> dict[str, torch.Tensor] | None:
    """Each aLoRA adapter's `[batch]` offsets for a mixed batch (rule 6); None outside one."""
    index = gm._buffers.get(INDEX_BUFFER)
    if index is None or ALORA_BUFFER not in gm._buffers:
        return None
    rows = {v.shape[0] for v in values.values() if v.numel()}
    if rows and rows != {index.shape[0]}:
        raise ValueError(
            f"set_alora_offsets got {rows.pop()} rows for a mixed batch of {index.shape[0]} rows "
            "(set_adapter_batch); pass one row of input_ids or alora_offsets per batch row"
        )
    if not rows:  # cleared: every aLoRA row unadapted
        return {}
    return {name: values.get(name, values.get(None)) for name in targets}


def _buffers(gm: torch.fx.GraphModule) -> dict[str, tuple[list[int], list[AloraOffsets]]]:
    """Every aLoRA adapter's invocation tokens and offset holders (one per site), by name."""
    state = state_or_none(gm)  # a checkpointed graph too: only buffer values change
    if state is None:
        require_state(gm)  # raises, naming what to call
    found = {
        name: (
            rec.config.alora_invocation_tokens,
            [gm.get_submodule(f"{fqn}.lora_alora_offsets") for fqn in rec.sites],
        )
        for name, rec in state.adapters.items()
        if rec.config.alora_invocation_tokens is not None
    }
    if not found:
        raise AdapterError(
            "set_alora_offsets: no adapter on this graph has alora_invocation_tokens; adapters: "
            f"{list(state.adapters)}"
        )
    return found


def _requested(
    targets: dict[str, tuple[list[int], list[AloraOffsets]]],
    input_ids: torch.Tensor | None,
    offsets: Sequence[int | None] | torch.Tensor | None,
) -> dict[str | None, torch.Tensor]:
    """The `[batch]` offsets to write, by adapter (key None: the same for all), checked first."""
    if input_ids is not None and offsets is not None:
        raise ValueError("pass input_ids or alora_offsets to set_alora_offsets, not both")
    if offsets is not None:
        rows = offsets.tolist() if isinstance(offsets, torch.Tensor) else list(offsets)
        if not all(o is None or (isinstance(o, int) and not isinstance(o, bool)) for o in rows):
            raise ValueError(f"alora_offsets={rows!r} is invalid; expected ints or None per row")
        if any(o is not None and o < 0 for o in rows):
            raise ValueError(f"alora_offsets={rows!r} has a negative offset; expected >= 0")
        return {None: torch.tensor([o or 0 for o in rows], dtype=torch.long)}
    if input_ids is None:
        return {None: torch.zeros(0, dtype=torch.long)}
    dtype = getattr(input_ids, "dtype", None)
    if not isinstance(input_ids, torch.Tensor) or dtype.is_floating_point or dtype.is_complex:
        raise ValueError(
            "input_ids must be an integer tensor of token ids, got "
            f"{dtype or type(input_ids).__name__}"
        )
    return {name: _offsets_from_ids(input_ids, tokens) for name, (tokens, _) in targets.items()}
