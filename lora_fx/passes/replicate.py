"""Replicate a graph's repeated blocks (PEFT's `layer_replication`), sharing their base weights.

    layers [0, 1, 2, 3, 4], layer_replication=[[0, 4], [2, 5]]:
        h -> L0 -> L1 -> L2 -> L3 -> L4 -> norm
    ->  h -> L0 -> L1 -> L2 -> L3 -> L2 -> L3 -> L4 -> norm     renumbered 0..6, as PEFT does

Every block of the new stack is a copy of one original block's nodes. Its `get_attr` /
`call_module` targets and its `nn_module_stack` paths name the new index
(`model.layers.5.self_attn.q_proj`), and the module tree holds, under that path, the very Parameter
objects of the original block: no tensor is copied. LoRA injected afterwards gives each copy its own
A/B, named by the new index exactly as PEFT names them, so adapter files move both ways.

Rules:
1. The stack is found from the graph, not from architecture names: a module-path prefix whose
   numbered children (`model.layers.N`, `transformer.h.N`, a custom `layers.N`) each own a group of
   nodes, at least two of them with the same ops; the outermost such prefix. `container=` names it.
2. The blocks must form a chain: block i reads only its own nodes and attributes, block i-1's
   outputs (the carry: the hidden state), and nodes outside the stack that do not depend on it (side
   inputs: rotary tables, masks, position ids). Only the last block is read after the stack. Side
   inputs are reused by every copy, never copied.
3. The new stack is PEFT's: the concatenation of `range(start, end)` over the ranges, and new index
   k is its k-th entry. Layers in no range are dropped (`[[0, 2]]` on 4 layers keeps 2), as in PEFT.
4. Ranges must be non-empty and inside the stack. Bad ranges, a graph without a stack, blocks that
   do not chain, or a graph that already holds adapters raise `ReplicationError` before anything
   changes.
5. A graph already replicated with the same ranges is left as it is, so `inject` with a config
   whose `layer_replication` was applied by hand (or a second adapter's config) does not replicate
   twice. The ranges, the container and each new block's source are kept in
   `gm.meta["lora_fx_replication"]`.
6. `merge` gives each copy whose base weight is shared a private weight (the untie rule in `merge`),
   so merged outputs equal unmerged ones; PEFT folds every copy's delta into the one shared weight.
   `unload` keeps the replicated stack.
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
from torch import nn
from torch.fx.node import map_arg

from lora_fx.capture import as_graph_module
from lora_fx.core import graph as _graph
from lora_fx.core.state import state_or_none
from lora_fx.errors import ReplicationError
from lora_fx.passes._rollback import transactional

__all__ = ["REPLICATION_META", "apply_replication", "replicate_layers"]

log = logging.getLogger(__name__)

# gm.meta key: {"layer_replication", "container", "source"} of the replication applied to a graph.
REPLICATION_META = "lora_fx_replication"
_ATTR_OPS = ("get_attr", "call_module")  # ops whose target is a module-tree path


@dataclass(frozen=True)
class _Stack:
    """A chain of numbered blocks found in the graph."""

    container: str  # module path of the numbered children ("" for the root)
    blocks: tuple[tuple[torch.fx.Node, ...], ...]  # block i's nodes, in graph order
    outputs: tuple[tuple[torch.fx.Node, ...], ...]  # block i's nodes read outside it: the carry
    carry_in: tuple[dict[tuple[int, int], int], ...]  # block i: (node index, input index) -> slot
    stack_inputs: tuple[torch.fx.Node, ...]  # what block 0 reads in each carry slot
    owner: dict[torch.fx.Node, int]  # node -> block index
    after: frozenset[torch.fx.Node]  # nodes outside the blocks that depend on them

    def path(self, index: int) -> str:
        """Module path of block `index`."""
        return f"{self.container}.{index}" if self.container else str(index)


@dataclass(frozen=True)
class _Plan:
    """A validated replication: the stack and, per new index, the original block it copies."""

    stack: _Stack
    layer_replication: list[list[int]]
    source: tuple[int, ...]


@transactional
def replicate_layers(
    gm: torch.fx.GraphModule | torch.export.ExportedProgram,
    layer_replication: list[list[int]],
    *,
    container: str | None = None,
) -> torch.fx.GraphModule:
    """Repeat ranges of the graph's block stack in place, every copy sharing the base Parameters.

    Args:
        gm: A captured graph (`lora_fx.capture`, or an ExportedProgram) without adapters.
        layer_replication: PEFT's `[[start, end), ...]` ranges of original block indices; the new
            stack is their concatenation, renumbered from 0.
        container: Module path of the block stack (e.g. `"model.layers"`); found from the graph's
            module paths when None.

    Returns:
        The same GraphModule (a new one only when given an ExportedProgram), recompiled, with the
        new stack. `gm.meta["lora_fx_replication"]`
        records the ranges, the container and the original index of every new block.

    Raises:
        ReplicationError: Ranges malformed, empty or out of bounds; no stack of repeated blocks (or
            several and no `container`); blocks that do not form a chain; adapters already injected;
            or a graph already replicated with other ranges. The graph is left unchanged.

    Example:
        >>> gm = lora_fx.capture(model, (ids,), {"use_cache": False})
        >>> gm = lora_fx.replicate_layers(gm, [[0, 4], [2, 5]])   # 5 layers -> 7
        >>> gm = lora_fx.inject(gm, LoraConfig(target_modules="all-linear",
        ...                                    layer_replication=[[0, 4], [2, 5]]))
    """
    gm = as_graph_module(gm)
    _replicate(gm, layer_replication, container)
    return gm


def apply_replication(gm: torch.fx.GraphModule, layer_replication: list[list[int]] | None) -> bool:
    """Replicate for `inject` / `load_adapter`, whose sites are named by the new layer indices.

    They run it inside their rollback (`_rollback.py`), which takes it back if they fail. Does
    nothing when `layer_replication` is empty or was already applied; returns whether it acted.
    """
    return bool(layer_replication) and _replicate(gm, layer_replication, None) is not None


def _replicate(
    gm: torch.fx.GraphModule, layer_replication: Any, container: str | None
) -> Callable[[], None] | None:
    """Plan, then apply; returns a function that undoes it (None when nothing was done)."""
    # plan
    plan = _plan(gm, layer_replication, container)
    if plan is None:
        log.info("replicate_layers: already replicated with %s; nothing to do", layer_replication)
        return None
    # apply
    holder = _container_module(gm, plan.stack.container)
    old_children, old_graph = holder._modules, gm.graph
    children = {name: m for name, m in old_children.items() if not name.isdigit()}
    for p, i in enumerate(plan.source):
        if old_children.get(str(i)) is not None:  # a block without attributes has no module here
            children[str(p)] = _share_clone(old_children[str(i)])
    new_graph = _rebuild(gm, plan)
    holder._modules = children
    _set_graph(gm, new_graph)
    gm.meta[REPLICATION_META] = {
        "layer_replication": plan.layer_replication,
        "container": plan.stack.container,
        "source": list(plan.source),
    }
    # finish
    _graph.cleanup(gm)
    log.info(
        "replicate_layers: %r %d -> %d blocks (new index -> original: %s)",
        plan.stack.container,
        len(plan.stack.blocks),
        len(plan.source),
        list(plan.source),
    )

    def undo() -> None:
        holder._modules = old_children
        _set_graph(gm, old_graph)
        del gm.meta[REPLICATION_META]
        _graph.cleanup(gm)

    return undo


# ------------------------------------------------------------------------------------------ plan


def _plan(gm: torch.fx.GraphModule, layer_replication: Any, container: str | None) -> _Plan | None:
    """Validate the request against the graph; None when it was already applied."""
    ranges = _normalise(layer_replication)
    done = gm.meta.get(REPLICATION_META)
    if done is not None:
        if done["layer_replication"] == ranges:
            return None
        raise ReplicationError(
            f"layer_replication={ranges!r}: this graph was already replicated with "
            f"{done['layer_replication']!r} (stack {done['container']!r}); capture the model again "
            "to replicate it differently"
        )
    state = state_or_none(gm)
    if state is not None and state.adapters:
        raise ReplicationError(
            f"layer_replication={ranges!r}: layer replication must come before the first adapter, "
            f"and this graph already holds {list(state.adapters)}; give the first adapter's config "
            "layer_replication, or call lora_fx.replicate_layers(gm, ...) before inject"
        )
    stack = _find_stack(gm, ranges, container)
    count = len(stack.blocks)
    for start, end in ranges:
        if not 0 <= start < end <= count:
            raise ReplicationError(
                f"layer_replication={ranges!r}: range [{start}, {end}) is "
                f"{'empty' if start >= end else 'out of bounds'}; stack {stack.container!r} has "
                f"{count} blocks, so each range needs 0 <= start < end <= {count}"
            )
    source = tuple(i for start, end in ranges for i in range(start, end))
    _check_carry_fits(stack, source)
    return _Plan(stack, ranges, source)


def _normalise(layer_replication: Any) -> list[list[int]]:
    """`[[start, end], ...]` as lists of ints, or a ReplicationError saying what would work."""
    pairs = layer_replication if isinstance(layer_replication, (list, tuple)) else None
    if (
        not pairs
        or not all(isinstance(p, (list, tuple)) and len(p) == 2 for p in pairs)
        or not all(isinstance(v, int) and not isinstance(v, bool) for p in pairs for v in p)
    ):
        raise ReplicationError(
            f"layer_replication={layer_replication!r} is invalid; expected a non-empty list of "
            "[start, end) pairs of layer indices, e.g. [[0, 4], [2, 5]]"
        )
    return [[int(start), int(end)] for start, end in pairs]


def _find_stack(gm: torch.fx.GraphModule, ranges: list[list[int]], container: str | None) -> _Stack:
    """The block stack: the outermost numbered module prefix whose blocks repeat."""
    groups = _numbered_groups(gm)
    if container is not None:
        if container not in groups:
            raise ReplicationError(
                f"layer_replication={ranges!r}: container={container!r} has no numbered blocks in "
                f"this graph; prefixes with numbered blocks: {sorted(groups)!r}"
            )
        chosen = [container]
    else:
        repeated = [c for c, blocks in groups.items() if _repeats(c, blocks)]
        chosen = [c for c in repeated if not any(_inside(c, other) for other in repeated)]
    if not chosen:
        raise ReplicationError(
            f"layer_replication={ranges!r}: layer replication needs a stack of repeated blocks "
            "(numbered module paths such as 'model.layers.N' that own the same ops); this graph "
            f"has none (numbered prefixes: {sorted(groups)!r})"
        )
    if len(chosen) > 1:
        raise ReplicationError(
            f"layer_replication={ranges!r}: several block stacks {sorted(chosen)!r}; name one with "
            "lora_fx.replicate_layers(gm, layer_replication, container=...)"
        )
    blocks = groups[chosen[0]]
    indices = sorted(blocks)
    if indices != list(range(len(indices))) or len(indices) < 2:
        raise ReplicationError(
            f"layer_replication={ranges!r}: stack {chosen[0]!r} has blocks {indices}; replication "
            "needs at least two blocks numbered 0, 1, ... without gaps"
        )
    return _chain(gm, chosen[0], [tuple(blocks[i]) for i in indices], ranges)


def _numbered_groups(gm: torch.fx.GraphModule) -> dict[str, dict[int, list[torch.fx.Node]]]:
    """Map prefix -> block index -> nodes whose module path passes through `prefix.index`."""
    groups: dict[str, dict[int, list[torch.fx.Node]]] = {}
    for node in gm.graph.nodes:
        seen = set()
        for path in _node_paths(node):
            head, _, last = path.rpartition(".")
            if last.isdigit() and (head, last) not in seen:
                seen.add((head, last))
                groups.setdefault(head, {}).setdefault(int(last), []).append(node)
    return groups


def _node_paths(node: torch.fx.Node) -> set[str]:
    """Every module path a node lives under: its target's owner, else export's module stack.

    A `get_attr` / `call_module` node belongs where its target lives, whatever its stack says:
    export files its `_guards_fn` call and higher-order-op bodies under the module that ran first.
    """
    if node.op in _ATTR_OPS:
        parts = node.target.split(".")
        paths = {".".join(parts if node.op == "call_module" else parts[:-1])}
    else:
        paths = {path for path, _ in (node.meta.get("nn_module_stack") or {}).values() if path}
    return {".".join(p.split(".")[:n]) for p in paths if p for n in range(1, p.count(".") + 2)}


def _repeats(container: str, blocks: dict[int, list]) -> bool:
    """At least two blocks of `container` run the same ops."""
    sigs = Counter(_signature(container, i, nodes) for i, nodes in blocks.items())
    return len(blocks) >= 2 and max(sigs.values()) >= 2


def _signature(container: str, index: int, nodes: list[torch.fx.Node]) -> tuple:
    """A block's op sequence, with its own index taken out of attribute paths."""
    prefix = f"{container}.{index}" if container else str(index)
    out = []
    for node in nodes:
        target = node.target
        if node.op in _ATTR_OPS:
            target = _rename(target, prefix, "#") if _under(target, prefix) else node.op
        out.append((node.op, target, len(_inputs(node))))
    return tuple(out)


