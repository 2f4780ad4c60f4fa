"""Dynamic shapes for the export: inherited from the capture, or the caller's, plus `adapter_index`.

    capture(model, (ids,), dynamic_shapes={"input_ids": {0: Dim("batch"), 1: Dim("seq")}})
        -> placeholders carry symbolic sizes (s0, s1)
        -> export_onnx(..., dynamic_shapes=None) exports with
           {"input_ids": {0: Dim("batch"), 1: Dim("input_ids_dim1")}}

Rules:
1. `torch.export` specialises every size it is not told is dynamic, and a graph captured with static
   shapes has those sizes baked in (views, masks), so it cannot be re-exported with dynamic ones.
   With `dynamic_shapes=None` the export therefore keeps exactly the capture's dynamic sizes: each
   symbol becomes one named `Dim` with the capture's range, shared by every input that has it.
2. Inherited dimensions are named `batch` (axis 0 of the first input) and `<input>_dim<axis>`; these
   are the ONNX dimension names. Pass `dynamic_shapes` yourself to choose names.
3. A `dynamic_shapes` dict may be the capture's own: entries `None` for arguments capture bound
   as constants (`"use_cache": None`) are dropped.
4. The stacked layout's `adapter_index` has one entry per batch row: its only axis is the first
   input's axis 0 (the same `Dim`), or static when that axis is static.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sympy
import torch
import torch.fx
from torch.export import Dim
from torch.utils import _pytree as pytree

__all__ = ["resolve_dynamic_shapes"]

_NO_MAX = 2**62  # export's ranges use an integer infinity beyond any real size


def resolve_dynamic_shapes(
    gm: torch.fx.GraphModule, dynamic_shapes: Any, *, row_inputs: Sequence[str] = ()
) -> Any:
    """The `dynamic_shapes` to export `gm`'s copy with (None: static).

    `row_inputs`: inputs the export copy appends (`adapter_index`, `alora_offsets`), `[batch]`
    each, sharing the batch dimension of the first input.
    """
    if dynamic_shapes is None:
        dynamic_shapes = _inherited(gm)
    elif isinstance(dynamic_shapes, dict):
        dynamic_shapes = _signature_keys(gm, dynamic_shapes)
    if not row_inputs or dynamic_shapes is None:
        return dynamic_shapes
    batch = _first_axis0(dynamic_shapes)
    spec = {0: batch} if batch is not None else None
    if isinstance(dynamic_shapes, dict):
        return {**dynamic_shapes, **dict.fromkeys(row_inputs, spec)}
    return (*dynamic_shapes, *[spec] * len(row_inputs))


def _signature_keys(gm: torch.fx.GraphModule, dynamic_shapes: dict[str, Any]) -> dict[str, Any]:
    """The spec without `None` entries of arguments capture bound as constants (rule 3)."""
    info = getattr(gm.graph._codegen, "pytree_info", None)
    if info is None:
        return dynamic_shapes
    return {k: v for k, v in dynamic_shapes.items() if v is not None or k in info.orig_args}


def _inherited(gm: torch.fx.GraphModule) -> dict[str, Any] | None:
    """The capture's dynamic sizes as a dict keyed by argument name (rule 1), or None."""
    info = getattr(gm.graph._codegen, "pytree_info", None)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if info is None or info.in_spec is None or info.in_spec.num_leaves != len(placeholders):
        return None
    dims: dict[sympy.Symbol, Dim] = {}
    leaves = []
    for node in placeholders:
        val = node.meta.get("val")
        spec = {}
        if isinstance(val, torch.Tensor):
            for axis, size in enumerate(val.shape):
                symbol = _symbol(size)
                if symbol is not None:
                    if symbol not in dims:
                        name = "batch" if not dims and axis == 0 else f"{node.name}_dim{axis}"
                        dims[symbol] = _dim(name, size)
                    spec[axis] = dims[symbol]
        leaves.append(spec or None)
    if not dims:
        return None
    args_tree, kwargs_tree = pytree.tree_unflatten(leaves, info.in_spec)
    names = list(info.orig_args)
    shapes = dict(zip(names[: len(args_tree)], args_tree, strict=True))
    shapes.update(kwargs_tree)
    return shapes


def _symbol(size: Any) -> sympy.Symbol | None:
    """The free symbol of a dynamic size (None for static sizes and derived expressions)."""
    if isinstance(size, torch.SymInt) and isinstance(size.node.expr, sympy.Symbol):
        return size.node.expr
    return None


def _dim(name: str, size: torch.SymInt) -> Dim:
    """A named Dim with the range the capture found for this size."""
    bounds = size.node.shape_env.var_to_range.get(size.node.expr)
    if bounds is None:
        return Dim(name)
    lower, upper = int(bounds.lower), bounds.upper
    if upper > _NO_MAX:  # sympy's oo / torch's int_oo: unbounded
        return Dim(name, min=lower)
    return Dim(name, min=lower, max=int(upper))


def _first_axis0(dynamic_shapes: Any) -> Any:
    """The spec of the first input's axis 0 (the batch), or None."""
    first = (
        next(iter(dynamic_shapes.values()), None)
        if isinstance(dynamic_shapes, dict)
        else (dynamic_shapes[0] if len(dynamic_shapes) else None)
    )
    if isinstance(first, dict):
        return first.get(0)
    if isinstance(first, (list, tuple)) and first:
        return first[0]
    return None
