"""Embedding sites: `y = embedding(W[num, dim], ids, padding_idx)`.

    call_module  nn.Embedding (and subclasses)
    aten         embedding(W, ids, padding_idx)
    fx           F.embedding(ids, W, padding_idx) (a functional call fx keeps as such)

    branch:  low = embedding(A^T[num, r], ids, padding_idx);  up = linear(low, B[dim, r])
    delta:   scale * (B @ A)^T, `[num, dim]`
    mixed batch (gathered):  y[i] + A_t[slot(i), ids[i]] @ B_t[slot(i)]   (`math.stack`)
PEFT keeps A and B as tensors (`lora_embedding_A` / `lora_embedding_B`), B random and A zero at
init; no dropout on ids, no `lora_bias`.
"""

from __future__ import annotations

import torch
import torch.fx
from torch import nn

from lora_fx.math import ops
from lora_fx.math.stack import gathered_embedding
from lora_fx.sites.kind import Capabilities, Emit, SiteKind
from lora_fx.sites.linear import emit_up
from lora_fx.sites.node_reads import arg, base_weight_read, parameter_path, site_name
from lora_fx.sites.site import Match, Site

__all__ = ["EMBEDDING"]

_aten = torch.ops.aten
_EMBEDDING_OPS = (_aten.embedding.default,)
_FUNCTIONAL_OPS = (nn.functional.embedding,)


def match_embedding_module(gm: torch.fx.GraphModule, node: torch.fx.Node) -> Match | None:
    """nn.Embedding (and subclasses) called as a module."""
    if node.op != "call_module" or not node.args:
        return None
    module = gm.get_submodule(node.target)
    if not isinstance(module, nn.Embedding):
        return None
    path = node.target
    return Match(
        path,
        "embedding",
        node,
        node.args[0],
        f"{path}.weight",
        None,
        module.num_embeddings,
        module.embedding_dim,
        padding_idx=module.padding_idx,
    )


def match_aten_embedding(gm: torch.fx.GraphModule, node: torch.fx.Node) -> Match | None:
    """`embedding(W[num, dim], ids, padding_idx)` or `F.embedding(ids, W, ...)` on a parameter."""
    if node.op != "call_function":
        return None
    if node.target in _EMBEDDING_OPS:
        weight, ids, padding_idx = node.args[0], node.args[1], arg(node, 2, "padding_idx", -1)
    elif node.target in _FUNCTIONAL_OPS:
        weight, ids = arg(node, 1, "weight"), arg(node, 0, "input")
        padding_idx = arg(node, 2, "padding_idx")
        if any(arg(node, i, key) for i, key in ((3, "max_norm"), (6, "sparse"))):
            return None  # renormalizing or sparse lookups are not a plain table read
    else:
        return None
    weight = parameter_path(gm, base_weight_read(weight))  # under trainable tokens' rows: W
    if weight is None or gm.get_parameter(weight).dim() != 2:
        return None
    num, dim = gm.get_parameter(weight).shape
    if node.target in _EMBEDDING_OPS:
        padding_idx = None if padding_idx == -1 else padding_idx  # ATen's "no padding row"
    elif padding_idx is not None and padding_idx < 0:
        padding_idx += num  # as F.embedding does before calling ATen
    name, module = site_name(gm, node, weight)
    return Match(
        name,
        "embedding",
        node,
        ids,
        weight,
        None,
        num,
        dim,
        padding_idx=padding_idx,
        module=module,
    )


def factor_shapes(site: Site, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """A `[r, num]`, B `[dim, r]`, as PEFT's tensors."""
    return (r, site.in_features), (site.out_features, r)


def new_factors(
    site: Site, r: int, lora_bias: bool, init: bool | str
) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's embedding factors: A `[r, num]` zeros and B `[dim, r]` normal, or both random."""
    if init is False:
        return torch.randn(r, site.in_features), torch.randn(site.out_features, r)
    return torch.zeros(r, site.in_features), torch.randn(site.out_features, r)


def emit_down(emit: Emit, site: Site, x: torch.fx.Node, a: torch.fx.Node) -> torch.fx.Node:
    """Ids -> [.., r]: a lookup in A^T with the site's padding index."""
    a_t = emit("lora_a", "call_function", _aten.t.default, (a,))  # [r, num] -> [num, r]
    padding_idx = -1 if site.padding_idx is None else site.padding_idx
    return emit("lora_a", "call_function", _aten.embedding.default, (a_t, x, padding_idx))


def delta(
    site: Site, a: torch.Tensor, b: torch.Tensor, scale: float, shape: tuple[int, ...]
) -> torch.Tensor:
    """`scale * (B @ A)^T`, `[num, dim]`."""
    return ops.delta_weight("embedding", a, b, scale)


def fold_factors(site: Site, w: torch.Tensor, a: torch.Tensor, b: torch.Tensor):
    """W[num, dim] += A.T[num, r] @ B.T[r, dim]."""
    return w, a.T, b.T


EMBEDDING = SiteKind(
    name="embedding",
    label="embedding site",
    matchers=(match_embedding_module, match_aten_embedding),
    holders=("lora_embedding_A", "lora_embedding_B"),
    factor_suffix="",
    factor_shapes=factor_shapes,
    new_factors=new_factors,
    emit_down=emit_down,
    emit_up=emit_up,
    emit_base=None,
    delta=delta,
    fold_factors=fold_factors,
    magnitude_shape=lambda site: (site.out_features,),
    can=Capabilities(lora_bias=False, input_is_ids=True, layouts=("fused", "plain")),
    gathered=lambda site: (gathered_embedding, (site.padding_idx,)),
)
