"""How matchers read a node: its arguments, the parameters it reads, the module that owns it."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx

from lora_fx.core.state import lora_tag

__all__ = ["arg", "as_tuple", "base_weight_read", "is_2d_transpose", "parameter_path", "site_name"]

# Module classes whose path names a site in export's nn_module_stack (subclasses of these torch
# classes keep their own class name in the stack; see `site_name`).
_SITE_CLASS_NAMES = ("Linear", "Conv1D", "Conv1d", "Conv2d", "Conv3d", "Embedding")


def site_name(node: torch.fx.Node, weight: str) -> str:
    """The owning Linear/Conv/Embedding module's path in export's stack, else the weight's path."""
    stack = node.meta.get("nn_module_stack")
    if stack:
        path, cls = list(stack.values())[-1]
        cls_name = cls.rsplit(".", 1)[-1] if isinstance(cls, str) else getattr(cls, "__name__", "")
        if path and cls_name in _SITE_CLASS_NAMES:
            return path
    return weight.rsplit(".", 1)[0] if weight.endswith(".weight") else weight


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


def is_2d_transpose(node: torch.fx.Node) -> bool:
    """t(P), permute(P, [1, 0]) or transpose(P, 0, 1)."""
    if node.target == torch.ops.aten.permute.default:
        return list(node.args[1]) == [1, 0]
    if node.target == torch.ops.aten.transpose.int:
        return sorted(d % 2 for d in node.args[1:3]) == [0, 1]
    return True


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
