"""All-or-nothing passes: a pass that raises leaves the graph and its state record as they were.

    with rollback_on_error(gm) as undo:        # snapshot: graph, state, module tree, requires_grad
        undo.keep(weight)                      # (only before an in-place write to a tensor)
        ...the pass...                         # raises -> everything above is put back, re-raised

Rules:
1. The snapshot is cheap and takes no tensor memory: the graph's nodes by reference (rebuilt only
   on failure), a copy of the `LoraState` record's containers (configs, site records and merge-undo
   entries by reference: passes replace them, never edit them), the
   child / parameter / buffer tables of every module in the tree (references), and each
   parameter's `requires_grad` and `.data` (references).
2. A pass that writes into a tensor in place (an init that rewrites the base weight) calls
   `undo.keep(tensor)` first; only kept tensors are copied (into host memory, so a GPU holds
   no second copy of the weights a PiSSA init rewrites). Passes whose writes can be taken back by
   arithmetic (merge's folds, unmerge's unfolds) register that with `on_restore` instead.
3. The state record is restored into the same `LoraState` object, so a caller holding it (a
   `disable_adapters` block) keeps a live reference.
4. `transactional` wraps a public pass whose first argument is the GraphModule. A pass called by
   another (merge_and_unload calls merge, then unload) takes no snapshot of its own: the
   outermost one restores everything.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import gc
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
import torch.fx
from torch import nn

from lora_fx.core.state import STATE_META, LoraState
from lora_fx.math import quant

__all__ = ["Undo", "active_undo", "rollback_on_error", "transactional"]

_Pass = TypeVar("_Pass", bound=Callable[..., Any])
_ACTIVE_UNDO = "_lora_fx_undo"  # on the GraphModule's __dict__ while its outermost pass runs


class Undo:
    """What `rollback_on_error` restores; `keep` adds a tensor about to be written in place."""

    def __init__(self, gm: torch.fx.GraphModule) -> None:
        self._graph = _GraphRecord(gm.graph)
        self._meta = dict(gm.meta)
        state = gm.meta.get(STATE_META)
        self._state = (state, _copy_state(state)) if state is not None else None
        self._modules = [
            (m, dict(m._modules), dict(m._parameters), dict(m._buffers)) for m in _all_modules(gm)
        ]
        self._params = [(p, p.requires_grad, p.data) for p in _all_parameters(self._modules)]
        self._kept: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._on_restore: list[Callable[[], None]] = []

    def keep(self, tensor: torch.Tensor) -> None:
        """Clone `tensor` once, so its values come back if the pass fails."""
        if id(tensor) in self._kept:
            return
        if quant.is_quantized(tensor):  # requantize_ replaces storage: references suffice
            self._kept[id(tensor)] = (tensor, quant.snapshot(tensor))
        else:
            # in host memory: a rewrite of every targeted weight (PiSSA) must not double GPU use
            self._kept[id(tensor)] = (tensor, tensor.detach().to("cpu", copy=True))

    def on_restore(self, undo_writes: Callable[[], None]) -> None:
        """Run `undo_writes` on restore, once the module tree is back and before the state is.

        For weight writes a pass can take back exactly (merge's folds, unmerge's unfolds): they
        stay registered after the pass returns, so a later failure of an enclosing pass
        (merge_and_unload's unload step) takes them back too. `undo_writes` must be idempotent.
        """
        self._on_restore.append(undo_writes)

    def restore(self, gm: torch.fx.GraphModule) -> None:
        """Put everything back as it was when the snapshot was taken."""
        with torch.no_grad():
            for tensor, saved in self._kept.values():
                if quant.is_quantized(tensor):
                    quant.restore_(tensor, saved)
                else:
                    tensor.copy_(saved)
        for module, children, params, buffers in self._modules:
            module._modules.clear()
            module._modules.update(children)
            module._parameters.clear()
            module._parameters.update(params)
            module._buffers.clear()
            module._buffers.update(buffers)
        for param, requires_grad, data in self._params:
            param.data = data
            param.requires_grad_(requires_grad)
        for undo_writes in reversed(self._on_restore):
            undo_writes()
        gm.meta.clear()
        gm.meta.update(self._meta)
        if self._state is not None:
            live, saved = self._state
            for f in dataclasses.fields(LoraState):
                setattr(live, f.name, getattr(saved, f.name))
        gm.graph = self._graph.rebuild()  # the setter recompiles


@contextlib.contextmanager
def rollback_on_error(gm: torch.fx.GraphModule) -> Iterator[Undo]:
    """Run the block; if it raises, restore `gm` (graph, state, modules, flags) and re-raise.

    Inside another pass's block (merge_and_unload calls merge, then unload) no second snapshot
    is taken: the outermost one restores everything, and `keep` goes to it.
    """
    outer = gm.__dict__.get(_ACTIVE_UNDO)
    if outer is not None:
        yield outer
        return
    undo = Undo(gm)
    gm.__dict__[_ACTIVE_UNDO] = undo
    try:
        yield undo
    except BaseException:
        undo.restore(gm)
        raise
    finally:
        gm.__dict__.pop(_ACTIVE_UNDO, None)


def active_undo(gm: torch.fx.GraphModule) -> Undo | None:
    """The snapshot of the outermost pass running on `gm`, if any."""
    return gm.__dict__.get(_ACTIVE_UNDO)


def transactional(pass_fn: _Pass) -> _Pass:
    """Make a public pass all-or-nothing on its GraphModule (its first argument)."""

    @functools.wraps(pass_fn)
    def run(gm, *args, **kwargs):
        if not isinstance(gm, torch.fx.GraphModule):
            return pass_fn(gm, *args, **kwargs)
        with rollback_on_error(gm):
            return pass_fn(gm, *args, **kwargs)

    return run  # type: ignore[return-value]


def _copy_state(state: LoraState) -> LoraState:
    """A copy whose containers are new; what passes replace but never edit stays shared.

    Passes edit `AdapterRecord.merged` / `.config` / `.sites[...]`, the active list, the owned set
    and the merge-undo dict; they replace configs and `SiteRecord`s rather than edit them, and
    merge-undo values hold tensors (never copied).
    """
    fields = {f.name: copy.copy(getattr(state, f.name)) for f in dataclasses.fields(LoraState)}
    fields["adapters"] = {
        name: dataclasses.replace(
            record, sites=dict(record.sites), modules_to_save=list(record.modules_to_save)
        )
        for name, record in state.adapters.items()
    }
    return LoraState(**fields)


def _all_modules(root: nn.Module) -> list[nn.Module]:
    """Every module under `root` once (shared ones too), `root` first."""
    seen, order, stack = set(), [], [root]
    while stack:
        module = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        order.append(module)
        stack.extend(child for child in module._modules.values() if child is not None)
    return order


def _all_parameters(
    tables: list[tuple[nn.Module, dict, dict, dict]],
) -> list[nn.Parameter]:
    """The parameters of the snapshot's modules, each once."""
    seen: dict[int, nn.Parameter] = {}
    for _, _, params, _ in tables:
        for p in params.values():
            if p is not None:
                seen.setdefault(id(p), p)
    return list(seen.values())


class _GraphRecord:
    """The graph's nodes and what passes change on a node (target, args, kwargs): cheap to take.

    Copying a Graph builds every node anew (~10 us each). Here the record is a few flat lists of
    references, taken with the garbage collector paused (the allocations would otherwise trigger
    collections over the whole heap); the graph is rebuilt only when a pass fails. A node's op,
    name, type and meta are read back from the Node itself (an erased Node keeps them).
    """

    def __init__(self, graph: torch.fx.Graph) -> None:
        self._tracer_cls = graph._tracer_cls
        self._codegen = graph._codegen
        self._pytree_info = getattr(graph._codegen, "pytree_info", None)
        paused = gc.isenabled()
        gc.disable()
        try:
            self._nodes = list(graph.nodes)
            self._targets = [n.target for n in self._nodes]
            self._args = [n.args for n in self._nodes]
            self._kwargs = [n.kwargs for n in self._nodes]
        finally:
            if paused:
                gc.enable()

    def rebuild(self) -> torch.fx.Graph:
        """A new Graph with the recorded nodes, names, meta and call signature."""
        graph = torch.fx.Graph(tracer_cls=self._tracer_cls)
        if self._pytree_info is not None:
            self._codegen.pytree_info = self._pytree_info
        graph._codegen = self._codegen
        new: dict[torch.fx.Node, torch.fx.Node] = {}
        records = zip(self._nodes, self._targets, self._args, self._kwargs, strict=True)
        for node, target, args, kwargs in records:
            args = torch.fx.map_arg(args, new.__getitem__)
            kwargs = torch.fx.map_arg(kwargs, new.__getitem__)
            made = graph.create_node(
                node.op, target, args, kwargs, name=node.name, type_expr=node.type
            )
            made.meta = node.meta
            new[node] = made
        return graph
