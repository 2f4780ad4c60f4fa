"""How matchers read a node: its arguments, the parameters it reads, the module that owns it."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx

from lora_fx.core.state import lora_tag
from lora_fx.sites.modules import is_site_module, is_site_module_path

__all__ = [
    "WEIGHT_VIEW_OPS",
    "arg",
    "as_tuple",
    "base_weight_read",
    "feeds_only",
    "parameter_path",
    "site_name",
    "weight_getter",
    "weight_source",
]

_aten = torch.ops.aten
# Ops that transpose a 2-D weight between its read and the op using it (`x @ W.T`, `mm(x, t(W))`),
# in both graph flavours: ATen ops, and fx's Python-level calls and `W.T` / `W.mT` attributes.
_TRANSPOSE_OPS = (
    _aten.t.default,
    _aten.numpy_T.default,
    _aten.permute.default,
    _aten.transpose.int,
    torch.t,
    torch.transpose,
    torch.permute,
)
_TRANSPOSE_METHODS = ("t", "transpose", "permute")
_TRANSPOSE_ATTRS = ("T", "mT")
# Dtype casts of a weight before use (DeepSeek-V3's router: `F.linear(x.float(), W.float())`).
_CAST_OPS = (_aten._to_copy.default, _aten.to.dtype, _aten.to.dtype_layout)
_CAST_METHODS = ("to", "float", "half", "bfloat16", "double", "type")
WEIGHT_VIEW_OPS = _TRANSPOSE_OPS + _CAST_OPS  # what may stand between a weight and its site


def site_name(gm: torch.fx.GraphModule, node: torch.fx.Node, weight: str) -> tuple[str, bool]:
    """The site's name, and whether it is a site module's path (what PEFT can target).

    The name is the path of the site module the op runs in (export's stack), else the weight's
    path. The innermost module of the stack names the site when it is a site module by type (the
    capture record, `sites/modules.py`): a tied weight read by an embedding subclass and by the
    output linear gives two sites, as in PEFT, whatever the weight is called.
    """
    stack = node.meta.get("nn_module_stack")
    if stack:
        path, cls = list(stack.values())[-1]
        if is_site_module(gm, path, cls):
            return path, True
    name = weight.rsplit(".", 1)[0] if weight.endswith(".weight") else weight
    # An fx graph's functional op (Conv1D's torch.addmm) has no stack: its weight's module path.
    return name, bool(is_site_module_path(gm, name))


def base_weight_read(arg: Any) -> Any:
    """`arg`, or under the "weight" layout's `W + scale * B @ A` nodes the read of `W` itself."""
    while isinstance(arg, torch.fx.Node) and (lora_tag(arg) or {}).get("role") == "add":
        arg = arg.args[0]
    return arg


def parameter_path(gm: torch.fx.GraphModule, arg: Any) -> str | None:
    """The attribute path of `arg` if it is a get_attr node of an nn.Parameter."""
    if not isinstance(arg, torch.fx.Node) or arg.op != "get_attr":
        return None
    try:
        gm.get_parameter(arg.target)
    except AttributeError:
        return None
    return arg.target


def weight_source(gm: torch.fx.GraphModule, read: Any) -> tuple[str, bool] | None:
    """The 2-D parameter a weight argument reads, and whether it arrives transposed.

    Walks back through the "weight" layout's adds, dtype casts and 2-D transposes (any order);
    None when `read` is not such a view of a 2-D parameter.
    """
    transposed = False
    while isinstance(read, torch.fx.Node):
        read = base_weight_read(read)
        path = parameter_path(gm, read)
        if path is not None:
            return (path, transposed) if gm.get_parameter(path).dim() == 2 else None
        step = _view_step(read)
        if step is None:
            return None
        read, flips = step
        transposed ^= flips
    return None


def feeds_only(node: torch.fx.Node, targets: Any) -> bool:
    """Whether `node` is one of `targets`, or a weight view (cast, transpose) feeding only them."""
    if node in targets:
        return True
    return (
        _view_step(node) is not None
        and bool(node.users)
        and all(feeds_only(u, targets) for u in node.users)
    )


def weight_getter(node: torch.fx.Node, weight: str) -> tuple[torch.fx.Node, torch.fx.Node] | None:
    """`(consumer, get_attr)`: where the site op `node` reads `weight`, through its views."""
    for source in node.all_input_nodes:
        if source.op == "get_attr" and source.target == weight:
            return node, source
        if _view_step(source) is not None:
            found = weight_getter(source, weight)
            if found is not None:
                return found
    return None


def _view_step(node: torch.fx.Node) -> tuple[Any, bool] | None:
    """`(input, transposes)` of a cast or a 2-D transpose node, else None."""
    if not node.args:
        return None
    source = node.args[0]
    if node.op == "call_function":
        if node.target in _CAST_OPS:
            return source, False
        if node.target is getattr and len(node.args) == 2:
            return (source, True) if node.args[1] in _TRANSPOSE_ATTRS else None
        if node.target in _TRANSPOSE_OPS:
            return (source, True) if _swaps_two_dims(node.args[1:]) else None
    if node.op == "call_method":
        if node.target in _CAST_METHODS:
            return source, False
        if node.target in _TRANSPOSE_METHODS:
            return (source, True) if _swaps_two_dims(node.args[1:]) else None
    return None


def _swaps_two_dims(dims: tuple[Any, ...]) -> bool:
    """Transpose arguments that swap a 2-D tensor's dims: (), ([1, 0]), (0, 1), (-2, -1)."""
    if not dims:
        return True  # t(W), numpy_T(W)
    if len(dims) == 1:  # permute(W, [1, 0])
        return isinstance(dims[0], (list, tuple)) and [d % 2 for d in dims[0]] == [1, 0]
    if len(dims) == 2 and all(isinstance(d, int) for d in dims):  # transpose(W, 0, 1)
        return sorted(d % 2 for d in dims) == [0, 1]
    if all(isinstance(d, int) for d in dims):  # W.permute(1, 0)
        return [d % 2 for d in dims] == [1, 0]
    return False


def arg(node: torch.fx.Node, index: int, name: str, default: Any = None) -> Any:
    """A call argument by position or keyword."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def as_tuple(value: Any, dims: int) -> tuple[int, ...]:
    """Expand an int or a 1-list to a dims-tuple."""
    if isinstance(value, int):
        return (value,) * dims
    value = tuple(int(v) for v in value)
    return value * dims if len(value) == 1 else value