def _chain(
    gm: torch.fx.GraphModule, container: str, blocks: list[tuple], ranges: list[list[int]]
) -> _Stack:
    """Check the blocks form a chain and find each block's carry slots."""
    owner: dict[torch.fx.Node, int] = {}
    for i, nodes in enumerate(blocks):
        for node in nodes:
            if node in owner:
                raise _not_a_chain(
                    ranges, container, f"{node.format_node()} is in blocks {owner[node]} and {i}"
                )
            owner[node] = i
    dependent = _dependent_outside(gm, owner)
    carry_reads: list[dict[tuple[int, int], torch.fx.Node]] = []
    for i, nodes in enumerate(blocks):
        reads = {}
        for k, node in enumerate(nodes):
            for j, arg in enumerate(_inputs(node)):
                if owner.get(arg) == i:
                    continue
                if arg in owner and owner[arg] != i - 1:
                    raise _not_a_chain(
                        ranges, container, f"block {i} reads {arg.name} of block {owner[arg]}"
                    )
                if arg in dependent:
                    raise _not_a_chain(
                        ranges, container, f"block {i} reads {arg.name}, computed between blocks"
                    )
                if arg in owner:
                    reads[(k, j)] = arg
        carry_reads.append(reads)
    outputs = tuple(
        tuple(n for n in nodes if any(owner.get(u) != i for u in n.users))
        for i, nodes in enumerate(blocks)
    )
    for i, outs in enumerate(outputs[:-1]):
        for node in outs:
            stray = [u.name for u in node.users if owner.get(u) not in (i, i + 1)]
            if stray:
                raise _not_a_chain(
                    ranges,
                    container,
                    f"{node.name} of block {i} is read by {stray} outside block {i + 1}",
                )
    if len({len(outs) for outs in outputs}) != 1 or not outputs[0]:
        raise _not_a_chain(
            ranges, container, f"blocks pass on {[len(o) for o in outputs]} values; they must agree"
        )
    carry_in = [{}] + [
        {pos: outputs[i - 1].index(arg) for pos, arg in carry_reads[i].items()}
        for i in range(1, len(blocks))
    ]
    carry_in[0], stack_inputs = _stack_inputs(container, blocks, carry_in, owner, ranges)
    return _Stack(
        container,
        tuple(blocks),
        outputs,
        tuple(carry_in),
        stack_inputs,
        owner,
        frozenset(dependent),
    )


