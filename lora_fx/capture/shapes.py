"""Dynamic shapes for `capture`: the default spec, export's shape errors, the input check.

    capture(hf_model, (ids,))      # ids: [2, 8]
        -> torch.export with {"input_ids": {0: Dim.AUTO, 1: Dim.AUTO}}
        -> GraphModule: gm(ids[1, 5]) and gm(ids[3, 13]) work; gm(ids[2, 8, 1]) raises ValueError

Rules:
1. `dynamic_shapes="auto"` marks axes 0 and 1 (batch and sequence) of every tensor input
   `Dim.AUTO`: export keeps them symbolic where the model allows and specialises them where it
   does not (a channel axis, a fixed-size input), so the default never raises a constraint
   violation. Axes that came out static are named in one warning.
2. An example batch of 1 is repeated to 2 rows before export (every tensor input with axis 0 of
   size 1 is, so inputs stay consistent): export specialises sizes 0 and 1, and a graph traced at
   batch 2 runs at batch 1 as well. A sequence of length 1 is kept (and warned about): a
   length-1 axis may be one that broadcasts (a `[B, 1, L, L]` mask).
3. A constraint violation from export (a `Dim` the model cannot keep dynamic) becomes a
   `CaptureError` naming the input and axis, and what to pass instead.
4. The exported module checks its inputs in a `_guards_fn` submodule called from the graph
   (torch raises a bare `AssertionError: Guard failed: ...`). `install_input_check` puts an
   `InputCheck` in its place: in eager calls it checks each tensor input's rank and static sizes
   and then runs torch's guards, raising `ValueError` with the input, the shape given and the
   shape expected. Under tracing (`torch.compile`, `torch.export`) it runs torch's guards as
   before, so compiled and re-exported graphs keep their guards.
5. A caller's `dynamic_shapes` dict may leave arguments out (`use_cache`, which capture adds for
   transformers models): they are static, as export's `None` entry says.
"""

from __future__ import annotations

import inspect
import re
import warnings
from typing import Any

import torch
import torch.fx
from torch import nn
from torch.export import Dim
from torch.utils import _pytree as pytree

from lora_fx.errors import CaptureError

__all__ = [
    "AUTO",
    "InputCheck",
    "complete_spec",
    "default_dynamic_shapes",
    "install_input_check",
    "shape_error",
    "warn_static_axes",
]

AUTO = "auto"  # capture's default `dynamic_shapes`: axes 0 and 1 of every tensor input
_AUTO_AXES = (0, 1)
_GUARDS = "_guards_fn"
# `L['input_ids'].size()[1]` (guards) or `inputs['input_ids'].shape[1]` (0/1 specialisation)
_AXIS_RE = re.compile(r"(?:L|inputs)\['([^']+)'\](?:\[[^\]]*\])*\.(?:size\(\)|shape)\[(\d+)\]")
_DIM_NAME_RE = re.compile(r"Constraints violated \(([^)]+)\)")


def default_dynamic_shapes(
    model: nn.Module, args: tuple, kwargs: dict
) -> tuple[dict[str, Any], tuple, dict]:
    """Rule 1-2: the AUTO spec keyed by `model.forward`'s argument names, and the example inputs."""
    if all(_batch_of_one(leaf) for leaf in _tensors((args, kwargs))) and _tensors((args, kwargs)):
        args, kwargs = pytree.tree_map_only(torch.Tensor, _two_rows, (args, kwargs))
    bound = _bound(model, args, kwargs)
    spec = {
        name: pytree.tree_map(
            lambda v: (
                {a: Dim.AUTO for a in _AUTO_AXES if a < v.dim()}
                if isinstance(v, torch.Tensor)
                else None
            ),
            value,
        )
        for name, value in bound.items()
    }
    return spec, args, kwargs


def complete_spec(model: nn.Module, args: tuple, kwargs: dict, spec: Any) -> Any:
    """Rule 5: a caller's dict spec with `None` (static) for the arguments it leaves out."""
    if not isinstance(spec, dict):
        return spec
    bound = _bound(model, args, kwargs)
    return {**dict.fromkeys(bound), **spec}


