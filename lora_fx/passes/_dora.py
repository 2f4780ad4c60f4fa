"""DoRA in the graph: the nodes that turn a LoRA branch's output into DoRA's.

    lora = scale * B(A(dropout(x)))               (built by `_branch.insert_branch`)
    norm = dora.branch_norm(W, A, B, scale)       (||W + scale B A|| per channel, detached)
    g    = magnitude / norm
    out  = (g - 1) * base + g * lora              (added to y by the branch's "add" node)

Rules:
1. `base` is `W x` without bias. Without dropout it is the site's output minus its bias (PEFT's
   `result - bias`); with dropout it is recomputed from the dropped-out `x`, so both terms see the
   same input (PEFT does this in training; here the graph does it in eval too, where dropout is the
   identity and the value is the same).
2. `base` is the site's own output, not the running sum of other adapters' branches: with several
   active adapters PEFT rescales that sum instead (its DoRA reads `result` after earlier adapters).
   With one adapter per site the two agree.
3. A bitsandbytes base weight is dequantized inside `branch_norm` / `base_output` (QLoRA + DoRA).
4. Every node is tagged with role "dora".
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.fx
from torch import nn

from lora_fx.core import graph as _graph
from lora_fx.core.keys import LoraPaths
from lora_fx.core.state import LoraState, SiteRecord
from lora_fx.math import dora
from lora_fx.sites import Site
from lora_fx.sites.kinds import kind_of, lora_paths

__all__ = ["add_magnitude", "dora_output"]

_aten = torch.ops.aten
Emit = Callable[..., torch.fx.Node]  # `_branch._Emitter`: (role, op, target, args) -> tagged node


def add_magnitude(
    gm: torch.fx.GraphModule, site: Site, adapter: str, record: SiteRecord, state: LoraState
) -> None:
    """Register `<site>.lora_magnitude_vector.<adapter>.weight = ||W + scale B A||` (PEFT's init).

    Run after A and B are initialised (and after an init that rewrites W), as PEFT does.
    """
    paths = lora_paths(site.kind, site.fqn, adapter)
    a, b = _graph.get_attr(gm, paths.a), _graph.get_attr(gm, paths.b)
    weight = _graph.get_attr(gm, site.weight)
    norm = dora.branch_norm(weight, a, b, record.scale, site.kind, site.transposed)
    holder = _graph.own_module(gm, site.fqn, state)
    if "lora_magnitude_vector" not in holder._modules:
        holder.add_module("lora_magnitude_vector", nn.ModuleDict())
    magnitude = nn.Module()  # PEFT's DoraLinearLayer: one `weight` parameter
    magnitude.register_parameter("weight", nn.Parameter(norm.detach().clone()))
    holder.lora_magnitude_vector[adapter] = magnitude


def dora_output(
    emit: Emit,
    site: Site,
    paths: LoraPaths,
    record: SiteRecord,
    *,
    base: torch.fx.Node,
    x: torch.fx.Node,
    a: torch.fx.Node,
    b: torch.fx.Node,
    lora: torch.fx.Node,
) -> torch.fx.Node:
    """Emit DoRA's nodes after `lora` (the scaled branch output); returns the node to add to y.

    `emit` is the branch's node emitter (`_branch._Emitter`); `x` is the branch input after
    dropout and casts.
    """
    weight = emit("dora", "get_attr", site.weight)
    magnitude = emit("dora", "get_attr", paths.magnitude)
    norm = emit(
        "dora",
        "call_function",
        dora.branch_norm,
        (weight, a, b, record.scale, site.kind, site.transposed),
    )
    g = emit("dora", "call_function", _aten.div.Tensor, (magnitude, norm))
    base_term = _base_term(emit, site, record, base, x, weight)
    g_minus_1 = emit("dora", "call_function", _aten.sub.Tensor, (g, 1))
    rescaled_base = emit("dora", "call_function", _aten.mul.Tensor, (g_minus_1, base_term))
    rescaled_lora = emit("dora", "call_function", _aten.mul.Tensor, (g, lora))
    return emit("dora", "call_function", _aten.add.Tensor, (rescaled_base, rescaled_lora))


def _base_term(
    emit: Emit,
    site: Site,
    record: SiteRecord,
    base: torch.fx.Node,
    x: torch.fx.Node,
    weight: torch.fx.Node,
) -> torch.fx.Node:
    """`W x` without bias: recomputed from the dropped-out x, or the site output minus its bias."""
    kind = kind_of(site)
    if record.dropout > 0 and kind.emit_base is not None:
        return kind.emit_base(emit, site, x, weight)
    if site.bias is None:
        return base
    bias = emit("dora", "get_attr", site.bias)
    shape = kind.magnitude_shape(site)  # the output channels' broadcast shape: [out], [1, out, 1..]
    if len(shape) > 1:
        bias = emit("dora", "call_function", _aten.view.default, (bias, list(shape)))
    return emit("dora", "call_function", _aten.sub.Tensor, (base, bias))
