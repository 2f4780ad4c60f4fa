"""Find LoRA sites: the linear, conv and embedding ops of a graph that read a parameter weight.

A **site** is named by the module path PEFT would use (`model.layers.0.self_attn.q_proj`): the
`call_module` target, or for ATen graphs the innermost module in export's `nn_module_stack` when
that module is a Linear/Conv/Embedding/Conv1D, else the weight's path without `.weight`. Naming by
module rather than by weight keeps tied weights apart: GPT-2's `wte` embedding and `lm_head` read
one tensor but are two sites, as in PEFT.

Matchers (first match wins), one per op family:
1. `call_module` nn.Linear, transformers Conv1D, nn.Conv1d/2d/3d, nn.Embedding;
2. `aten.linear(x, W[out, in], b)`;
3. `aten.addmm(b, x, W)` / `aten.mm(x, W)` with W a parameter stored `[in, out]` (GPT-2's Conv1D),
   or `W = t(P)` with P stored `[out, in]`;
4. `aten.conv1d/2d/3d`, `aten.convolution` (not transposed);
5. `aten.embedding(W, ids)`;
6. `quant.linear_4bit` / `quant.linear_8bit` (the `quantize` pass's bitsandbytes ops).
Sites of kind "param" (`target_parameters`) are found by parameter name (`_param_sites.py`).
A module called twice (the same weight at two nodes with one name) is one site with two nodes. Nodes
created by lora_fx are never sites.
"""

from __future__ import annotations

import difflib
import re
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
from torch import nn

from lora_fx.config import LoraConfig
from lora_fx.core.state import CAPTURE_META, lora_tag
from lora_fx.errors import NoTargetMatchedError, UnsupportedSiteError
from lora_fx.math import quant
from lora_fx.sites import params as _param_sites
from lora_fx.sites.site import ConvSpec, Site

__all__ = ["ConvSpec", "Site", "all_sites", "find_sites", "match_modules_to_save"]

_LINEAR_OPS = (torch.ops.aten.linear.default, torch._C._nn.linear, nn.functional.linear)
_MM_OPS = (torch.ops.aten.addmm.default, torch.ops.aten.mm.default)
_TRANSPOSE_OPS = (
    torch.ops.aten.t.default,
    torch.ops.aten.permute.default,
    torch.ops.aten.transpose.int,
)
_CONV_OPS = {
    torch.ops.aten.conv1d.default: 1,
    torch.ops.aten.conv2d.default: 2,
    torch.ops.aten.conv3d.default: 3,
    torch.ops.aten.conv1d.padding: 1,
    torch.ops.aten.conv2d.padding: 2,
    torch.ops.aten.conv3d.padding: 3,
}
_CONVOLUTION_OPS = (torch.ops.aten.convolution.default,)
_EMBEDDING_OPS = (torch.ops.aten.embedding.default,)
_QUANT_LINEAR_OPS = (quant.linear_4bit, quant.linear_8bit)
_CONV_MODULES = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}
# Module classes whose path names a site in export's nn_module_stack.
_SITE_CLASS_NAMES = ("Linear", "Conv1D", "Conv1d", "Conv2d", "Conv3d", "Embedding")


@dataclass(frozen=True)
class _Match:
    """One node's match, before nodes with the same name are grouped into a Site."""

    fqn: str
    kind: str
    node: torch.fx.Node
    input: torch.fx.Node
    weight: str
    bias: str | None
    in_features: int
    out_features: int
    transposed: bool = False
    conv: ConvSpec | None = None
    padding_idx: int | None = None


def all_sites(gm: torch.fx.GraphModule) -> dict[str, Site]:
    """Every site in the graph, by name, in graph order."""
    grouped: dict[str, list[_Match]] = {}
    for node in gm.graph.nodes:
        if lora_tag(node) is not None:
            continue
        for matcher in _MATCHERS:
            match = matcher(gm, node)
            if match is not None:
                grouped.setdefault(match.fqn, []).append(match)
                break
    sites = {fqn: _group(fqn, matches) for fqn, matches in grouped.items()}
    sites.update(_param_sites.recorded_param_sites(gm))
    return sites


