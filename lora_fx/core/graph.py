"""Graph and module-tree mechanics shared by the passes: attribute paths, owned modules."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

import torch
import torch.fx
from torch import nn

from lora_fx.core import codegen
from lora_fx.core.state import LoraState

__all__ = [
    "cleanup",
    "deferred_cleanup",
    "delete_attr",
    "delete_if_empty",
    "get_attr",
    "own_module",
    "replace_with_call",
    "set_module",
    "tensor_readers",
    "write_buffer",
]


_DEFER = "lora_fx_defer_cleanup"


def cleanup(gm: torch.fx.GraphModule) -> None:
    """Check the graph and regenerate its code (unless a composite pass defers it).

    No blanket dead-code elimination: the user's graph keeps its own unused nodes (export's guards);
    passes erase exactly the nodes they created.
    """
    if gm.meta.get(_DEFER):
        return
    gm.graph.lint()
    codegen.install(gm)
    gm.recompile()


@contextlib.contextmanager
def deferred_cleanup(gm: torch.fx.GraphModule) -> Iterator[None]:
    """Run several passes with one lint + recompile at the end.

    Code generation dominates on big graphs: merge_and_unload of a 32-layer Llama spent 2/3 of its
    time regenerating code twice.
    """
    outer = gm.meta.get(_DEFER, False)
    gm.meta[_DEFER] = True
    try:
        yield
    finally:
        gm.meta[_DEFER] = outer
        cleanup(gm)


def get_attr(gm: nn.Module, path: str) -> Any:
    """The object at a dotted attribute path."""
    obj: Any = gm
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def own_module(gm: torch.fx.GraphModule, path: str, state: LoraState) -> nn.Module:
    """The module at `path`, made safe to add children to, creating empty containers on the way.

    `symbolic_trace` puts the user's own leaf modules (nn.Linear, ...) into the GraphModule, so
    adding `lora_A` to them would change the user's eager model. The first time a path is touched,
    the leaf is replaced by a shallow copy that shares its parameters and buffers but has its own
    child list.
    """
    parent: nn.Module = gm
    parts = path.split(".") if path else []
    for i, part in enumerate(parts):
        child = getattr(parent, part, None)
        if child is None:
            if i and ".".join(parts[:i]) not in state.owned_modules:
                # a new container under the user's module (fx leaf): own that module first
                parent = own_module(gm, ".".join(parts[:i]), state)
            child = nn.Module()
            parent.add_module(part, child)
            state.owned_modules.add(".".join(parts[: i + 1]))
        elif not isinstance(child, nn.Module):
            raise TypeError(
                f"cannot put LoRA modules under {path!r}: {part!r} is a {type(child).__name__}"
            )
        parent = child
    if path and path not in state.owned_modules:
        clone = copy.copy(parent)
        clone._modules = dict(parent._modules)
        clone._parameters = dict(parent._parameters)
        clone._buffers = dict(parent._buffers)
        owner = get_attr(gm, path.rsplit(".", 1)[0]) if "." in path else gm
        setattr(owner, parts[-1], clone)
        state.owned_modules.add(path)
        parent = clone
    return parent


def replace_with_call(
    node: torch.fx.Node, op: Any, args: tuple, kwargs: dict | None = None
) -> torch.fx.Node:
    """Put `op(*args, **kwargs)` in `node`'s place (a module call opened into a function)."""
    graph = node.graph
    with graph.inserting_before(node):
        new = graph.call_function(op, args, kwargs or {})
    new.meta.update(node.meta)  # site names come from nn_module_stack
    node.replace_all_uses_with(new)
    graph.erase_node(node)
    return new


def write_buffer(module: nn.Module, name: str, values: torch.Tensor) -> None:
    """`values` into the non-persistent buffer `name`, in place when shape, dtype and device fit.

    In place keeps the same tensor, so a compiled graph reading it is reused; else a new buffer.
    """
    current = module._buffers.get(name)
    if (
        current is not None
        and current.shape == values.shape
        and current.dtype == values.dtype
        and current.device == values.device
    ):
        current.copy_(values)
    else:
        module.register_buffer(name, values, persistent=False)


def set_module(gm: nn.Module, path: str, module: nn.Module) -> None:
    """Put `module` at `path` (parents must exist)."""
    owner, _, name = path.rpartition(".")
    setattr(get_attr(gm, owner) if owner else gm, name, module)


def delete_attr(gm: nn.Module, path: str) -> bool:
    """Remove a submodule or parameter by path; True if something was there."""
    owner_path, _, name = path.rpartition(".")
    try:
        owner = get_attr(gm, owner_path) if owner_path else gm
    except AttributeError:
        return False
    if not hasattr(owner, name):
        return False
    delattr(owner, name)
    return True


def delete_if_empty(gm: nn.Module, path: str) -> bool:
    """Remove a bare `nn.Module` container with nothing left in it; True if removed."""
    try:
        module = get_attr(gm, path)
    except AttributeError:
        return False
    if type(module) is not nn.Module or module._modules or module._parameters or module._buffers:
        return False
    return delete_attr(gm, path)


def tensor_readers(gm: torch.fx.GraphModule) -> dict[int, list[torch.fx.Node]]:
    """`id(tensor)` -> nodes reading it: used get_attr nodes, and call_module nodes of its module.

    One pass over the graph; callers build it once per pass, not once per site.
    """
    readers: dict[int, list[torch.fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.users:
            readers.setdefault(id(get_attr(gm, node.target)), []).append(node)
        elif node.op == "call_module":
            for param in gm.get_submodule(node.target).parameters(recurse=False):
                readers.setdefault(id(param), []).append(node)
    return readers