def _stack_inputs(
    container: str, blocks: list[tuple], carry_in: list[dict], owner: dict, ranges: list[list[int]]
) -> tuple[dict[tuple[int, int], int], tuple[torch.fx.Node, ...]]:
    """Which inputs of block 0 are the carry: read where a block with block 0's ops reads its carry.

    When no other block has block 0's ops, the carry is what block 0 alone reads from outside.
    """
    slots = len(set(carry_in[1].values()))
    first = _signature(container, 0, list(blocks[0]))
    twin = next(
        (i for i in range(1, len(blocks)) if _signature(container, i, list(blocks[i])) == first),
        None,
    )
    found: dict[int, torch.fx.Node] = {}
    positions: dict[tuple[int, int], int] = {}
    if twin is not None:
        for (k, j), slot in carry_in[twin].items():
            arg = _inputs(blocks[0][k])[j]
            if arg in owner or found.setdefault(slot, arg) is not arg:
                raise _not_a_chain(ranges, container, "block 0 reads its carry from several nodes")
            positions[(k, j)] = slot
    else:
        others = {a for nodes in blocks[1:] for n in nodes for a in _inputs(n) if a not in owner}
        only_first = list(
            dict.fromkeys(
                a for n in blocks[0] for a in _inputs(n) if a not in owner and a not in others
            )
        )
        found = dict(enumerate(only_first))
        for k, node in enumerate(blocks[0]):
            for j, arg in enumerate(_inputs(node)):
                if arg in only_first:
                    positions[(k, j)] = only_first.index(arg)
    if sorted(found) != list(range(slots)):
        raise _not_a_chain(
            ranges,
            container,
            f"cannot tell which of block 0's inputs are the {slots} carried values",
        )
    return positions, tuple(found[s] for s in range(slots))