def warn_static_axes(gm: torch.fx.GraphModule, spec: dict[str, Any]) -> list[str]:
    """Rule 1: warn once about axes the AUTO spec asked for that export made static; return them."""
    wanted = {name for name, value in spec.items() if value is not None}
    static = []
    for node in gm.graph.find_nodes(op="placeholder"):
        val = node.meta.get("val")
        if node.name not in wanted or not isinstance(val, torch.Tensor):
            continue
        static += [
            f"{node.name} axis {a} = {val.shape[a]}"
            for a in _AUTO_AXES
            if a < val.dim() and isinstance(val.shape[a], int)
        ]
    if static:
        warnings.warn(
            f"capture: export kept {', '.join(static)} static (the model fixes that size, or the "
            "example had size 1); calls must use that size. Capture with a longer example, or "
            "pass dynamic_shapes=... to choose",
            stacklevel=4,  # warn_static_axes <- _export <- capture <- the caller
        )
    return static


def shape_error(model: nn.Module, error: Exception, dynamic_shapes: Any) -> CaptureError | None:
    """Rule 3: export's constraint violation as a CaptureError naming input and axis, or None."""
    text = str(error)
    if "Constraints violated" not in text and "specialized" not in text:
        return None
    found = _AXIS_RE.search(text)
    named = _DIM_NAME_RE.search(text)
    where = (found.group(1), int(found.group(2))) if found else None
    if where is None and named is not None:
        where = _find_dim(dynamic_shapes, named.group(1))
    if where is None:
        place, fix = "a dimension", "... (the Dim named above replaced by Dim.STATIC)"
    elif isinstance(where[0], int):  # a tuple spec: positional
        place = f"positional input {where[0]} axis {where[1]}"
        fix = f"... (entry [{where[0]}][{where[1]}] replaced by Dim.STATIC)"
    else:
        place = f"input {where[0]!r} axis {where[1]}"
        fix = f"{{{where[0]!r}: {{{where[1]}: Dim.STATIC, ...}}}}"
    reason = next((ln.strip(" -") for ln in text.splitlines()[1:] if ln.strip()), "")
    size_one = " (an example of size 1 is always static: use one of size 2 or more)"
    return CaptureError(
        f"capture of {type(model).__name__}: {place} cannot be dynamic: {reason} "
        f"Pass dynamic_shapes with that axis static, e.g. dynamic_shapes={fix}, or mark it "
        f"Dim.AUTO to let export decide{size_one if '0/1 specialized' in text else ''}"
    )


def _find_dim(spec: Any, name: str, path: tuple = ()) -> tuple[str | int, int] | None:
    """(input, axis) of the `Dim` called `name` in a dynamic_shapes spec, or None."""
    if isinstance(spec, dict):
        for key, value in spec.items():
            if isinstance(key, int) and getattr(value, "__name__", None) == name and path:
                return path[0], key
            found = _find_dim(value, name, (*path, key))
            if found is not None:
                return found
    elif isinstance(spec, (list, tuple)):
        for i, value in enumerate(spec):
            if path and getattr(value, "__name__", None) == name:
                return path[0], i
            found = _find_dim(value, name, (*path, i))
            if found is not None:
                return found
    return None


