"""Linear sites: `y = x W^T + b` however it reaches the graph.

call_module  nn.Linear (bitsandbytes Linear4bit / Linear8bitLt too), transformers Conv1D
aten         linear(x, W[out, in], b);  addmm(b, x, W[in, out]) / mm(x, W[in, out]) with W a
parameter stored [in, out] (GPT-2's Conv1D) or t(P) of one stored [out, in]
lora_fx      quant.linear_4bit / linear_8bit(x, W, b) (the `quantize` pass's ops)

branch:  low = linear(x, A[r, in]);  up = linear(low, B[out, r], b_B)
delta:   scale * B @ A  (transposed for a weight stored [in, out])
"""

from __future__ import annotations

import torch
import torch.fx
from torch import nn

from lora_fx.math import dora, ops, quant
from lora_fx.sites.kind import Capabilities, Emit, SiteKind, init_factor_modules
from lora_fx.sites.node_reads import (
    arg,
    base_weight_read,
    is_2d_transpose,
    parameter_path,
    site_name,
)
from lora_fx.sites.site import Match, Site

__all__ = ["LINEAR"]

_aten = torch.ops.aten
_LINEAR_OPS = (_aten.linear.default, torch._C._nn.linear, nn.functional.linear)
_MM_OPS = (_aten.addmm.default, _aten.mm.default)
_TRANSPOSE_OPS = (_aten.t.default, _aten.permute.default, _aten.transpose.int)
_QUANT_LINEAR_OPS = (quant.linear_4bit, quant.linear_8bit)


def match_linear_module(gm: torch.fx.GraphModule, node: torch.fx.Node) -> Match | None:
    """nn.Linear (and subclasses) or transformers' Conv1D called as a module."""
    if node.op != "call_module" or not node.args:
        return None
    module = gm.get_submodule(node.target)
    path, x = node.target, node.args[0]
    bias = f"{path}.bias" if getattr(module, "bias", None) is not None else None
    if isinstance(module, nn.Linear):
        return Match(
            path, "linear", node, x, f"{path}.weight", bias, module.in_features, module.out_features
        )
    if type(module).__name__ == "Conv1D" and type(module).__module__.startswith("transformers"):
        rows, cols = module.weight.shape  # Conv1D stores [in, out]
        return Match(path, "linear", node, x, f"{path}.weight", bias, rows, cols, transposed=True)
    return None


def match_quant_linear(gm: torch.fx.GraphModule, node: torch.fx.Node) -> Match | None:
    """`quant.linear_4bit(x, W, b)` / `quant.linear_8bit(x, W, b)` made by the `quantize` pass."""
    if node.op != "call_function" or node.target not in _QUANT_LINEAR_OPS:
        return None
    weight = parameter_path(gm, node.args[1])
    if weight is None:
        return None
    out_f, in_f = quant.logical_shape(gm.get_parameter(weight))
    bias = parameter_path(gm, arg(node, 2, "bias"))
    return Match(site_name(node, weight), "linear", node, node.args[0], weight, bias, in_f, out_f)


def match_aten_linear(gm: torch.fx.GraphModule, node: torch.fx.Node) -> Match | None:
    """`linear(x, W[out, in], b)` on a parameter weight."""
    if node.op != "call_function" or node.target not in _LINEAR_OPS:
        return None
    weight = parameter_path(gm, base_weight_read(arg(node, 1, "weight")))
    if weight is None:
        return None
    out_f, in_f = gm.get_parameter(weight).shape
    bias = parameter_path(gm, arg(node, 2, "bias"))
    return Match(site_name(node, weight), "linear", node, node.args[0], weight, bias, in_f, out_f)


