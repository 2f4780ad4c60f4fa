"""Activation checkpointing for the repeated blocks of a graph (PEFT users' gradient checkpointing).

    h1 = <the nodes of model.layers.0>(h0, cos, sin, mask, W_q, A_q, B_q, ...)
        ->  h1 = self.lora_fx_checkpoint_model_layers_0(h0, cos, sin, mask, W_q, A_q, B_q, ...)
            # = torch.utils.checkpoint.checkpoint(<those nodes as a GraphModule>, ...,
            #                                     use_reentrant=False)

Between forward and backward only a block's inputs stay alive; backward runs the block again to
get its activations. `uncheckpoint_blocks` puts the nodes back.

Rules:
1. A block is a module path ending in an index (`model.layers.3`, `transformer.h.0`, `layers.1`),
   read from the graph's `nn_module_stack`; by default every such path whose parent holds at least
   two of them. A node belongs to the outermost block on its stack; a LoRA branch node to the block
   of its site.
2. A block's region is every compute node from its first node to its last in graph order.
   Regions of two blocks must not interleave (ValueError).
3. Parameters and buffers (`get_attr` nodes) stay in the outer graph and are passed in, so DDP,
   FSDP2 and `torch.compile` see the parameters the module tree holds.
4. The region's nodes move into a GraphModule held by a parameter-free module registered at
   `lora_fx_checkpoint_<block>`; the region's modules (dropouts, and the leaf modules of an
   `fx`-traced model) are shared, not copied, and not registered twice: parameter names and
   `state_dict()` keys do not change.
5. Non-reentrant checkpointing with the RNG state restored: dropout masks in the recomputation are
   the forward's, so gradients equal those without checkpointing. Under `torch.compile` the
   regions become `tag_activation_checkpoint` regions that AOTAutograd recomputes in backward.
6. The LoRA passes (inject, merge, set_adapter, save_adapter, unload, ...) read sites from the flat
   graph: run them before `checkpoint_blocks` or after `uncheckpoint_blocks`.
7. MonteCLoRA adapters are refused: recomputing a block would take the sampler's next draws, so
   the backward would not match the forward.
"""

from __future__ import annotations

import itertools
import logging
import operator
import re
from collections import defaultdict
from typing import Any

import torch
import torch.fx
from torch import nn
from torch.utils.checkpoint import checkpoint

from lora_fx.core import graph as _graph
from lora_fx.core.state import CHECKPOINT_META, lora_tag, state_or_none
from lora_fx.passes._rollback import transactional

__all__ = ["checkpoint_blocks", "checkpointed_blocks", "uncheckpoint_blocks"]

log = logging.getLogger(__name__)

_PREFIX = "lora_fx_checkpoint_"
_INDEXED = re.compile(r"^(?:.+\.)?\d+$")  # a module path ending in an index: `model.layers.3`
_OUTSIDE = ("placeholder", "get_attr", "output")  # nodes that never move into a region
_COPIED_META = ("val", "tensor_meta", "example_value")  # what a region output's getitem inherits


class CheckpointedBlock(nn.Module):
    """One block's nodes, run under `torch.utils.checkpoint` (non-reentrant).

    The block's GraphModule is kept outside the module tree (a plain attribute), so its shared
    modules are not registered twice; this module has no parameters, buffers or children.
    """

    def __init__(
        self,
        code: torch.fx.GraphModule,
        block: str,
        preserve_rng_state: bool,
        attr_positions: list[tuple[str, int]],
    ) -> None:
        super().__init__()
        object.__setattr__(self, "code", code)  # not a child: see the class docstring
        self.block = block
        self.preserve_rng_state = preserve_rng_state
        # (outer get_attr node name, index of the compute node it preceded): undo keeps the order
        self.attr_positions = attr_positions

    def forward(self, *args: Any) -> Any:
        """Run the block's nodes; in training, keep only the inputs for backward."""
        return checkpoint(
            self.code, *args, use_reentrant=False, preserve_rng_state=self.preserve_rng_state
        )

    def extra_repr(self) -> str:
        return f"block={self.block!r}, nodes={len(self.code.graph.nodes)}"


