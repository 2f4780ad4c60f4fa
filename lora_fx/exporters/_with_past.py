"""The generation graph with past/present KV tensors instead of its static cache (`with_past`).

    get_attr cache.key_i -> index_put_((rows, heads, slots), k_new); [:b] -> sdpa(q, ., ., mask)
        becomes
    placeholder past_key_values.i.key -> cat([past, k_new], 2) -> sdpa(q, ., ., mask)
                                                               -> output present.i.key

    mask = F.pad(attention_mask.bool(), (0, L - k))   becomes   mask = attention_mask.bool()

Rules:
1. Only graphs from `capture_for_generation` (their `GenerationSpec`) are rewritten; any other
   graph, or a cache buffer used in a way this rewrite does not know, raises `OnnxExportError`.
2. The rewrite runs on the export copy (`build_export_graph`), never on the user's graph. Buffers
   stay registered on the shared modules; the copy simply stops reading them.
3. Every use of the cache's batch slice (taken after the in-place write) reads the `cat` instead
   (the write made the slice equal to it for the rows and slots attention reads), and the `cat`
   is an output.
4. Attention then runs over `past + seq` keys, and the padding mask is `attention_mask` itself
   (`total = past + seq` columns). The mask's key positions come from `cumsum(ones_like(mask))`
   (see `capture/generation.py` rule 3), so no other op depends on the cache length; export
   re-traces with a dynamic `past_sequence_length`, which would fail on any op that still did.
5. Export's `_guards_fn` of the capture checks sizes against the static cache; it is dropped.
6. ONNX names with dots (`past_key_values.0.key`) are not Python identifiers: placeholders are
   `past_key_values_0_key`; `torch.onnx.export(input_names=, output_names=)` names the file's
   inputs and outputs (`PastIO`), and `name_past_dims` names the mask's length dimension.
7. A graph captured with `max_batch_size=1` has its batch baked into views: the file's batch is
   static 1. Otherwise the batch is dynamic and no longer bounded by `max_batch_size` (no buffer).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import onnx_ir as ir
import torch
import torch.fx

from lora_fx.capture.generation import CACHE_MODULE, GenerationSpec, generation_spec
from lora_fx.errors import OnnxExportError

__all__ = [
    "PastIO",
    "name_past_dims",
    "past_dynamic_shapes",
    "past_example_inputs",
    "past_onnx_names",
    "require_generation_spec",
    "rewrite_with_past",
]

_aten = torch.ops.aten
_SLICE_OPS = (_aten.slice.Tensor,)
_WRITE_OPS = (_aten.index_put_.default, _aten.index_put.default)
_PAD_OPS = (_aten.pad.default, _aten.constant_pad_nd.default)
_CAST_OPS = (_aten.to.dtype, _aten._to_copy.default, _aten.to.dtype_layout)
_GRAPH_INPUTS = ("input_ids", "attention_mask", "position_ids")


@dataclass(frozen=True)
class PastIO:
    """Names of the rewritten graph's inputs and outputs, graph name -> ONNX name."""

    inputs: dict[str, str]
    outputs: tuple[str, ...]


def require_generation_spec(gm: torch.fx.GraphModule) -> GenerationSpec:
    """The graph's `GenerationSpec`, or an error saying how to get a graph that has one."""
    spec = generation_spec(gm)
    if spec is None:
        raise OnnxExportError(
            "with_past=True needs a graph from lora_fx.capture_for_generation(model, "
            "max_batch_size=..., max_cache_len=...); this graph has no KV cache (captured with "
            "lora_fx.capture?); export it with with_past=False"
        )
    return spec


def past_onnx_names(spec: GenerationSpec) -> PastIO:
    """Graph input/output names of the rewrite and their ONNX names (rule 6)."""
    inputs = {name: name for name in _GRAPH_INPUTS}
    outputs = ["logits"]
    for i in range(spec.num_layers):
        for kind in ("key", "value"):
            inputs[f"past_key_values_{i}_{kind}"] = f"past_key_values.{i}.{kind}"
            outputs.append(f"present.{i}.{kind}")
    return PastIO(inputs=inputs, outputs=tuple(outputs))


