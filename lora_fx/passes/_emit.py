"""The node-level primitives every branch is built from, in training graphs and export copies.

    emit = Emitter(graph, anchor, {"adapter", "site"})   tagged nodes, one after another
    end = chain_end(node)                                the last branch `add` on node's output
    emit.attach(end, add)                                users of `end` now read `add`
    strip_branches(graph)                                every tagged node gone: the base graph
    point_module_copies(graph, state, order)             modules_to_save references -> a copy
    weighted_rows(emit, (index_path, k), out, scale)     out on a mixed batch's slot-k rows only

Rules:
1. Every node made here carries `node.meta[LORA_META] = {"adapter", "site", "role"}`; stripping
   finds nodes by that tag only (never by name).
2. Branches of several adapters on one output chain: y -> add_a -> add_b, each `add` with the
   previous end as its first argument, so `chain_end` walks them and stripping rewires each `add`
   to that argument.
3. `attach` routes the users of `end` through `add`, except the nodes of the branch itself (they
   read `end` to compute the branch).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.fx

from lora_fx.core.keys import modules_to_save_path
from lora_fx.core.state import LORA_META, LoraState, lora_tag
from lora_fx.math.stack import slot_rows

__all__ = ["Emitter", "chain_end", "point_module_copies", "strip_branches", "weighted_rows"]


class Emitter:
    """Creates tagged nodes one after another, starting after an anchor node."""

    def __init__(self, graph: torch.fx.Graph, anchor: torch.fx.Node, tag: dict[str, str]) -> None:
        self.graph, self.cursor, self.tag = graph, anchor, tag
        self.nodes: set[torch.fx.Node] = set()

    def __call__(self, role: str, op: str, target, args: tuple = ()) -> torch.fx.Node:
        with self.graph.inserting_after(self.cursor):
            node = self.graph.create_node(op, target, args)
        node.meta[LORA_META] = {**self.tag, "role": role}
        self.cursor = node
        self.nodes.add(node)
        return node

    def attach(self, end: torch.fx.Node, add: torch.fx.Node) -> None:
        """Route the users of `end` through `add`, except this branch's own nodes (rule 3)."""
        end.replace_all_uses_with(add, delete_user_cb=lambda user: user not in self.nodes)


def chain_end(node: torch.fx.Node) -> torch.fx.Node:
    """The last branch `add` already on this node's output (or the node itself)."""
    end = node
    while True:
        nxt = next(
            (u for u in end.users if (lora_tag(u) or {}).get("role") == "add" and u.args[0] is end),
            None,
        )
        if nxt is None:
            return end
        end = nxt


def strip_branches(graph: torch.fx.Graph) -> int:
    """Erase every lora_fx node in one pass (the base graph comes back); returns how many."""
    mine = [n for n in graph.nodes if lora_tag(n) is not None]
    for node in mine:
        if lora_tag(node)["role"] == "add":
            node.replace_all_uses_with(node.args[0])
    for node in reversed(mine):
        graph.erase_node(node)
    return len(mine)


def point_module_copies(graph: torch.fx.Graph, state: LoraState, order: Iterable[str]) -> None:
    """Point references to each `modules_to_save` module at a copy, or at the original.

    The copy is that of the first adapter in `order` (the active ones, or the exported ones) that
    has one. A reference may already point at some adapter's copy
    (`<path>.modules_to_save.<name>...`), also of an adapter being deleted; it is re-pointed too.
    """
    order = list(order)
    paths = {p for rec in state.adapters.values() for p in rec.modules_to_save} | {
        node.target.split(".modules_to_save.", 1)[0]
        for node in graph.nodes
        if node.op in ("get_attr", "call_module") and ".modules_to_save." in node.target
    }
    for path in sorted(paths):
        owner = next((a for a in order if path in state.adapters[a].modules_to_save), None)
        prefix = modules_to_save_path(path, owner) if owner else path
        for node in graph.nodes:
            if node.op in ("get_attr", "call_module"):
                rest = _relative(node.target, path)
                if rest is not None:
                    node.target = prefix + rest


def _relative(target: str, path: str) -> str | None:
    """The part of `target` below `path` (skipping any `.modules_to_save.<name>`), or None."""
    if target != path and not target.startswith(path + "."):
        return None
    rest = target[len(path) :]
    if rest.startswith(".modules_to_save."):
        rest = rest[len(".modules_to_save.") :]
        rest = rest[rest.index(".") :] if "." in rest else ""
    return rest


def weighted_rows(
    emit: Emitter, row_mask: tuple[str, int], out: torch.fx.Node, scale: float
) -> torch.fx.Node:
    """`out` times `scale` on the rows whose slot in the index buffer is k (mixed batches)."""
    index = emit("mask", "get_attr", row_mask[0])
    rows = emit("mask", "call_function", slot_rows, (index, row_mask[1], out, scale))
    return emit("mask", "call_function", torch.ops.aten.mul.Tensor, (out, rows))
