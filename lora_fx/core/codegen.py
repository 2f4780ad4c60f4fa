"""lora_fx's generated forward code: dict reads of parameters, bound ATen ops, fx-leaf functions.

fx emits a `get_attr` node as a chain of attribute reads,
`getattr(self.model.layers, "0").self_attn.q_proj.lora_A.default.weight`: each hop fails the normal
attribute lookup and lands in `nn.Module.__getattr__` (Python). Measured in eager inference of a
4-layer Llama at 128 tokens, the two chains a LoRA site adds cost 7-8 % of the forward, as much
as its rank-r GEMMs. `attr_at(self, ("model", "layers", "0", ...))` walks the same live module
tree through its `_modules` / `_parameters` / `_buffers` dicts in a few hundred nanoseconds.

Nothing is cached: a module or parameter replaced in the tree is seen on the next call, exactly
as the chain would see it, and the graph keeps its `get_attr` nodes (passes, exporters and
`torch.fx.Interpreter` read those). Under torch.compile / torch.export the read is the plain
`getattr` chain dynamo already understands.

ATen overloads are called through globals bound to them (`_lora_fx_op_aten_linear_default(...)`
instead of `torch.ops.aten.linear.default(...)`: 0.3 µs a call less). The code also calls
lora_fx's graph functions (`fused_ops.add_lora`, `stack.gathered_linear`,
input checks, ...) through `as_fx_leaf` wrappers: their bodies branch on the grad mode, dtypes or
token counts, so a `torch.fx.symbolic_trace` of the GraphModule (FX passes, FX graph mode
quantization) would run them on Proxies and fail; wrapped, each call records one node, as
`torch.fx.wrap` does for a module's own globals.
"""

from __future__ import annotations

import functools
import importlib
import re
import types
from typing import Any

import torch
import torch.fx
from torch.fx import _symbolic_trace
from torch.fx.graph import CodeGen, PythonCode, _PyTreeCodeGen

__all__ = ["as_fx_leaf", "attr_at", "install"]

_NAME = "_lora_fx_attr_at"
_MISSING = object()


def attr_at(root: torch.nn.Module, path: tuple[str, ...]) -> Any:
    """`root.<path>`, read through the modules' own dicts (what `Module.__getattr__` reads).

    A parameter, buffer or submodule; anything else (a plain attribute) the usual way.
    """
    if torch.compiler.is_compiling():
        return functools.reduce(getattr, path, root)
    obj = root
    try:
        for name in path[:-1]:
            obj = obj._modules[name]
        leaf = path[-1]
        value = obj._parameters.get(leaf, _MISSING)
        if value is _MISSING:
            value = obj._buffers.get(leaf, _MISSING)
        if value is _MISSING:
            value = obj._modules.get(leaf, _MISSING)
        if value is not _MISSING:
            return value
    except (AttributeError, KeyError):  # not a module path (a plain attribute on the way)
        pass
    return functools.reduce(getattr, path, root)  # plain attributes, submodules: the usual way


_LEAF = "_fx_leaf__"


@functools.cache
def as_fx_leaf(fn: types.FunctionType) -> types.FunctionType:
    """`fn`, recorded as one `call_function` node of `fn` when symbolic tracing passes a Proxy.

    The wrapper is importable as `lora_fx.core.codegen.<its name>` (module `__getattr__` below),
    so pickling a GraphModule, which writes an import line per global, finds it again.
    """

    @functools.wraps(fn)
    def call(*args, **kwargs):
        if _symbolic_trace._is_fx_tracing_flag and not torch.compiler.is_compiling():
            proxy = next((a for a in args if isinstance(a, torch.fx.Proxy)), None)
            if proxy is not None:
                return proxy.tracer.create_proxy("call_function", fn, args, kwargs)
        return fn(*args, **kwargs)

    call.__module__ = __name__
    call.__name__ = call.__qualname__ = f"{_LEAF}{fn.__module__.replace('.', '_D_')}__{fn.__name__}"
    return call


