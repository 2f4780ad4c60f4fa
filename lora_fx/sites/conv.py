"""Convolution sites: `y = conv(x, W[out, in / groups, *k], b)`, 1-D to 3-D, not transposed.

call_module  nn.Conv1d / nn.Conv2d / nn.Conv3d
functions    conv1d / conv2d / conv3d (int or string padding), convolution (transposed=False):
             ATen ops (export) and `torch.conv2d` (`F.conv2d`, as fx traces it)

branch:  low = conv(x, A[r, in, *k], stride, padding, dilation)   (groups 1)
up = conv(low, B[out, r / groups, 1, ...], groups)         (1x1)
delta:   scale * B @ A per kernel tap; grouped convs have no single delta (no merge, no DoRA)
mixed batch (gathered, groups 1):  one grouped conv over the batch with each row's A, then B
"""

from __future__ import annotations

import torch
import torch.fx
from torch import nn

from lora_fx.math import ops
from lora_fx.math.stack import gathered_conv
from lora_fx.sites.kind import Capabilities, Emit, SiteKind, init_factor_modules
from lora_fx.sites.node_reads import arg, as_tuple, parameter_path, site_name
from lora_fx.sites.site import ConvSpec, Match, Site

__all__ = ["CONV"]

_aten = torch.ops.aten
_CONV_OPS = {
    _aten.conv1d.default: 1,
    _aten.conv2d.default: 2,
    _aten.conv3d.default: 3,
    _aten.conv1d.padding: 1,
    _aten.conv2d.padding: 2,
    _aten.conv3d.padding: 3,
    torch.conv1d: 1,
    torch.conv2d: 2,
    torch.conv3d: 3,
}
_CONVOLUTION_OPS = (_aten.convolution.default,)
_PADDING_OPS = {1: _aten.conv1d.padding, 2: _aten.conv2d.padding, 3: _aten.conv3d.padding}
_CONV_MODULES = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}
_CONV_CLASSES = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def match_conv_module(gm: torch.fx.GraphModule, node: torch.fx.Node) -> Match | None:
    """nn.Conv1d / 2d / 3d (and subclasses) called as a module."""
    if node.op != "call_module" or not node.args:
        return None
    module = gm.get_submodule(node.target)
    dims = next((d for cls, d in _CONV_MODULES.items() if isinstance(module, cls)), None)
    if dims is None:
        return None
    path, x = node.target, node.args[0]
    bias = f"{path}.bias" if getattr(module, "bias", None) is not None else None
    spec = ConvSpec(
        dims=dims,
        kernel_size=tuple(module.kernel_size),
        stride=tuple(module.stride),
        padding=module.padding if isinstance(module.padding, str) else tuple(module.padding),
        dilation=tuple(module.dilation),
        groups=module.groups,
    )
    return Match(
        path,
        "conv",
        node,
        x,
        f"{path}.weight",
        bias,
        module.in_channels,
        module.out_channels,
        conv=spec,
    )


def match_aten_conv(gm: torch.fx.GraphModule, node: torch.fx.Node) -> Match | None:
    """`conv{1,2,3}d(x, W, b, stride, padding, dilation, groups)`, non-transposed `convolution`."""
    if node.op != "call_function":
        return None
    if node.target in _CONVOLUTION_OPS:
        x, w, b, stride, padding, dilation, transposed, _, groups = node.args
        if transposed:
            return None
    elif node.target in _CONV_OPS:
        x, w = node.args[0], node.args[1]
        b = arg(node, 2, "bias")
        stride, padding, dilation, groups = (
            arg(node, i, name, default)
            for i, name, default in (
                (3, "stride", 1),
                (4, "padding", 0),
                (5, "dilation", 1),
                (6, "groups", 1),
            )
        )
    else:
        return None
    weight = parameter_path(gm, w)
    if weight is None:
        return None
    shape = gm.get_parameter(weight).shape
    dims = len(shape) - 2
    spec = ConvSpec(
        dims=dims,
        kernel_size=tuple(shape[2:]),
        stride=as_tuple(stride, dims),
        padding=padding if isinstance(padding, str) else as_tuple(padding, dims),
        dilation=as_tuple(dilation, dims),
        groups=int(groups),
    )
    bias = parameter_path(gm, b)
    in_ch = shape[1] * spec.groups
    name, module = site_name(gm, node, weight)
    return Match(name, "conv", node, x, weight, bias, in_ch, shape[0], conv=spec, module=module)


