"""Export a LoRA graph to ONNX: merged for speed, or with its LoRA tensors named and replaceable.

    gm --copy + layout--> torch.export --> torch.onnx.export(dynamo=True) --> onnx_ir edits -> .onnx

    merged=True            plain graph with merged weights: the base model's ops, no LoRA node
    merged=False and lora_layout=
      "initializers"       y + scale * B(A(x)); initializers `<site>.lora_A.<adapter>.weight`, ...;
                           variants as the graph runs them (aLoRA: input `alora_offsets`)
      "inputs"             y + B(A(x)); graph inputs `<site>.lora_A.weight`, ... with zero-rank
                           defaults, for ONNX Runtime adapters (`write_ort_adapter`)
      "stacked"            every adapter at once; input `adapter_index[batch]` picks one per row
    with_past=True         a `capture_for_generation` graph as a decoder with past/present KV
                           tensors (`_with_past.py`), for onnxruntime-genai (`genai.py`)

Exporter: `torch.onnx.export(..., dynamo=True)`, the torch.export-based exporter. It is torch 2.13's
default and maintained one, it reads the same ATen graph lora_fx rewrites, and it names
initializers by module path, which the PEFT-derived names rely on; the TorchScript exporter is
deprecated and re-traces Python. lora_fx runs `torch.export.export` itself first (so a failure names
its step), exports with `optimize=False`, then runs torch's optimizer with the LoRA tensors
protected (`_onnx_ir.py`): every layout gets the optimizations of a plain `torch.onnx.export`.

Rules:
1. The user's graph is never changed, and no weight is copied: the export works on a copy that
   shares tensors; merged weights are computed one at a time while the file is written.
2. Merged export folds the adapters the graph runs (active, unmerged) in float32 as `merge` does;
   adapters merged already are in the weights.
3. Dynamic shapes: see `_shapes.py`. A graph captured with static shapes exports static shapes.
4. Names of LoRA tensors: see `_names.py`.
5. fp16: capture a float16 model (`model.half()` before `lora_fx.capture`); export keeps the
   graph's dtypes. torch.export refuses a captured float32 graph cast afterwards (constants baked).
6. Failures raise `OnnxExportError` naming the step; an op without ONNX translation is named with
   the site or module that uses it. Nothing is written unless everything succeeded.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.fx
from torch.utils import _pytree as pytree

from lora_fx.capture import as_graph_module
from lora_fx.capture.generation import GenerationSpec
from lora_fx.core.quiet import dropping_records
from lora_fx.core.state import lora_tag
from lora_fx.errors import OnnxExportError
from lora_fx.exporters._branches import INDEX_INPUT, ExportGraph
from lora_fx.exporters._graph_copy import LORA_LAYOUTS, build_export_graph, plan_export
from lora_fx.exporters._onnx_ir import (
    EXTERNAL_DATA_BYTES,
    lift_to_inputs,
    optimize_keeping,
    save_atomic,
    swap_merged_weights,
    tensor_bytes,
)
from lora_fx.exporters._shapes import resolve_dynamic_shapes
from lora_fx.exporters._with_past import (
    PastIO,
    name_past_dims,
    past_dynamic_shapes,
    past_example_inputs,
    require_generation_spec,
    rewrite_with_past,
)

__all__ = ["BASE_INDEX", "OnnxExport", "export_onnx"]

log = logging.getLogger(__name__)

BASE_INDEX = -1  # adapter_index value of a row that runs the base model (stacked layout)
_REGISTRY_LOGGER = "torch.onnx._internal.exporter._registration"
_NO_TORCHVISION = "torchvision is not installed"
_OP_PATTERNS = (
    re.compile(r"target=([\w.:]+)\]"),
    re.compile(r"op='([^']+)', overload='([^']+)'"),
)


@dataclass(frozen=True)
class OnnxExport:
    """What `export_onnx` wrote.

    Attributes:
        path: The `.onnx` file.
        data_path: Its external-data file, or None when the tensors are inside the `.onnx`.
        layout: `"merged"`, `"initializers"`, `"inputs"` or `"stacked"`.
        adapters: The adapters in the file (for "stacked": in `adapter_index` order).
        inputs: Graph inputs a caller feeds (LoRA inputs of the "inputs" layout excluded).
        outputs: Graph outputs.
        lora_tensors: ONNX tensor name -> PEFT file key, for every LoRA tensor in the file.
        op_counts: ONNX op type -> number of nodes.
        opset: The default-domain opset.
        nbytes: Bytes written (`.onnx` plus data file).
    """

    path: Path
    data_path: Path | None
    layout: str
    adapters: tuple[str, ...]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    lora_tensors: dict[str, str] = field(repr=False)
    op_counts: dict[str, int] = field(repr=False)
    opset: int
    nbytes: int

    @property
    def merged(self) -> bool:
        """Whether the adapters were folded into the weights."""
        return self.layout == "merged"

    def adapter_index(self, rows: Sequence[str | None]) -> np.ndarray:
        """The stacked layout's `adapter_index` for one adapter name per row (None: base model).

        Example:
            >>> feed["adapter_index"] = export.adapter_index(["a", "b", None])
        """
        unknown = sorted({r for r in rows if r is not None and r not in self.adapters})
        if unknown:
            raise ValueError(f"unknown adapter(s) {unknown}; this file has {list(self.adapters)}")
        index = [BASE_INDEX if r is None else self.adapters.index(r) for r in rows]
        return np.asarray(index, dtype=np.int64)


def export_onnx(
    gm: torch.fx.GraphModule | torch.export.ExportedProgram,
    args: tuple[Any, ...],
    path: str | os.PathLike,
    merged: bool = True,
    *,
    kwargs: dict[str, Any] | None = None,
    dynamic_shapes: Any = None,
    opset: int | None = None,
    adapter_names: str | list[str] | None = None,
    lora_layout: str = "initializers",
    optimize: bool = True,
    external_data: bool | None = None,
    custom_translation_table: dict[Callable, Callable] | None = None,
    with_past: bool = False,
) -> OnnxExport:
    """Write the graph as an ONNX model; the graph itself is left as it was.

    Args:
        gm: A captured graph, with or without adapters.
        args: Example positional inputs, as for `gm(*args)`. With `with_past`: None (examples
            sized from the graph's `GenerationSpec`).
        path: The `.onnx` file to write (its folder must exist).
        merged: Fold the adapters into the weights (no LoRA node). False keeps the branches,
            variants' ops included; an aLoRA adapter adds the `[batch]` int64 input
            `alora_offsets` (`math.alora.alora_offsets` of the ids; 0: the base model's row).
        kwargs: Example keyword tensors. Non-tensor keywords bound at capture (`use_cache`) are
            dropped.
        dynamic_shapes: As for `torch.export.export`, keyed by `gm`'s argument names. None keeps
            the dynamic sizes `gm` was captured with (static capture: static export).
        opset: ONNX opset (default: torch's).
        adapter_names: Adapters to export. Default: the active ones for merged and "initializers";
            every adapter for "inputs" and "stacked".
        lora_layout: With `merged=False`: `"initializers"`, `"inputs"` (ONNX Runtime adapters) or
            `"stacked"` (one adapter per batch row, chosen by the input `adapter_index`).
        optimize: Run torch's ONNX optimizer (LoRA tensor names are kept either way).
        external_data: Put tensors in `<path>.<8 hex>.data` (a new name per write, see
            `_onnx_ir.py` rule 4); default: only above 1.8 GB of tensors.
        custom_translation_table: Passed to `torch.onnx.export` for ops it cannot translate.
        with_past: For a graph from `capture_for_generation`: a decoder for generation runtimes
            (onnxruntime-genai, Optimum) with inputs `input_ids`, `attention_mask`
            [batch, total_sequence_length], `position_ids`, `past_key_values.<i>.key/value`
            [batch, kv_heads, past_sequence_length, head_dim] and outputs `logits`,
            `present.<i>.key/value` (see `_with_past.py`); composes with `merged` and the
            "initializers" and "inputs" layouts.

    Returns:
        An `OnnxExport` describing the file.

    Raises:
        ValueError: A bad `lora_layout`, a layout with `merged=True`, or `with_past` with the
            "stacked" layout or with example `args`.
        AdapterError: Unknown adapters, or adapters the layout cannot serve.
        MergeError: A site that cannot be merged (grouped conv).
        UnsupportedSiteError: A variant the layout cannot serve (merged: aLoRA, Arrow routers;
            "inputs" / "stacked": any but VeLoRA and MonteCLoRA), or a site the stacked layout
            cannot serve (grouped conv, MHA and `target_parameters` sites).
        OnnxExportError: torch.export or the ONNX translation failed (the message names the op
            and the site or module using it), the file could not be written, or `with_past` on a
            graph without a KV cache (not from `capture_for_generation`).

    Example:
        >>> gm = lora_fx.capture(model, (ids,), {"use_cache": False})
        >>> gm = lora_fx.load_adapter(gm, "adapter/")
        >>> lora_fx.exporters.export_onnx(gm, (ids,), "model.onnx")   # merged
        >>> gen = lora_fx.capture_for_generation(model, max_cache_len=256)
        >>> lora_fx.exporters.export_onnx(gen, None, "decoder.onnx", with_past=True)
    """
    # plan
    gm = as_graph_module(gm)
    layout = _check_layout(merged, lora_layout)
    spec = _check_with_past(gm, with_past, layout, args, kwargs)
    if spec is None:
        args = tuple(args) if isinstance(args, (tuple, list)) else (args,)
    kwargs = _call_kwargs(gm, kwargs)
    target = _check_target(path)
    plan = plan_export(
        gm, lora_layout=layout, adapter_names=adapter_names, with_past=spec is not None
    )

    # apply
    export = build_export_graph(gm, plan)
    call_kwargs = dict(kwargs)
    past_io: PastIO | None = None
    if spec is not None:
        past_io = rewrite_with_past(export.module, spec)
        args = past_example_inputs(spec)
        shapes = dynamic_shapes if dynamic_shapes is not None else past_dynamic_shapes(spec)
    else:
        if export.has_index_input:
            call_kwargs[INDEX_INPUT] = _example_index(args, kwargs, len(plan.adapters))
        for name, offsets in export.alora_inputs.items():
            call_kwargs[name] = _example_offsets(args, kwargs, offsets)
        row_inputs = [*([INDEX_INPUT] if export.has_index_input else []), *export.alora_inputs]
        shapes = resolve_dynamic_shapes(gm, dynamic_shapes, row_inputs=row_inputs)
    program = _to_onnx(export, args, call_kwargs, shapes, opset, custom_translation_table, past_io)
    model = program.model
    if past_io is not None:
        name_past_dims(model, past_io)
    named = [*export.lora_tensors, *export.buffers]
    missing = sorted(set(named) - set(model.graph.initializers))
    if missing:  # the exporter renamed or folded them: the file could not serve the adapters
        raise OnnxExportError(
            f"LoRA tensors {missing[:3]} are not initializers of the exported model; "
            "export with optimize=False, or report this graph"
        )
    swap_merged_weights(model, export.merged_weights)
    if optimize:
        optimize_keeping(program.optimize, program.model, named)
        model = program.model
    if export.rank_axes:
        dtypes = {name: _tensor_dtype(export.module, name) for name in export.rank_axes}
        lift_to_inputs(model, export.rank_axes, dtypes)
    size = tensor_bytes(model)
    external = size > EXTERNAL_DATA_BYTES if external_data is None else external_data
    try:
        data_path = save_atomic(model, target, external)
    except OSError as e:
        raise OnnxExportError(f"writing {str(target)!r} failed: {e}; nothing was written") from e

    # finish
    lora_inputs = set(export.rank_axes)
    result = OnnxExport(
        path=target,
        data_path=data_path,
        layout=layout,
        adapters=plan.adapters,
        inputs=tuple(v.name for v in model.graph.inputs if v.name not in lora_inputs),
        outputs=tuple(v.name for v in model.graph.outputs),
        lora_tensors=dict(export.lora_tensors),
        op_counts=dict(Counter(node.op_type for node in model.graph)),
        opset=model.opset_imports.get("", 0),
        nbytes=target.stat().st_size + (data_path.stat().st_size if data_path else 0),
    )
    log.info(
        "export_onnx: %s, adapters %s -> %s (%d nodes, %d LoRA tensors, %.1f MB)",
        layout,
        list(plan.adapters),
        target,
        sum(result.op_counts.values()),
        len(result.lora_tensors),
        result.nbytes / 1e6,
    )
    return result


def _check_layout(merged: bool, lora_layout: str) -> str:
    """The layout name: "merged", or the requested LoRA layout."""
    if lora_layout not in LORA_LAYOUTS:
        raise ValueError(
            f"lora_layout={lora_layout!r} is invalid; expected one of {list(LORA_LAYOUTS)}"
        )
    if merged and lora_layout != "initializers":
        raise ValueError(
            f"lora_layout={lora_layout!r} keeps LoRA branches; pass merged=False with it"
        )
    return "merged" if merged else lora_layout


def _check_with_past(
    gm: torch.fx.GraphModule, with_past: bool, layout: str, args: Any, kwargs: Any
) -> GenerationSpec | None:
    """The graph's generation spec when `with_past` (checked), else None."""
    if not with_past:
        return None
    spec = require_generation_spec(gm)
    if layout == "stacked":
        raise ValueError(
            "with_past=True supports merged=True and the 'initializers' and 'inputs' layouts, "
            "not 'stacked'; serve several adapters with lora_layout='inputs' and ONNX Runtime "
            "adapters"
        )
    if args is not None or kwargs:
        raise ValueError(
            "with_past=True builds its own example inputs (past and present tensors sized from "
            "the graph's GenerationSpec); pass args=None"
        )
    return spec


def _check_target(path: str | os.PathLike) -> Path:
    """The output path, refused early when its folder is missing or not writable."""
    target = Path(path)
    folder = target.parent
    if not folder.is_dir():
        raise OnnxExportError(
            f"cannot write {str(target)!r}: folder {str(folder)!r} does not exist"
        )
    if not os.access(folder, os.W_OK):
        raise OnnxExportError(
            f"cannot write {str(target)!r}: folder {str(folder)!r} is not writable"
        )
    if target.is_dir():
        raise OnnxExportError(f"cannot write {str(target)!r}: it is a folder; give a file name")
    return target


def _call_kwargs(gm: torch.fx.GraphModule, kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """Keyword inputs for `gm`: tensors kept, non-tensor values bound at capture dropped."""
    kwargs = dict(kwargs or {})
    info = getattr(gm.graph._codegen, "pytree_info", None)
    names = set(info.orig_args) if info is not None else None
    return {
        k: v
        for k, v in kwargs.items()
        if names is None
        or k in names
        or any(isinstance(x, torch.Tensor) for x in pytree.tree_leaves(v))
    }


def _example_index(args: tuple, kwargs: dict, n_adapters: int) -> torch.Tensor:
    """An example `adapter_index`: one entry per row of the first tensor input."""
    batch = _batch_size(args, kwargs, "lora_layout='stacked'")
    return torch.arange(batch, dtype=torch.int64) % n_adapters


def _example_offsets(args: tuple, kwargs: dict, offsets: torch.Tensor) -> torch.Tensor:
    """Example aLoRA offsets: the graph's own if set for this batch, else zeros (no row adapted)."""
    batch = _batch_size(args, kwargs, "an aLoRA adapter")
    if offsets.shape[0] == batch:
        return offsets
    return torch.zeros(batch, dtype=torch.int64, device=offsets.device)


def _batch_size(args: tuple, kwargs: dict, what: str) -> int:
    """The rows of the first tensor input (per-row inputs have as many)."""
    first = next(
        (x for x in pytree.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)), None
    )
    if first is None or first.dim() == 0:
        raise ValueError(f"{what} needs a batched tensor input to index rows by")
    return first.shape[0]


def _tensor_dtype(module: torch.nn.Module, path: str) -> torch.dtype:
    """The dtype of a tensor registered on the export copy."""
    owner, _, name = path.rpartition(".")
    holder = module.get_submodule(owner) if owner else module
    return getattr(holder, name).dtype


def _to_onnx(
    export: ExportGraph,
    args: tuple,
    kwargs: dict,
    dynamic_shapes: Any,
    opset: int | None,
    translations: dict | None,
    past_io: PastIO | None = None,
):
    """torch.export, then the dynamo ONNX translation; failures become one `OnnxExportError`."""
    module = export.module
    # "torchvision is not installed. Skipping torchvision::nms", once per export: not ours to fix.
    no_torchvision = dropping_records(
        _REGISTRY_LOGGER, lambda record: str(record.msg).startswith(_NO_TORCHVISION)
    )
    with no_torchvision, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        # adapter_index shares the batch Dim on purpose; the renamer notes it once per export.
        warnings.filterwarnings("ignore", message=".*shares the same shape constraints.*")
        program = _torch_export(module, args, kwargs, dynamic_shapes)
        return _translate(
            module, program, args, kwargs, dynamic_shapes, opset, translations, past_io
        )


def _torch_export(module: torch.fx.GraphModule, args: tuple, kwargs: dict, dynamic_shapes: Any):
    """Step 1: `torch.export.export` of the export copy."""
    try:
        return torch.export.export(
            module, args, kwargs, dynamic_shapes=dynamic_shapes, strict=False
        )
    except Exception as e:
        raise OnnxExportError(
            f"export_onnx failed in step 'torch.export': {type(e).__name__}: {_first_line(e)}"
            + _shape_hint(e, dynamic_shapes)
        ) from e


def _translate(module, program, args, kwargs, dynamic_shapes, opset, translations, past_io):
    """Step 2: `torch.onnx.export(program, dynamo=True, optimize=False)`.

    `dynamic_shapes` only names the ONNX dimensions here (the program has its symbols already).
    """
    input_names = list(past_io.inputs.values()) if past_io is not None else None
    output_names = list(past_io.outputs) if past_io else _output_names(module, program)
    try:
        return torch.onnx.export(
            program,
            args,
            kwargs=kwargs,
            dynamic_shapes=dynamic_shapes,
            dynamo=True,
            optimize=False,
            opset_version=opset,
            verbose=False,
            input_names=input_names,
            output_names=output_names,
            custom_translation_table=translations,
        )
    except Exception as e:
        op = _failed_op(e)
        if op is None:
            raise OnnxExportError(
                f"export_onnx failed in step 'ONNX translation': {type(e).__name__}: "
                f"{_first_line(e)}"
            ) from e
        raise OnnxExportError(
            f"op {op} has no ONNX translation; used {_where(module.graph, op)}; pass "
            f"custom_translation_table={{torch.ops.{op}: <onnxscript function>}} or replace "
            "the op before capture"
        ) from e


def _shape_hint(error: Exception, dynamic_shapes: Any) -> str:
    """Advice for the usual dynamic-shape failure: a graph captured with static shapes."""
    text = str(error)
    if dynamic_shapes is not None and ("specialized" in text or "Constraints violated" in text):
        return (
            "; the graph was captured with static shapes, which torch.export cannot make dynamic "
            "again: capture with lora_fx.capture(model, args, kwargs, dynamic_shapes=...) and "
            "export with dynamic_shapes=None to keep the capture's"
        )
    return ""


def _output_names(module: torch.fx.GraphModule, program) -> list[str] | None:
    """ONNX output names from the graph's output structure (`logits`, `sample`, `output_0`, ...)."""
    info = getattr(module.graph._codegen, "pytree_info", None)
    n_out = len(program.graph_signature.user_outputs)
    if info is None or info.out_spec is None or info.out_spec.num_leaves != n_out:
        return None
    if info.out_spec.is_leaf():
        return ["output"]
    try:
        paths = pytree.tree_flatten_with_path(
            pytree.tree_unflatten(list(range(n_out)), info.out_spec)
        )[0]
        keys = [pytree.keystr(path) for path, _ in paths]
    except ValueError:  # an output class registered without `flatten_with_keys_fn` (diffusers')
        keys = list(_context_keys(info.out_spec))
    inputs = set(program.graph_signature.user_inputs)
    names = []
    for i, key in enumerate(keys):
        name = re.sub(r"\W+", "_", key).strip("_")
        name = name if name and not name[0].isdigit() else f"output_{i}"
        # An ONNX value has one name: UNet2DCondition and AutoencoderKL take and return `sample`.
        names.append(f"output_{name}" if name in inputs else name)
    return names if len(set(names)) == len(names) else None


def _context_keys(spec: pytree.TreeSpec, prefix: str = ""):
    """Leaf paths of a spec read from its contexts, for classes without `flatten_with_keys_fn`.

    diffusers' `BaseOutput` flattens as a dict does (context: the field names), so its leaves get
    the field names (`sample`); a context that names no child gives positions (`[0]`).
    """
    if spec.is_leaf():
        yield prefix
        return
    context = spec.context
    named = isinstance(context, (list, tuple)) and len(context) == spec.num_children
    named = named and all(isinstance(k, str) for k in context)
    for i, child in enumerate(spec.children()):
        yield from _context_keys(child, f"{prefix}.{context[i]}" if named else f"{prefix}[{i}]")


def _failed_op(error: BaseException) -> str | None:
    """The op an ONNX translation error names, e.g. `aten.foo.default`, searched down the chain."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        text = str(error)
        for pattern in _OP_PATTERNS:
            match = pattern.search(text)
            if match:
                op = ".".join(match.groups())
                return op.removeprefix("torch.ops.")
        error = error.__cause__ or error.__context__
    return None


def _where(graph: torch.fx.Graph, op: str) -> str:
    """Where the graph calls `op`: LoRA sites or module paths, with node names."""
    places = []
    for node in graph.nodes:
        if node.op == "call_function" and str(node.target) == op:
            tag = lora_tag(node)
            if tag is not None:
                places.append(f"in the LoRA branch at site {tag['site']!r} (node {node.name})")
            else:
                stack = node.meta.get("nn_module_stack") or {}
                module = list(stack.values())[-1][0] if stack else ""
                places.append(f"at {module or '<top level>'!r} (node {node.name})")
    if not places:
        return "in the graph after torch.export's decompositions"
    more = f" and {len(places) - 3} more" if len(places) > 3 else ""
    return ", ".join(places[:3]) + more


def _first_line(e: BaseException) -> str:
    """First line of an exception message."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