@transactional
def checkpoint_blocks(
    gm: torch.fx.GraphModule,
    blocks: list[str] | None = None,
    *,
    preserve_rng_state: bool = True,
) -> torch.fx.GraphModule:
    """Recompute each repeated block's activations in backward instead of keeping them, in place.

    Args:
        gm: A captured graph, usually with adapters injected (method "export" or "fx").
        blocks: Module paths of the blocks to checkpoint (`["model.layers.0", ...]`); by default
            every repeated block (see the module docstring).
        preserve_rng_state: Restore the RNG state before recomputing, so dropout masks repeat
            (`torch.utils.checkpoint`'s argument). False is faster; gradients then differ when
            dropout is active.

    Returns:
        The same GraphModule, recompiled.

    Raises:
        ValueError: The graph is already checkpointed, a named block is not in the graph, no
            repeated block was found, two blocks' nodes interleave, or an adapter uses
            MonteCLoRA (rule 7).

    Example:
        >>> gm = lora_fx.inject(lora_fx.capture(model, (ids,)), cfg)
        >>> gm = lora_fx.checkpoint_blocks(gm)        # then train as usual (eager or compiled)
        >>> gm = lora_fx.uncheckpoint_blocks(gm)      # before merge / save_adapter / set_adapter
    """
    # plan
    if checkpointed_blocks(gm):
        raise ValueError(
            f"the graph is already checkpointed ({len(checkpointed_blocks(gm))} blocks); "
            "call lora_fx.uncheckpoint_blocks(gm) first"
        )
    state = state_or_none(gm)
    monte = [n for n, r in (state.adapters if state else {}).items() if r.config.monteclora_config]
    if monte:
        raise ValueError(
            f"adapters {monte} use monteclora_config, whose sampler would draw new samples when "
            "a block is recomputed in backward; train them without checkpoint_blocks"
        )
    owner = _block_owners(gm, blocks)
    regions = _regions(gm, owner)

    # apply
    for block, nodes in regions.items():
        _outline(gm, block, nodes, preserve_rng_state)

    # finish
    names = list(regions)
    gm.meta[CHECKPOINT_META] = names  # LoRA passes refuse the graph until uncheckpoint_blocks
    _graph.cleanup(gm)
    log.info("checkpoint_blocks: %d blocks (%s ... %s)", len(names), names[0], names[-1])
    return gm