class InputCheck(nn.Module):
    """Rule 4: checks a captured graph's inputs, then runs torch's guards; errors are ValueErrors.

    Called from the graph with the same arguments as torch's `_guards_fn` (one per placeholder,
    constants where capture bound a keyword argument).
    """

    _is_impure = True  # a call with no users: fx's dead-code elimination must keep it

    def __init__(self, guards: nn.Module | None, inputs: list[tuple[str, tuple | None]]) -> None:
        super().__init__()
        self.guards = guards
        self.inputs = inputs  # (name, expected shape: ints, None where dynamic) per argument

    def forward(self, *args: Any) -> None:
        """Check `args` against the captured shapes (eager only), then run torch's guards."""
        if torch.compiler.is_compiling() or any(_symbolic(a) for a in args):
            if self.guards is not None:
                self.guards(*args)
            return
        for (name, expected), value in zip(self.inputs, args, strict=False):
            if expected is not None and isinstance(value, torch.Tensor):
                _check_shape(name, tuple(value.shape), expected)
        if self.guards is None:
            return
        try:
            self.guards(*args)
        except AssertionError as e:
            given = {
                n: tuple(a.shape)
                for (n, _), a in zip(self.inputs, args, strict=False)
                if isinstance(a, torch.Tensor)
            }
            expected = {n: _format(s) for n, s in self.inputs if s is not None}
            raise ValueError(
                f"inputs outside what the graph was captured for: it needs "
                f"{str(e).removeprefix('Guard failed: ')}; shapes given {given}, captured "
                f"{expected} (* = any size within that condition)"
            ) from None


def install_input_check(gm: torch.fx.GraphModule) -> bool:
    """Rule 4: replace torch's `_guards_fn` call by an `InputCheck`; True if there was one."""
    calls = [n for n in gm.graph.find_nodes(op="call_module") if n.target == _GUARDS]
    if len(calls) != 1:
        return False
    (call,) = calls
    inputs = [
        (a.name, _expected(a.meta.get("val"))) if isinstance(a, torch.fx.Node) else ("", None)
        for a in call.args
    ]
    guards = getattr(gm, _GUARDS, None)
    delattr(gm, _GUARDS)
    gm.add_submodule(_GUARDS, InputCheck(guards, inputs))
    return True


def _check_shape(name: str, given: tuple[int, ...], expected: tuple) -> None:
    """Raise ValueError if `given` has another rank or another size on a static axis."""
    if len(given) != len(expected):
        raise ValueError(
            f"input {name!r} has shape {given}; the graph was captured for shape "
            f"{_format(expected)} (rank {len(expected)}"
            + (", * = any size)" if None in expected else ")")
        )
    static = [a for a, e in enumerate(expected) if isinstance(e, int)]
    if all(given[a] == expected[a] for a in static):
        return
    fixed = ", ".join(f"axis {a} = {expected[a]}" for a in static)
    raise ValueError(
        f"input {name!r} has shape {given}; the graph was captured for shape {_format(expected)} "
        f"({fixed} static). Call it with those sizes, or capture again with dynamic_shapes=... "
        "making the axis dynamic (the default for transformers models)"
    )


def _expected(val: Any) -> tuple | None:
    """A placeholder's captured shape: ints for static axes, None for dynamic ones."""
    if not isinstance(val, torch.Tensor):
        return None
    return tuple(d if isinstance(d, int) else None for d in val.shape)


def _format(shape: tuple) -> str:
    """`(*, 16)` for a captured shape (`*`: a dynamic axis)."""
    text = ", ".join("*" if d is None else str(d) for d in shape)
    return f"({text},)" if len(shape) == 1 else f"({text})"


def _symbolic(value: Any) -> bool:
    """Whether a value is being traced (a tensor with symbolic sizes, or a fake one)."""
    if not isinstance(value, torch.Tensor):
        return isinstance(value, torch.SymInt)
    fake = isinstance(value, torch._subclasses.FakeTensor)
    return fake or not all(isinstance(d, int) for d in value.shape)


def _bound(model: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The inputs by `model.forward`'s argument names, as export keys a `dynamic_shapes` dict."""
    return dict(inspect.signature(model.forward).bind(*args, **kwargs).arguments)


def _tensors(tree: Any) -> list[torch.Tensor]:
    """The tensor leaves of a nested value."""
    return [leaf for leaf in pytree.tree_leaves(tree) if isinstance(leaf, torch.Tensor)]


def _batch_of_one(t: torch.Tensor) -> bool:
    """Whether `t` has an axis 0 of size 1."""
    return t.dim() > 0 and t.shape[0] == 1


def _two_rows(t: torch.Tensor) -> torch.Tensor:
    """`t` with its single row repeated twice (rule 2)."""
    return t.expand(2, *t.shape[1:]).clone()