def find_sites(gm: torch.fx.GraphModule, cfg: LoraConfig) -> list[Site]:
    """The sites `cfg` selects, following PEFT's matching rules.

    Raises:
        NoTargetMatchedError: `target_modules` selects no site (a few candidate names are listed).
    """
    sites = all_sites(gm)
    targets = cfg.target_parameters
    params = _param_sites.find_param_sites(gm, targets) if targets else []
    if cfg.target_modules is None and params:
        sites = {}
    elif cfg.target_modules is None:
        raise NoTargetMatchedError(
            "target_modules is None; name the sites to adapt, e.g. "
            f"target_modules={_short_names(sites)[:4]!r} or 'all-linear'"
        )
    output_layer = gm.meta.get(CAPTURE_META, {}).get("output_layer")
    excluded_any = False
    chosen = []
    for fqn, site in sites.items():
        if site.kind == "param":
            continue  # parameter sites are chosen by target_parameters only
        if cfg.is_all_linear:
            wanted = site.kind == "linear" and fqn != output_layer
        else:
            wanted = _target_matches(cfg, fqn)
        if not wanted or _in_modules_to_save(cfg, fqn):
            continue
        if cfg.exclude_modules and _name_matches(cfg.exclude_modules, fqn):
            excluded_any = True
            continue
        chosen.append(site)
    if cfg.exclude_modules and not excluded_any:
        warnings.warn(f"exclude_modules={cfg.exclude_modules!r} matched no site", stacklevel=3)
    chosen += params
    if chosen and isinstance(cfg.target_modules, (list, tuple, set)) and not cfg.is_all_linear:
        _warn_unmatched_entries(cfg.target_modules, sites)
    if not chosen:
        kinds = sorted({s.kind for s in sites.values()})
        raise NoTargetMatchedError(
            f"target_modules={cfg.target_modules!r} matched no site "
            f"(layers_to_transform={cfg.layers_to_transform!r}); "
            f"sites in this graph ({', '.join(kinds)}): "
            f"{list(sites)[:6]!r}{' ...' if len(sites) > 6 else ''}"
        )
    for site in chosen:
        _check_site(site, cfg)
        _check_weight(gm, site, cfg)
    return chosen


def match_modules_to_save(gm: torch.fx.GraphModule, names: list[str]) -> list[str]:
    """Module paths that `modules_to_save` selects (PEFT matches with a plain `endswith`).

    Raises:
        NoTargetMatchedError: A name matches no module that holds parameters.
    """
    holders = [
        path
        for path, module in gm.named_modules()
        if path
        and any(True for _ in module.parameters(recurse=False))
        and ".lora_" not in path
        and ".modules_to_save." not in path
    ]
    chosen: list[str] = []
    for name in names:
        hits = [p for p in holders if p.endswith(name)]
        if not hits:
            # A container whose children hold the parameters (a classifier head) also counts.
            hits = [p for p, _ in gm.named_modules() if p and p.endswith(name) and p not in chosen]
        if not hits:
            raise NoTargetMatchedError(
                f"modules_to_save entry {name!r} matched no module; "
                f"modules with parameters: {holders[:6]!r}"
            )
        chosen += [h for h in hits if h not in chosen]
    # A module inside another chosen one travels with it.
    return [p for p in chosen if not any(p.startswith(q + ".") for q in chosen)]