def past_example_inputs(
    spec: GenerationSpec, *, past: int = 3, seq: int = 2
) -> tuple[torch.Tensor, ...]:
    """Example inputs with sizes all different and > 1, so that no dimension specializes.

    The batch is 1 for a graph captured with `max_batch_size=1` (its batch is static), else 2.
    """
    batch = min(2, spec.max_batch_size)
    total = past + seq
    ids = torch.zeros(batch, seq, dtype=torch.long)
    mask = torch.ones(batch, total, dtype=torch.long)
    positions = torch.arange(past, total).expand(batch, -1).contiguous()
    dtype = getattr(torch, spec.cache_dtype)
    cache = [
        torch.zeros(batch, spec.num_kv_heads, past, spec.head_dim, dtype=dtype)
        for _ in range(2 * spec.num_layers)
    ]
    return (ids, mask, positions, *cache)


def past_dynamic_shapes(spec: GenerationSpec) -> dict[str, dict[int, object]]:
    """Sequence and past length dynamic, batch too unless captured static (`max_batch_size=1`).

    The mask's length is `Dim.AUTO`: export finds it equal to past + sequence.
    """
    dim = torch.export.Dim
    seq, past = dim("sequence_length"), dim("past_sequence_length")
    rows = {0: dim("batch_size")} if spec.max_batch_size > 1 else {}
    shapes: dict[str, dict[int, object]] = {
        "input_ids": {**rows, 1: seq},
        "attention_mask": {**rows, 1: dim.AUTO},
        "position_ids": {**rows, 1: seq},
    }
    for name in list(past_onnx_names(spec).inputs)[len(_GRAPH_INPUTS) :]:
        shapes[name] = {**rows, 2: past}
    return shapes


def rewrite_with_past(module: torch.fx.GraphModule, spec: GenerationSpec) -> PastIO:
    """In place on the export copy: cache buffers -> past inputs and present outputs (rules 1-5).

    Raises:
        OnnxExportError: The graph's cache or mask is not built as `capture_for_generation` builds
            it.
    """
    graph = module.graph
    names = past_onnx_names(spec)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if [n.name for n in placeholders] != list(_GRAPH_INPUTS):
        raise OnnxExportError(
            f"with_past expects inputs {list(_GRAPH_INPUTS)}, the graph has "
            f"{[n.name for n in placeholders]}"
        )
    writes = [_cache_write(graph, spec.key_buffer(i)) for i in range(spec.num_layers)]
    writes_v = [_cache_write(graph, spec.value_buffer(i)) for i in range(spec.num_layers)]
    pad = _mask_pad(graph, placeholders[1])

    presents = []
    last = placeholders[-1]
    past_names = list(names.inputs)[len(_GRAPH_INPUTS) :]
    for name, (getter, view, write, new) in zip(
        past_names, [w for pair in zip(writes, writes_v, strict=True) for w in pair], strict=True
    ):
        with graph.inserting_after(last):
            past = graph.placeholder(name)
        last = past
        with graph.inserting_before(write):
            present = graph.call_function(_aten.cat.default, ([past, new], 2))
        present.meta.update({k: v for k, v in write.meta.items() if k != "val"})
        view.replace_all_uses_with(present)  # uses after the write (rule 3)
        graph.erase_node(view)
        write.replace_all_uses_with(present)
        graph.erase_node(write)
        if not getter.users:
            graph.erase_node(getter)
        presents.append(present)
    pad.replace_all_uses_with(pad.args[0])
    graph.erase_node(pad)
    for node in list(graph.nodes):
        if node.op == "call_module" and str(node.target).startswith("_guards_fn"):
            graph.erase_node(node)  # rule 5

    output = next(n for n in graph.nodes if n.op == "output")
    leaves = output.args[0] if isinstance(output.args[0], (tuple, list)) else output.args
    if len(leaves) != 1 or not isinstance(leaves[0], torch.fx.Node):
        raise OnnxExportError(f"with_past expects one logits output, the graph returns {leaves}")
    logits = leaves[0]
    output.args = ((logits, *presents),)
    graph._codegen = torch.fx.graph.CodeGen()  # plain positional inputs, tuple output
    graph.eliminate_dead_code()
    _check_no_cache_length(graph, spec)
    graph.lint()
    module.recompile()
    return names


