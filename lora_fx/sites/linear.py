"""Linear sites: `y = x W^T + b` however it reaches the graph.

call_module  nn.Linear (bitsandbytes Linear4bit / Linear8bitLt too), transformers Conv1D
functions    linear(x, W[out, in], b);  addmm(b, x, W[in, out]) / mm(x, W[in, out]) /
             matmul(x, W[in, out]) with W a parameter stored [in, out] (GPT-2's Conv1D) or a
             transpose of one stored [out, in] (`x @ W.T`: Falcon's FalconLinear), dtype casts of
             W allowed; ATen ops (export) and their Python-level forms (fx traces `torch.addmm`,
             `F.linear`, `x @ W.T` as such)
lora_fx      quant.linear_4bit / linear_8bit(x, W, b) (the `quantize` pass's ops)

branch:  low = linear(x, A[r, in]);  up = linear(low, B[out, r], b_B)
delta:   scale * B @ A  (transposed for a weight stored [in, out])
"""

from __future__ import annotations

import operator

import torch
import torch.fx
from torch import nn

from lora_fx.math import dora, ops, quant
from lora_fx.math.stack import gathered_linear
from lora_fx.sites.kind import Capabilities, Emit, SiteKind, init_factor_modules
from lora_fx.sites.node_reads import arg, parameter_path, site_name, weight_source
from lora_fx.sites.site import Match, Site

__all__ = ["LINEAR", "LINEAR_OPS"]

_aten = torch.ops.aten
# Ops whose weight argument is [out, in]; and (with the index of x) those reading it [in, out].
LINEAR_OPS = (_aten.linear.default, torch._C._nn.linear, nn.functional.linear)
_ADDMM_OPS = (_aten.addmm.default, torch.addmm)
_MM_OPS = (_aten.mm.default, _aten.matmul.default, torch.mm, torch.matmul, operator.matmul)
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
    name, module = site_name(gm, node, weight)
    return Match(name, "linear", node, node.args[0], weight, bias, in_f, out_f, module=module)


def match_aten_linear(gm: torch.fx.GraphModule, node: torch.fx.Node) -> Match | None:
    """`linear(x, W[out, in], b)` on a parameter weight (or a cast of one)."""
    if node.op != "call_function" or node.target not in LINEAR_OPS:
        return None
    source = weight_source(gm, arg(node, 1, "weight"))
    if source is None or source[1]:
        return None
    weight = source[0]
    out_f, in_f = gm.get_parameter(weight).shape
    bias = parameter_path(gm, arg(node, 2, "bias"))
    name, module = site_name(gm, node, weight)
    return Match(name, "linear", node, node.args[0], weight, bias, in_f, out_f, module=module)


def match_mm(gm: torch.fx.GraphModule, node: torch.fx.Node) -> Match | None:
    """`addmm(b, x, W)` / `mm(x, W)` / `matmul(x, W)`: W a view `[in, out]` of a 2-D parameter.

    The parameter is stored `[in, out]` (Conv1D: `transposed`) or `[out, in]` and transposed.
    """
    if node.op != "call_function" or node.kwargs:
        return None
    if node.target in _ADDMM_OPS and len(node.args) == 3:
        bias_arg, x, w_arg = node.args
    elif node.target in _MM_OPS and len(node.args) == 2:
        bias_arg, (x, w_arg) = None, node.args
    else:
        return None
    source = weight_source(gm, w_arg)
    if source is None or parameter_path(gm, x) is not None:
        return None
    weight, flipped = source
    transposed = not flipped  # read as [in, out] without a transpose: stored [in, out]
    rows, cols = gm.get_parameter(weight).shape
    in_f, out_f = (rows, cols) if transposed else (cols, rows)
    bias = parameter_path(gm, bias_arg)
    name, module = site_name(gm, node, weight)
    return Match(name, "linear", node, x, weight, bias, in_f, out_f, transposed, module=module)


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
        base_inits=True,
        kasa=True,
        velora=True,
        bdlora=True,
        alora=True,
        qalora=True,
        monteclora=True,
        quantized=True,
        layouts=("fused", "plain", "weight"),
        fused_branch=True,
    ),
    in_all_linear=lambda site: site.module,  # a functional op outside a Linear: by name only
    gathered=lambda site: (gathered_linear, ()),
)