def _check_site(site: Site, cfg: LoraConfig) -> None:
    """Reject a site the config cannot adapt, naming it."""
    r = cfg.rank_for(site.fqn)
    if site.conv is not None and r % site.conv.groups != 0:
        raise UnsupportedSiteError(
            f"site {site.fqn!r} is a conv with groups={site.conv.groups}; "
            f"r={r} must be divisible by it"
        )
    if cfg.lora_bias and site.kind == "embedding":
        raise UnsupportedSiteError(
            f"lora_bias=True is not supported on embedding site {site.fqn!r}"
        )
    if site.kind == "param":
        _check_param_site(site, cfg)
        return
    if cfg.use_dora and site.conv is not None and site.conv.groups > 1:
        raise UnsupportedSiteError(
            f"use_dora=True is not supported on site {site.fqn!r}: a conv with "
            f"groups={site.conv.groups} has no single weight to normalise"
        )
    init = cfg.init_lora_weights
    if isinstance(init, str) and init != "gaussian" and site.kind != "linear":
        raise UnsupportedSiteError(
            f"init_lora_weights={init!r} needs a linear site; {site.fqn!r} is a {site.kind} site "
            "(use True, False or 'gaussian' there, or exclude it)"
        )
    if init == "orthogonal" and r % 2:
        raise UnsupportedSiteError(
            f"init_lora_weights='orthogonal' needs an even rank; site {site.fqn!r} has r={r}"
        )
    if isinstance(init, str) and init not in ("gaussian", "orthogonal"):
        smallest = min(site.in_features, site.out_features)
        if r > smallest:
            raise UnsupportedSiteError(
                f"init_lora_weights={init!r} takes r singular / QR directions of the weight; site "
                f"{site.fqn!r} ({site.out_features}x{site.in_features}) has only {smallest}, "
                f"r={r} (PEFT silently shrinks the rank)"
            )


def _check_weight(gm: torch.fx.GraphModule, site: Site, cfg: LoraConfig) -> None:
    """A non-float base weight must be a bitsandbytes type lora_fx can read, on a linear site."""
    weight = gm.get_parameter(site.weight)
    kind = quant.quant_type(weight)
    if kind is None and (weight.is_floating_point() or weight.is_complex()):
        return
    init = cfg.init_lora_weights
    if kind is not None and isinstance(init, str) and init.startswith(("pissa", "loftq")):
        raise UnsupportedSiteError(
            f"init_lora_weights={init!r} needs the full-precision weight of site {site.fqn!r}, "
            f"which is {kind}; inject before lora_fx.quantize (as PEFT asks)"
        )
    supported = f"supported quantized sites: linear with {list(quant.SUPPORTED_QUANT_TYPES)}"
    if kind is None:
        raise UnsupportedSiteError(
            f"site {site.fqn!r} has a {weight.dtype} weight of type {type(weight).__name__}, "
            f"not a bitsandbytes one; {supported} (bitsandbytes Linear4bit / Linear8bitLt)"
        )
    if kind not in quant.SUPPORTED_QUANT_TYPES or site.kind != "linear":
        raise UnsupportedSiteError(
            f"site {site.fqn!r} is a {site.kind} site with a {kind!r} quantized weight; {supported}"
        )


def _check_param_site(site: Site, cfg: LoraConfig) -> None:
    """What a parameter site cannot carry (PEFT's ParamWrapper refuses the same)."""
    refused = {
        "use_dora=True": cfg.use_dora,
        "lora_bias=True": cfg.lora_bias,
        f"lora_dropout={cfg.lora_dropout}": cfg.lora_dropout > 0,
        f"init_lora_weights={cfg.init_lora_weights!r}": cfg.init_lora_weights
        not in (True, False, "gaussian"),
    }
    for what, bad in refused.items():
        if bad:
            raise UnsupportedSiteError(
                f"{what} is not supported on target_parameters site {site.fqn!r} "
                f"(parameter {site.weight!r}): the parameter is used directly, not as `W x`"
            )