def _cache_write(graph: torch.fx.Graph, target: str) -> tuple[torch.fx.Node, ...]:
    """(get_attr, batch slice, in-place write, written value) of one cache buffer (rule 1).

    The slice reads the buffer after the write: as the buffer or as `index_put_`'s result.
    """
    getters = [n for n in graph.nodes if n.op == "get_attr" and n.target == target]
    users = [u for g in getters for u in g.users]
    writes = [u for u in users if u.target in _WRITE_OPS and u.args[0] in getters]
    reads = [u for u in users if u not in writes] + [u for w in writes for u in w.users]
    views = [u for u in reads if u.target in _SLICE_OPS and u.args[1] == 0]
    if len(writes) != 1 or len(views) != 1 or len(reads) != 1 or len(writes[0].args[1]) != 3:
        raise OnnxExportError(
            f"with_past: cache buffer {target!r} is used by "
            f"{[u.format_node() for u in users + reads]}; expected one index_put_ of (rows, "
            "heads, slots) and one batch slice (as capture_for_generation builds them)"
        )
    write, view = writes[0], views[0]
    order = {n: i for i, n in enumerate(graph.nodes)}
    if order[view] < order[write]:
        raise OnnxExportError(
            f"with_past: cache buffer {target!r} is read before it is written "
            f"({view.format_node()}); this graph cannot be exported with past inputs"
        )
    return getters[0], view, write, write.args[2]


def _mask_pad(graph: torch.fx.Graph, mask: torch.fx.Node) -> torch.fx.Node:
    """The one pad of the attention mask to the cache length (rule 4)."""
    pads = [n for n in graph.nodes if n.target in _PAD_OPS and _reads(n.args[0], mask)]
    if len(pads) != 1:
        raise OnnxExportError(
            f"with_past: expected one padding of attention_mask to the cache length, found "
            f"{len(pads)}; was the graph captured with lora_fx.capture_for_generation?"
        )
    return pads[0]


def _reads(node: object, source: torch.fx.Node) -> bool:
    """Whether `node` is `source` or a dtype cast of it."""
    while isinstance(node, torch.fx.Node) and node is not source and node.target in _CAST_OPS:
        node = node.args[0]
    return node is source


def _check_no_cache_length(graph: torch.fx.Graph, spec: GenerationSpec) -> None:
    """Refuse shape arithmetic on the static cache length that survived the rewrite (rule 4)."""
    length = spec.max_cache_len
    for node in graph.nodes:
        if node.op == "get_attr" and node.target.startswith(f"{CACHE_MODULE}."):
            raise OnnxExportError(f"with_past: the graph still reads {node.target!r}")
        arithmetic = node.op == "call_function" and node.target in (operator.sub, operator.add)
        if arithmetic and length in node.args:
            raise OnnxExportError(
                f"with_past: {node.format_node()} computes a size from max_cache_len={length}; "
                "this graph cannot serve a growing past"
            )


def name_past_dims(model: ir.Model, names: PastIO) -> None:
    """Name the ONNX dims of past/present and the mask as generation runtimes do (rule 4)."""
    mask = next(v for v in model.graph.inputs if v.name == "attention_mask")
    total = mask.shape[1] if mask.shape is not None else None
    if not isinstance(total, ir.SymbolicDim):
        return
    renamed = ir.SymbolicDim("total_sequence_length")
    for value in [*model.graph.inputs, *model.graph.outputs]:
        if value.shape is not None and total in value.shape:
            value.shape = ir.Shape([renamed if d == total else d for d in value.shape])
