"""LoRA on a weight read directly by ops (`target_parameters`, MHA): rewrite the read, not the op.

    W = get_attr(p);  y = bmm(x, W)   ->   W' = W + delta(A, B);  y = bmm(x, W')
    trainable tokens: y = embedding(W, ids)  ->  y = embedding(replace_rows(W, delta, rows), ids)

Rules:
1. Every reader of `W` (bmm, einsum, matmul, a slice that picks one expert, ...) sees `W + delta`:
   the rewrite sits on the `get_attr` node, so the consuming op does not matter.
2. `delta` is PEFT's `ParamWrapper` delta (`ops.param_delta`), cast to W's dtype; adapters chain
   as `W -> add_a -> add_b` like branches on other sites.
3. No dropout, DoRA, `lora_bias` or mixed-batch rows: `x` cannot be factored out of `W x` in
   general (PEFT refuses the same).
4. Trainable tokens rewrite the weight argument of each site op (the embedding, and a tied output
   layer), not the `get_attr`: an untied reader of the same tensor keeps the base rows. Adapters
   chain on that argument; each node has role "add" with the previous weight first, so stripping
   branches gives the base read back.
"""

from __future__ import annotations

import torch
import torch.fx

from lora_fx.errors import AdapterError
from lora_fx.math import ops
from lora_fx.passes._emit import Emitter, chain_end
from lora_fx.sites import Site
from lora_fx.sites.kinds import kind_of
from lora_fx.sites.tokens import weight_arg

__all__ = ["insert_param_branch", "insert_row_branch", "param_delta_like"]

_aten = torch.ops.aten


def insert_param_branch(
    graph: torch.fx.Graph,
    site: Site,
    *,
    adapter: str,
    a: str,
    b: str,
    scale: float,
    row_mask: tuple[str, int] | None = None,
) -> None:
    """Replace every read of the site's weight by `W + delta` for `adapter` (A, B at `a`, `b`)."""
    _refuse_row_mask(site, row_mask, "its delta is added to a weight")
    for getter in site.nodes:
        end = chain_end(getter)
        emit = Emitter(graph, end, {"adapter": adapter, "site": site.fqn})
        a_node = emit("weight", "get_attr", a)
        b_node = emit("weight", "get_attr", b)
        delta = emit("lora_b", "call_function", param_delta_like, (a_node, b_node, scale, end))
        add = emit("add", "call_function", _aten.add.Tensor, (end, delta))
        emit.attach(end, add)


def insert_row_branch(
    graph: torch.fx.Graph,
    site: Site,
    *,
    adapter: str,
    values: str,
    rows: tuple[int, ...],
    row_mask: tuple[str, int] | None = None,
) -> None:
    """Every op of the site reads its weight with `rows` replaced by the tensor at `values`."""
    _refuse_row_mask(site, row_mask, "its rows replace a weight's")
    gm = graph.owning_module
    weight = gm.get_parameter(site.weight)
    for node in site.nodes:
        index = weight_arg(gm, node, weight)
        emit = Emitter(graph, node.prev, {"adapter": adapter, "site": site.fqn})
        delta = emit("weight", "get_attr", values)
        new = emit("add", "call_function", ops.replace_rows, (node.args[index], delta, rows))
        node.update_arg(index, new)


def _refuse_row_mask(site: Site, row_mask: tuple[str, int] | None, why: str) -> None:
    """Mixed batches weight branch outputs per row; a weight rewrite has no rows to weight."""
    if row_mask is not None:
        raise AdapterError(
            f"site {site.fqn!r} ({kind_of(site).label}): mixed-batch adapters cannot act on it "
            f"({why}, which has no batch rows)"
        )


def param_delta_like(
    lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float, weight: torch.Tensor
) -> torch.Tensor:
    """`ops.param_delta` for `weight`'s shape, in `weight`'s dtype (a graph node's target)."""
    return ops.param_delta(lora_a, lora_b, scale, tuple(weight.shape)).to(weight.dtype)