def _check_carry_fits(stack: _Stack, source: tuple[int, ...]) -> None:
    """Each new block must receive values shaped like those its original received."""
    for p, i in enumerate(source):
        given = stack.stack_inputs if p == 0 else stack.outputs[source[p - 1]]
        wanted = stack.stack_inputs if i == 0 else stack.outputs[i - 1]
        for slot, (g, w) in enumerate(zip(given, wanted, strict=True)):
            if _shape(g) is not None and _shape(w) is not None and _shape(g) != _shape(w):
                raise ReplicationError(
                    f"new block {p} (a copy of {stack.path(i)}) would receive carry slot {slot} "
                    f"shaped {_shape(g)} but {stack.path(i)} takes {_shape(w)}; these blocks are "
                    "not interchangeable"
                )


def _dependent_outside(gm: torch.fx.GraphModule, owner: dict) -> set[torch.fx.Node]:
    """Nodes outside the blocks that depend on a block's value (they come after the stack)."""
    dependent: set[torch.fx.Node] = set()
    for node in gm.graph.nodes:
        if node not in owner and any(a in owner or a in dependent for a in node.all_input_nodes):
            dependent.add(node)
    return dependent


def _not_a_chain(ranges: list[list[int]], container: str, why: str) -> ReplicationError:
    """The error for a stack whose blocks cannot be rewired."""
    return ReplicationError(
        f"layer_replication={ranges!r}: the blocks of {container!r} do not form a chain ({why}); "
        "replication needs each block to read only the previous block's outputs and inputs shared "
        "by all blocks"
    )