def __getattr__(name: str) -> Any:
    """`as_fx_leaf` wrappers by their names (for the import lines of pickled GraphModules)."""
    if not name.startswith(_LEAF):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, _, function = name.removeprefix(_LEAF).partition("__")
    fn = getattr(importlib.import_module(module.replace("_D_", ".")), function)
    return as_fx_leaf(fn)


def _is_graph_function(value: Any) -> bool:
    """A plain function of lora_fx's own that generated code calls."""
    return (
        isinstance(value, types.FunctionType)
        and value.__module__.startswith("lora_fx.")
        and value is not attr_at
    )


class _ReadsThroughDicts:
    """Generated code with `attr_at` parameter reads and `as_fx_leaf` graph-function calls.

    Each multi-hop `get_attr` line is rewritten into an `attr_at` call. The line is the one fx
    itself formats (`torch.fx.graph._format_target`), so a line fx writes differently is left
    as it is: slower, never wrong.
    """

    # torch.export graphs (pytree codegen) only: a pickled GraphModule writes an import line per
    # global and cannot name an aliased OpOverload; export graphs do not pickle anyway.
    _binds_aten_ops = False

    def _gen_python_code(self, nodes, root_module: str, namespace, **kwargs) -> PythonCode:
        code = super()._gen_python_code(nodes, root_module, namespace, **kwargs)  # type: ignore[misc]
        src, count = code.src, 0
        for target in {n.target for n in nodes if n.op == "get_attr" and "." in str(n.target)}:
            chain = torch.fx.graph._format_target(root_module, target)
            fast = f"{_NAME}({root_module}, {tuple(target.split('.'))!r})"
            src, n = re.subn(f" = {re.escape(chain)}(?=[;\\n])", f" = {fast}", src)
            count += n
        if count:
            code.src = src
            code.globals[_NAME] = attr_at
        for name, value in list(code.globals.items()):
            if _is_graph_function(value):
                code.globals[name] = as_fx_leaf(value)
        if self._binds_aten_ops:
            code.src = _bind_aten_ops(nodes, code.src, code.globals)
        return code


def _bind_aten_ops(nodes, src: str, globals_: dict[str, Any]) -> str:
    """Call each ATen overload through a global bound to it, not `torch.ops.aten.x.y(`.

    The attribute chain costs about 0.3 µs a call (an exported decode step makes ~340 calls);
    the global holds the same `OpOverload`, so torch.compile sees the same op.
    """
    for target in {n.target for n in nodes if n.op == "call_function"}:
        if not isinstance(target, torch._ops.OpOverload):
            continue
        qualified = torch.fx.node._get_qualified_name(target)
        alias = "_lora_fx_op_" + re.sub(r"\W", "_", qualified.removeprefix("torch.ops."))
        src, n = re.subn(f"(?<![\\w.]){re.escape(qualified)}\\(", f"{alias}(", src)
        if n:
            globals_[alias] = target
    return src


class FlatAttrCodeGen(_ReadsThroughDicts, CodeGen):
    """`CodeGen` (positional inputs, symbolic_trace graphs), as lora_fx generates it."""


class FlatAttrPyTreeCodeGen(_ReadsThroughDicts, _PyTreeCodeGen):
    """`_PyTreeCodeGen` (torch.export's input/output specs), as lora_fx generates it."""

    _binds_aten_ops = True


_FAST = {CodeGen: FlatAttrCodeGen, _PyTreeCodeGen: FlatAttrPyTreeCodeGen}


def install(gm: torch.fx.GraphModule) -> bool:
    """Give `gm`'s graph the dict-reading code generator (not recompiled here); True if it has it.

    The codegen object keeps its state (export's pytree specs) and only changes class; codegens
    of other classes are left as they are.
    """
    codegen = gm.graph._codegen
    if isinstance(codegen, _ReadsThroughDicts):
        return True
    fast = _FAST.get(type(codegen))
    if fast is None:
        return False
    codegen.__class__ = fast
    return True