def _target_matches(cfg: LoraConfig, fqn: str) -> bool:
    """PEFT's `check_target_module_exists` for target_modules and layers_to_transform."""
    targets = cfg.target_modules
    if isinstance(targets, str):
        return re.fullmatch(targets, fqn) is not None
    if fqn in targets:
        return True  # an exact name is taken as it is, whatever layers_to_transform says (as PEFT)
    if not any(fqn.endswith(f".{t}") for t in targets):
        return False
    layers = cfg.layers_to_transform
    if layers is None or (isinstance(layers, list) and not layers):
        return True
    index = _layer_index(fqn, cfg.layers_pattern)
    if index is None:
        return False
    return index == layers if isinstance(layers, int) else index in layers


def _layer_index(fqn: str, layers_pattern: list[str] | str | None) -> int | None:
    """The first numbered path segment, optionally after one of `layers_pattern`."""
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", fqn)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
        match = None
        for pattern in patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", fqn)
            if match:
                break
    return int(match["idx"]) if match else None


def _name_matches(names: list[str] | str, fqn: str) -> bool:
    """A str is a full-match regex; a list entry matches exactly or as a dotted suffix."""
    if isinstance(names, str):
        return re.fullmatch(names, fqn) is not None
    return fqn in names or any(fqn.endswith(f".{n}") for n in names)


def _in_modules_to_save(cfg: LoraConfig, fqn: str) -> bool:
    """PEFT never puts an adapter on (or inside) a modules_to_save module."""
    return any(re.match(rf"(^|.*\.){m}($|\..*)", fqn) for m in cfg.modules_to_save or ())


def _warn_unmatched_entries(targets: Iterable[str], sites: dict[str, Site]) -> None:
    """A typo in one of several names (`q_prj`) would silently adapt only the others: say so."""
    unmatched = [t for t in targets if not any(_name_matches([t], fqn) for fqn in sites)]
    if not unmatched:
        return
    names = _short_names(sites)
    hints = {t: difflib.get_close_matches(t.rsplit(".", 1)[-1], names, n=2) for t in unmatched}
    said = ", ".join(f"{t!r} (did you mean {h}?)" if h else repr(t) for t, h in hints.items())
    warnings.warn(
        f"target_modules entries matched no site and were ignored: {said}; "
        f"site names in this graph end in: {names[:8]!r}",
        stacklevel=4,
    )


def _short_names(sites: dict[str, Site]) -> list[str]:
    """Distinct last name components of sites, for suggestions."""
    return list(dict.fromkeys(fqn.rsplit(".", 1)[-1] for fqn in sites))


def _group(fqn: str, matches: list[_Match]) -> Site:
    """Merge the matches of one name; all must agree on kind, weight and shape."""
    first = matches[0]
    for other in matches[1:]:
        if (other.kind, other.weight, other.in_features, other.out_features) != (
            first.kind,
            first.weight,
            first.in_features,
            first.out_features,
        ):
            raise UnsupportedSiteError(
                f"site {fqn!r} is reached by ops on different weights: {first.node.format_node()} "
                f"and {other.node.format_node()}"
            )
    return Site(
        fqn=fqn,
        kind=first.kind,
        nodes=tuple(m.node for m in matches),
        inputs=tuple(m.input for m in matches),
        weight=first.weight,
        bias=first.bias,
        in_features=first.in_features,
        out_features=first.out_features,
        transposed=first.transposed,
        conv=first.conv,
        padding_idx=first.padding_idx,
    )


# ---------------------------------------------------------------- matchers: Node -> _Match | None