def match_mm(gm: torch.fx.GraphModule, node: torch.fx.Node) -> Match | None:
    """`addmm(b, x, W)` / `mm(x, W)` with W a parameter `[in, out]` or `t(P)` of one `[out, in]`."""
    if node.op != "call_function" or node.target not in _MM_OPS or node.kwargs:
        return None
    is_addmm = node.target == _aten.addmm.default
    x, w_arg = (node.args[1], node.args[2]) if is_addmm else (node.args[0], node.args[1])
    w_arg = base_weight_read(w_arg)
    transposed = True
    if (
        isinstance(w_arg, torch.fx.Node)
        and w_arg.op == "call_function"
        and w_arg.target in _TRANSPOSE_OPS
    ):
        if not is_2d_transpose(w_arg):
            return None
        w_arg, transposed = w_arg.args[0], False
    weight = parameter_path(gm, w_arg)
    if weight is None or gm.get_parameter(weight).dim() != 2:
        return None
    rows, cols = gm.get_parameter(weight).shape
    in_f, out_f = (rows, cols) if transposed else (cols, rows)
    bias = parameter_path(gm, node.args[0]) if is_addmm else None
    return Match(site_name(node, weight), "linear", node, x, weight, bias, in_f, out_f, transposed)


def factor_shapes(site: Site, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """A `[r, in]`, B `[out, r]`, as PEFT's nn.Linear modules hold them."""
    return (r, site.in_features), (site.out_features, r)


def new_factors(
    site: Site, r: int, lora_bias: bool, init: bool | str
) -> tuple[nn.Module, nn.Module]:
    """PEFT's `lora_A` / `lora_B` nn.Linear modules, initialised as PEFT does."""
    lora_a = nn.Linear(site.in_features, r, bias=False)
    lora_b = nn.Linear(r, site.out_features, bias=lora_bias)
    init_factor_modules(lora_a, lora_b, r, init)
    return lora_a, lora_b


def emit_down(emit: Emit, site: Site, x: torch.fx.Node, a: torch.fx.Node) -> torch.fx.Node:
    """X -> [.., r]."""
    return emit("lora_a", "call_function", _aten.linear.default, (x, a))


def emit_up(
    emit: Emit, site: Site, low: torch.fx.Node, b: torch.fx.Node, bias: torch.fx.Node | None
) -> torch.fx.Node:
    """[.., r] -> [.., out]; also the up-projection of embedding sites."""
    return emit("lora_b", "call_function", _aten.linear.default, (low, b, bias))


def emit_base(emit: Emit, site: Site, x: torch.fx.Node, weight: torch.fx.Node) -> torch.fx.Node:
    """`W x` without bias, recomputed (DoRA's base term under dropout)."""
    return emit("dora", "call_function", dora.base_output, (x, weight, site.transposed))


def delta(
    site: Site, a: torch.Tensor, b: torch.Tensor, scale: float, shape: tuple[int, ...]
) -> torch.Tensor:
    """`scale * B @ A` in the base weight's layout."""
    return ops.delta_weight("linear", a, b, scale, transposed=site.transposed)


def fold_factors(site: Site, w: torch.Tensor, a: torch.Tensor, b: torch.Tensor):
    """`(W, left, right)` with the fold `W += scale * left @ right`."""
    if site.transposed:
        return w, a.T, b.T  # W[in, out] += A.T[in, r] @ B.T[r, out]
    return w, b, a  # W[out, in] += B[out, r] @ A[r, in]


LINEAR = SiteKind(
    name="linear",
    label="linear site",
    matchers=(match_linear_module, match_quant_linear, match_aten_linear, match_mm),
    holders=("lora_A", "lora_B"),
    factor_suffix=".weight",
    factor_shapes=factor_shapes,
    new_factors=new_factors,
    emit_down=emit_down,
    emit_up=emit_up,
    emit_base=emit_base,
    delta=delta,
    fold_factors=fold_factors,
    magnitude_shape=lambda site: (site.out_features,),
    can=Capabilities(
        base_inits=True, quantized=True, layouts=("fused", "plain", "weight"), fused_branch=True
    ),
    in_all_linear=lambda site: True,
)