# ----------------------------------------------------------------------------------------- apply


def _rebuild(gm: torch.fx.GraphModule, plan: _Plan) -> torch.fx.Graph:
    """A new graph: nodes before the stack, the new blocks in order, then the nodes after it."""
    old, stack = gm.graph, plan.stack
    new = torch.fx.Graph(owning_module=gm, tracer_cls=old._tracer_cls)
    with warnings.catch_warnings():  # copying torch's pytree specs trips its own LeafSpec notice
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        new._codegen = copy.deepcopy(old._codegen)
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    for node in old.nodes:  # side inputs and everything else independent of the stack
        if node not in stack.owner and node not in stack.after and node.op != "output":
            env[node] = new.node_copy(node, env.__getitem__)
    carry = tuple(env[n] for n in stack.stack_inputs)
    for p, i in enumerate(plan.source):
        carry = _emit_block(new, stack, i, p, carry, env)
        log.debug("replicate_layers: block %s <- %s", stack.path(p), stack.path(i))
    last = stack.outputs[-1]
    for node in old.nodes:  # after the stack: the last block's outputs become the new last's
        if node in stack.after or node.op == "output":
            env[node] = new.node_copy(
                node, lambda a: carry[last.index(a)] if a in stack.owner else env[a]
            )
    return new