def _match_call_module(gm: torch.fx.GraphModule, node: torch.fx.Node) -> _Match | None:
    """nn.Linear, transformers Conv1D, nn.Conv1d/2d/3d and nn.Embedding called as modules."""
    if node.op != "call_module" or not node.args:
        return None
    module = gm.get_submodule(node.target)
    path, x = node.target, node.args[0]
    bias = f"{path}.bias" if getattr(module, "bias", None) is not None else None
    if isinstance(module, nn.Linear):
        return _Match(
            path, "linear", node, x, f"{path}.weight", bias, module.in_features, module.out_features
        )
    if type(module).__name__ == "Conv1D" and type(module).__module__.startswith("transformers"):
        rows, cols = module.weight.shape  # Conv1D stores [in, out]
        return _Match(path, "linear", node, x, f"{path}.weight", bias, rows, cols, transposed=True)
    if type(module) in _CONV_MODULES:
        spec = ConvSpec(
            dims=_CONV_MODULES[type(module)],
            kernel_size=tuple(module.kernel_size),
            stride=tuple(module.stride),
            padding=module.padding if isinstance(module.padding, str) else tuple(module.padding),
            dilation=tuple(module.dilation),
            groups=module.groups,
        )
        return _Match(
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
    if isinstance(module, nn.Embedding):
        return _Match(
            path,
            "embedding",
            node,
            x,
            f"{path}.weight",
            None,
            module.num_embeddings,
            module.embedding_dim,
            padding_idx=module.padding_idx,
        )
    return None


def _match_linear(gm: torch.fx.GraphModule, node: torch.fx.Node) -> _Match | None:
    """`linear(x, W[out, in], b)` on a parameter weight."""
    if node.op != "call_function" or node.target not in _LINEAR_OPS:
        return None
    weight = _parameter_path(gm, _base_weight_read(_arg(node, 1, "weight")))
    if weight is None:
        return None
    out_f, in_f = gm.get_parameter(weight).shape
    bias = _parameter_path(gm, _arg(node, 2, "bias"))
    return _Match(_site_name(node, weight), "linear", node, node.args[0], weight, bias, in_f, out_f)


def _match_mm(gm: torch.fx.GraphModule, node: torch.fx.Node) -> _Match | None:
    """`addmm(b, x, W)` / `mm(x, W)` with W a parameter `[in, out]` or `t(P)` of one `[out, in]`."""
    if node.op != "call_function" or node.target not in _MM_OPS or node.kwargs:
        return None
    is_addmm = node.target == torch.ops.aten.addmm.default
    x, w_arg = (node.args[1], node.args[2]) if is_addmm else (node.args[0], node.args[1])
    w_arg = _base_weight_read(w_arg)
    transposed = True
    if (
        isinstance(w_arg, torch.fx.Node)
        and w_arg.op == "call_function"
        and w_arg.target in _TRANSPOSE_OPS
    ):
        if not _is_2d_transpose(w_arg):
            return None
        w_arg, transposed = w_arg.args[0], False
    weight = _parameter_path(gm, w_arg)
    if weight is None or gm.get_parameter(weight).dim() != 2:
        return None
    rows, cols = gm.get_parameter(weight).shape
    in_f, out_f = (rows, cols) if transposed else (cols, rows)
    bias = _parameter_path(gm, node.args[0]) if is_addmm else None
    return _Match(
        _site_name(node, weight), "linear", node, x, weight, bias, in_f, out_f, transposed
    )


def _match_conv(gm: torch.fx.GraphModule, node: torch.fx.Node) -> _Match | None:
    """`conv{1,2,3}d(x, W, b, stride, padding, dilation, groups)`, non-transposed `convolution`."""
    if node.op != "call_function":
        return None
    if node.target in _CONVOLUTION_OPS:
        x, w, b, stride, padding, dilation, transposed, _, groups = node.args
        if transposed:
            return None
    elif node.target in _CONV_OPS:
        x, w = node.args[0], node.args[1]
        b = _arg(node, 2, "bias")
        stride, padding, dilation, groups = (
            _arg(node, i, name, default)
            for i, name, default in (
                (3, "stride", 1),
                (4, "padding", 0),
                (5, "dilation", 1),
                (6, "groups", 1),
            )
        )
    else:
        return None
    weight = _parameter_path(gm, w)
    if weight is None:
        return None
    shape = gm.get_parameter(weight).shape
    dims = len(shape) - 2
    spec = ConvSpec(
        dims=dims,
        kernel_size=tuple(shape[2:]),
        stride=_tuple(stride, dims),
        padding=padding if isinstance(padding, str) else _tuple(padding, dims),
        dilation=_tuple(dilation, dims),
        groups=int(groups),
    )
    bias = _parameter_path(gm, b)
    in_ch = shape[1] * spec.groups
    return _Match(
        _site_name(node, weight), "conv", node, x, weight, bias, in_ch, shape[0], conv=spec
    )


def _match_embedding(gm: torch.fx.GraphModule, node: torch.fx.Node) -> _Match | None:
    """`embedding(W[num, dim], ids, padding_idx)` on a parameter weight."""
    if node.op != "call_function" or node.target not in _EMBEDDING_OPS:
        return None
    weight = _parameter_path(gm, node.args[0])
    if weight is None:
        return None
    num, dim = gm.get_parameter(weight).shape
    padding_idx = _arg(node, 2, "padding_idx", -1)
    return _Match(
        _site_name(node, weight),
        "embedding",
        node,
        node.args[1],
        weight,
        None,
        num,
        dim,
        padding_idx=None if padding_idx == -1 else padding_idx,
    )


def _match_quant_linear(gm: torch.fx.GraphModule, node: torch.fx.Node) -> _Match | None:
    """`quant.linear_4bit(x, W, b)` / `quant.linear_8bit(x, W, b)` made by the `quantize` pass."""
    if node.op != "call_function" or node.target not in _QUANT_LINEAR_OPS:
        return None
    weight = _parameter_path(gm, node.args[1])
    if weight is None:
        return None
    out_f, in_f = quant.logical_shape(gm.get_parameter(weight))
    bias = _parameter_path(gm, _arg(node, 2, "bias"))
    return _Match(_site_name(node, weight), "linear", node, node.args[0], weight, bias, in_f, out_f)


_MATCHERS: tuple[Callable[[torch.fx.GraphModule, torch.fx.Node], _Match | None], ...] = (
    _match_call_module,
    _match_quant_linear,
    _match_linear,
    _match_mm,
    _match_conv,
    _match_embedding,
)


def _site_name(node: torch.fx.Node, weight: str) -> str:
    """The owning Linear/Conv/Embedding module's path in export's stack, else the weight's path."""
    stack = node.meta.get("nn_module_stack")
    if stack:
        path, cls = list(stack.values())[-1]
        cls_name = cls.rsplit(".", 1)[-1] if isinstance(cls, str) else getattr(cls, "__name__", "")
        if path and cls_name in _SITE_CLASS_NAMES:
            return path
    return weight.rsplit(".", 1)[0] if weight.endswith(".weight") else weight


def _base_weight_read(arg: Any) -> Any:
    """`arg`, or under the "weight" layout's `W + scale * B @ A` nodes the read of `W` itself."""
    while isinstance(arg, torch.fx.Node) and (lora_tag(arg) or {}).get("role") == "add":
        arg = arg.args[0]
    return arg


def _parameter_path(gm: torch.fx.GraphModule, arg: Any) -> str | None:
    """The attribute path of `arg` if it is a get_attr node of an nn.Parameter."""
    if not isinstance(arg, torch.fx.Node) or arg.op != "get_attr":
        return None
    try:
        gm.get_parameter(arg.target)
    except AttributeError:
        return None
    return arg.target


def _is_2d_transpose(node: torch.fx.Node) -> bool:
    """t(P), permute(P, [1, 0]) or transpose(P, 0, 1)."""
    if node.target == torch.ops.aten.permute.default:
        return list(node.args[1]) == [1, 0]
    if node.target == torch.ops.aten.transpose.int:
        return sorted(d % 2 for d in node.args[1:3]) == [0, 1]
    return True


def _arg(node: torch.fx.Node, index: int, name: str, default: Any = None) -> Any:
    """A call argument by position or keyword."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _tuple(value: Any, dims: int) -> tuple[int, ...]:
    """Expand an int or a 1-list to a dims-tuple."""
    if isinstance(value, int):
        return (value,) * dims
    value = tuple(int(v) for v in value)
    return value * dims if len(value) == 1 else value