def factor_shapes(site: Site, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """A `[r, in, *k]`, B `[out, r / groups, 1, ...]`, as PEFT's conv modules hold them."""
    spec = site.conv
    ones = (1,) * spec.dims
    return (r, site.in_features, *spec.kernel_size), (site.out_features, r // spec.groups, *ones)


def new_factors(
    site: Site, r: int, lora_bias: bool, init: bool | str
) -> tuple[nn.Module, nn.Module]:
    """PEFT's `lora_A` (the site's geometry) / `lora_B` (1x1, the site's groups) conv modules."""
    spec, conv = site.conv, _CONV_CLASSES[site.conv.dims]
    lora_a = conv(
        site.in_features, r, spec.kernel_size, spec.stride, spec.padding, spec.dilation, bias=False
    )
    lora_b = conv(r, site.out_features, 1, groups=spec.groups, bias=lora_bias)
    init_factor_modules(lora_a, lora_b, r, init)
    return lora_a, lora_b


def _emit_conv(
    emit: Emit, role: str, site: Site, x: torch.fx.Node, w: torch.fx.Node, groups: int
) -> torch.fx.Node:
    """`conv(x, w)` with the site's stride, padding and dilation, no bias."""
    spec = site.conv
    if isinstance(spec.padding, str):
        args = (x, w, None, list(spec.stride), spec.padding, list(spec.dilation), groups)
        return emit(role, "call_function", _PADDING_OPS[spec.dims], args)
    zeros = [0] * spec.dims
    args = (x, w, None, list(spec.stride), list(spec.padding), list(spec.dilation), False, zeros)
    return emit(role, "call_function", _aten.convolution.default, (*args, groups))


def emit_down(emit: Emit, site: Site, x: torch.fx.Node, a: torch.fx.Node) -> torch.fx.Node:
    """X -> [N, r, *spatial]: A with the site's geometry."""
    return _emit_conv(emit, "lora_a", site, x, a, 1)


def emit_up(
    emit: Emit, site: Site, low: torch.fx.Node, b: torch.fx.Node, bias: torch.fx.Node | None
) -> torch.fx.Node:
    """[N, r, *spatial] -> [N, out, *spatial]: a 1x1 conv with the site's groups."""
    spec = site.conv
    ones, zeros = [1] * spec.dims, [0] * spec.dims
    args = (low, b, bias, ones, zeros, ones, False, zeros, spec.groups)
    return emit("lora_b", "call_function", _aten.convolution.default, args)


def emit_base(emit: Emit, site: Site, x: torch.fx.Node, weight: torch.fx.Node) -> torch.fx.Node:
    """`conv(x, W)` without bias, recomputed (DoRA's base term under dropout)."""
    return _emit_conv(emit, "dora", site, x, weight, site.conv.groups)


def delta(
    site: Site, a: torch.Tensor, b: torch.Tensor, scale: float, shape: tuple[int, ...]
) -> torch.Tensor:
    """`scale * B @ A` per kernel tap, `[out, in, *k]`."""
    return ops.delta_weight("conv", a, b, scale, groups=site.conv.groups)


def fold_factors(site: Site, w: torch.Tensor, a: torch.Tensor, b: torch.Tensor):
    """delta[o, i, *k] = sum_r B[o, r] A[r, i, *k]: one matmul over W's flattened (i, *k)."""
    if site.conv.groups == 1 and w.is_contiguous():
        return w.view(w.shape[0], -1), b.flatten(1), a.flatten(1)
    return None


def gathered(site: Site):
    """The per-row gathered branch of a mixed batch (`math.stack.gathered_conv`), groups 1 only."""
    spec = site.conv
    if spec.groups != 1:
        return None  # B is grouped: a masked branch per slot
    padding = spec.padding if isinstance(spec.padding, str) else list(spec.padding)
    return gathered_conv, (list(spec.stride), padding, list(spec.dilation))


def refuse(site: Site, r: int, use_dora: bool) -> str | None:
    """A grouped conv needs `r % groups == 0` and has no single weight for DoRA to normalise."""
    groups = site.conv.groups
    if r % groups != 0:
        return f"site {site.fqn!r} is a conv with groups={groups}; r={r} must be divisible by it"
    if use_dora and groups > 1:
        return (
            f"use_dora=True is not supported on site {site.fqn!r}: a conv with "
            f"groups={groups} has no single weight to normalise"
        )
    return None


def refuse_merge(site: Site) -> str | None:
    """A grouped conv's delta is not one weight."""
    if site.conv.groups > 1:
        return f"site {site.fqn!r} is a conv with groups={site.conv.groups}; it cannot be merged"
    return None


CONV = SiteKind(
    name="conv",
    label="conv site",
    matchers=(match_conv_module, match_aten_conv),
    holders=("lora_A", "lora_B"),
    factor_suffix=".weight",
    factor_shapes=factor_shapes,
    new_factors=new_factors,
    emit_down=emit_down,
    emit_up=emit_up,
    emit_base=emit_base,
    delta=delta,
    fold_factors=fold_factors,
    magnitude_shape=lambda site: (1, site.out_features, *((1,) * site.conv.dims)),
    can=Capabilities(layouts=("plain",)),
    refuse=refuse,
    refuse_merge=refuse_merge,
    gathered=gathered,
)