@transactional
def uncheckpoint_blocks(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Put the nodes of every checkpointed block back into the graph, in place.

    Args:
        gm: A graph `checkpoint_blocks` changed (any other graph is returned unchanged).

    Returns:
        The same GraphModule, recompiled.

    Example:
        >>> lora_fx.uncheckpoint_blocks(gm)
        >>> lora_fx.save_adapter(gm, "out/adapter")
    """
    calls = [n for n in gm.graph.nodes if _checkpoint_module(gm, n) is not None]
    for call in calls:
        _inline(gm, call)
    gm.meta.pop(CHECKPOINT_META, None)
    _graph.cleanup(gm)
    log.info("uncheckpoint_blocks: %d blocks", len(calls))
    return gm


def checkpointed_blocks(gm: torch.fx.GraphModule) -> list[str]:
    """Module paths of the blocks `checkpoint_blocks` wrapped, in graph order (empty if none)."""
    return [
        module.block
        for node in gm.graph.nodes
        if (module := _checkpoint_module(gm, node)) is not None
    ]


def _block_owners(gm: torch.fx.GraphModule, blocks: list[str] | None) -> dict[torch.fx.Node, str]:
    """Compute node -> block path, for the blocks asked for (or every repeated block)."""
    found: dict[torch.fx.Node, str] = {}
    for node in gm.graph.nodes:
        if node.op in _OUTSIDE:
            continue
        block = next((p for p in _module_paths(node) if _INDEXED.match(p)), None)
        if block is not None:
            found[node] = block
    paths = set(found.values())
    if blocks is not None:
        missing = [b for b in blocks if b not in paths]
        if missing:
            raise ValueError(
                f"blocks={missing} are not blocks of this graph; blocks found: "
                f"{sorted(paths, key=_natural)[:8]}{' ...' if len(paths) > 8 else ''}"
            )
        chosen = set(blocks)
    else:
        siblings: dict[str, set[str]] = defaultdict(set)
        for path in paths:
            siblings[path.rpartition(".")[0]].add(path)
        chosen = {p for group in siblings.values() if len(group) >= 2 for p in group}
        if not chosen:
            raise ValueError(
                "no repeated blocks (module paths like 'model.layers.0', 'model.layers.1') in the "
                f"graph's nn_module_stack; indexed paths found: {sorted(paths, key=_natural)}; "
                "pass blocks=[...] to name them"
            )
    return {node: block for node, block in found.items() if block in chosen}


def _module_paths(node: torch.fx.Node) -> list[str]:
    """Module paths a node was created in, outermost first (a branch node: its site's)."""
    tag = lora_tag(node)
    if tag is not None:
        parts = tag["site"].split(".")
        return [".".join(parts[: i + 1]) for i in range(len(parts))]
    stack = node.meta.get("nn_module_stack") or {}
    paths = [value[0] for value in stack.values() if value and value[0]]
    if node.op == "call_module":
        paths.append(node.target)
    return paths


def _regions(
    gm: torch.fx.GraphModule, owner: dict[torch.fx.Node, str]
) -> dict[str, list[torch.fx.Node]]:
    """Block -> the nodes from its first compute node to its last; blocks must not interleave."""
    nodes = list(gm.graph.nodes)
    spans: dict[str, list[int]] = {}
    for i, node in enumerate(nodes):
        if node in owner:
            spans.setdefault(owner[node], [i, i])[1] = i
    ordered = sorted(spans.items(), key=lambda item: item[1][0])
    for (prev, (_, prev_end)), (block, (start, _)) in itertools.pairwise(ordered):
        if start <= prev_end:
            raise ValueError(
                f"the nodes of blocks {prev!r} and {block!r} interleave in the graph "
                f"({nodes[start].format_node()} comes before the end of {prev!r}); "
                "pass blocks=[...] without one of them"
            )
    return {block: nodes[start : end + 1] for block, (start, end) in ordered}


def _outline(
    gm: torch.fx.GraphModule, block: str, span: list[torch.fx.Node], preserve_rng_state: bool
) -> None:
    """Move the compute nodes of `span` into a CheckpointedBlock and call it where they were."""
    nodes = [n for n in span if n.op not in _OUTSIDE]
    # Where the get_attr nodes of the span sat among the compute nodes, to put them back there.
    attrs, seen = [], 0
    for node in span:
        if node.op in _OUTSIDE:
            attrs.append((node.name, seen))
        else:
            seen += 1
    inside = set(nodes)
    inputs = list(dict.fromkeys(a for n in nodes for a in n.all_input_nodes if a not in inside))
    outputs = [n for n in nodes if any(u not in inside for u in n.users)]
    sub = torch.fx.Graph()
    env = {node: sub.placeholder(node.name) for node in inputs}
    for node in nodes:
        env[node] = sub.node_copy(node, env.__getitem__)
    sub.output(tuple(env[n] for n in outputs))
    code = torch.fx.GraphModule(gm, sub, class_name=f"Block_{_attr_name(block)}")
    path = _PREFIX + _attr_name(block)
    gm.add_submodule(path, CheckpointedBlock(code, block, preserve_rng_state, attrs))
    graph = gm.graph
    with graph.inserting_after(nodes[-1]):
        call = graph.call_module(path, tuple(inputs))
    with graph.inserting_after(call):
        for i, node in reversed(list(enumerate(outputs))):
            item = graph.call_function(operator.getitem, (call, i))
            item.meta.update({k: node.meta[k] for k in _COPIED_META if k in node.meta})
            node.replace_all_uses_with(item, delete_user_cb=lambda u: u not in inside)
    for node in reversed(nodes):
        graph.erase_node(node)


def _inline(gm: torch.fx.GraphModule, call: torch.fx.Node) -> None:
    """Copy a CheckpointedBlock's nodes back in place of its call and drop the module."""
    module = _checkpoint_module(gm, call)
    sub, graph = module.code.graph, gm.graph
    env: dict[torch.fx.Node, Any] = {}
    placeholders = [n for n in sub.nodes if n.op == "placeholder"]
    env.update(zip(placeholders, call.args, strict=True))
    results: tuple = ()
    with graph.inserting_before(call):
        for node in sub.nodes:
            if node.op == "output":
                results = node.args[0]
            elif node.op != "placeholder":
                env[node] = graph.node_copy(node, env.__getitem__)
    for item in list(call.users):
        item.replace_all_uses_with(env[results[item.args[1]]])
        graph.erase_node(item)
    graph.erase_node(call)
    copies = [env[n] for n in sub.nodes if n.op not in _OUTSIDE]
    by_name = {n.name: n for n in graph.nodes}
    for name, position in module.attr_positions:
        if name in by_name and position < len(copies):
            copies[position].prepend(by_name[name])
    _graph.delete_attr(gm, call.target)


def _checkpoint_module(gm: torch.fx.GraphModule, node: torch.fx.Node) -> CheckpointedBlock | None:
    """The CheckpointedBlock a node calls, or None."""
    if node.op != "call_module" or not node.target.startswith(_PREFIX):
        return None
    module = gm.get_submodule(node.target)
    return module if isinstance(module, CheckpointedBlock) else None


def _attr_name(block: str) -> str:
    """`model.layers.0` -> `model_layers_0`."""
    return re.sub(r"\W", "_", block)


def _natural(path: str) -> list:
    """Sort key: `layers.10` after `layers.9`."""
    return [int(p) if p.isdigit() else p for p in path.split(".")]