def _emit_block(
    new: torch.fx.Graph,
    stack: _Stack,
    index: int,
    position: int,
    carry: tuple[torch.fx.Node, ...],
    env: dict[torch.fx.Node, torch.fx.Node],
) -> tuple[torch.fx.Node, ...]:
    """Copy block `index` as new block `position`, fed `carry`; returns its outputs."""
    old_path, new_path = stack.path(index), stack.path(position)
    slots = stack.carry_in[index]
    local: dict[torch.fx.Node, torch.fx.Node] = {}
    for k, node in enumerate(stack.blocks[index]):
        inputs = iter(range(len(_inputs(node))))

        def transform(arg: torch.fx.Node, k: int = k, inputs: Iterator[int] = inputs) -> Any:
            slot = slots.get((k, next(inputs)))
            if slot is not None:
                return carry[slot]
            return local[arg] if arg in local else env[arg]

        target = node.target
        if node.op in _ATTR_OPS and _under(target, old_path):
            target = _rename(target, old_path, new_path)
        args = map_arg(node.args, transform)
        kwargs = map_arg(node.kwargs, transform)
        name = None if node.op in _ATTR_OPS else node.name  # attributes: named by new target
        copied = new.create_node(node.op, target, args, kwargs, name, node.type)
        copied.meta = copy.copy(node.meta)
        if "nn_module_stack" in node.meta:
            copied.meta["nn_module_stack"] = _renamed_stack(
                node.meta["nn_module_stack"], old_path, new_path
            )
        local[node] = copied
    return tuple(local[n] for n in stack.outputs[index])


def _renamed_stack(stack: dict, old: str, new: str) -> dict:
    """`nn_module_stack` with paths (and the keys that end with them) under `old` moved to `new`."""
    out = {}
    for key, (path, cls) in stack.items():
        if path and _under(path, old):
            moved = _rename(path, old, new)
            key = key[: -len(path)] + moved if isinstance(key, str) and key.endswith(path) else key
            path = moved
        out[key] = (path, cls)
    return out


def _set_graph(gm: torch.fx.GraphModule, graph: torch.fx.Graph) -> None:
    """Install `graph` on gm without recompiling (the `gm.graph` setter would; cleanup does it)."""
    gm._graph = graph
    graph.owning_module = gm


def _container_module(gm: torch.fx.GraphModule, container: str) -> nn.Module:
    """The module holding the numbered blocks (an empty one when the blocks hold no attribute)."""
    try:
        return gm.get_submodule(container) if container else gm
    except AttributeError:
        return nn.Module()


def _share_clone(module: nn.Module) -> nn.Module:
    """A copy of a module tree with its own module objects, holding the same Parameters and buffers.

    Own objects per path keep paths apart (`named_modules`, `own_module`, untying on merge);
    shared tensors keep memory as it was (PEFT's `clone_module(share_weights=True)`).
    """
    clone = copy.copy(module)
    clone._parameters = dict(module._parameters)
    clone._buffers = dict(module._buffers)
    clone._modules = {
        name: None if child is None else _share_clone(child)
        for name, child in module._modules.items()
    }
    return clone


# --------------------------------------------------------------------------------------- helpers


def _inputs(node: torch.fx.Node) -> list[torch.fx.Node]:
    """Node inputs in the order `map_arg` visits them (args, then kwargs), repeats included."""
    found: list[torch.fx.Node] = []
    map_arg(node.args, found.append)
    map_arg(node.kwargs, found.append)
    return found


def _under(path: str, prefix: str) -> bool:
    """Whether `path` is `prefix` or lies below it."""
    return path == prefix or path.startswith(prefix + ".")


def _rename(path: str, old: str, new: str) -> str:
    """`path` with its leading `old` replaced by `new`."""
    return new + path[len(old) :]


def _inside(container: str, other: str) -> bool:
    """Whether `container` lies inside one of `other`'s blocks (`other.N....`)."""
    if container == other:
        return False
    rest = container[len(other) + 1 :] if other else container
    return (not other or container.startswith(other + ".")) and rest.split(".")[0].isdigit()


def _shape(node: torch.fx.Node) -> tuple[str, Any] | None:
    """(shape, dtype) of a node's example value, if export recorded one."""
    val = node.meta.get("val")
    return (str(tuple(val.shape)), val.dtype) if isinstance(val, torch.Tensor) else None
