"""LoRA branches of the export copy, one builder per unmerged layout.

    initializers:  y + scale * B(A(x))          A, B: the graph's own tensors, PEFT in-memory names;
                   variants as the graph runs them (`branch_spec`: KaSA's lora_diag, BD-LoRA's
                   blocks, QALoRA's pooling, DoRA's magnitude, aLoRA's mask, Arrow's routing)
    inputs:        y + (scale*B)(A(x))          A, B: adapter-free names (graph inputs later)
    stacked:       y + B[i](A[i](x)) per row i  [n + 1, ...] stacks; new input `adapter_index`

Rules:
1. Export runs in eval mode, where LoRA dropout is the identity, so a branch is A, B, (scale,) add.
   Several adapters on one site chain their adds in the given order, as the graph sums them.
2. "inputs" traces with the first adapter's A and scale*B; the ONNX stage swaps in zero-rank
   defaults and a symbolic rank.
3. "stacked": slot `n` of every stack is zeros, so `adapter_index = n` (or -1) runs the base model.
   Ranks are zero-padded to the site's largest rank. Linear and embedding rows gather their
   adapter's A and B; conv sites run every slot and keep the row's own (groups=1 only).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.utils import _pytree as pytree

from lora_fx.core import graph as _graph
from lora_fx.core.keys import LoraPaths
from lora_fx.core.state import LoraState, SiteRecord
from lora_fx.errors import UnsupportedSiteError
from lora_fx.exporters._names import STACKED, input_names, rank_dim
from lora_fx.math.stack import slot_lookup, stack_adapters
from lora_fx.passes._arrow import emit_arrow
from lora_fx.passes._branch import BranchSpec, branch_spec, emit_branch
from lora_fx.passes._emit import Emitter, chain_end
from lora_fx.sites import Site
from lora_fx.sites.kinds import kind_of, lora_paths

__all__ = [
    "ALORA_INPUT",
    "INDEX_INPUT",
    "ExportGraph",
    "alora_input_name",
    "emit_inputs",
    "emit_named",
    "emit_stacked",
    "put_tensor",
    "stacked_conv",
    "stacked_embedding",
    "stacked_linear",
]

INDEX_INPUT = "adapter_index"
ALORA_INPUT = "alora_offsets"

_aten = torch.ops.aten
_CONV_FNS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_LEAF = object()  # a pytree leaf standing in for an input while specs are rebuilt


@dataclass
class ExportGraph:
    """The module to export and what the ONNX stage needs to know about its LoRA tensors."""

    module: torch.fx.GraphModule
    # ONNX tensor name -> PEFT file key, for every A/B (and lora_B bias) tensor in the export.
    lora_tensors: dict[str, str] = field(default_factory=dict)
    # "inputs" layout: ONNX tensor name -> (axis of the rank, its symbolic name).
    rank_axes: dict[str, tuple[int, str]] = field(default_factory=dict)
    # "merged": initializer name -> function computing the merged tensor when it is written.
    merged_weights: dict[str, Callable[[], torch.Tensor]] = field(default_factory=dict)
    # "stacked": the graph has the extra input INDEX_INPUT.
    has_index_input: bool = False
    # Named tensors that are not in PEFT files (Arrow prototypes), kept by name like lora_tensors.
    buffers: list[str] = field(default_factory=list)
    # aLoRA: graph input name -> the graph's offsets `[batch]` (an example value), one input per
    # aLoRA adapter, read by its branches instead of the offsets buffers (`alora_input_name`).
    alora_inputs: dict[str, torch.Tensor] = field(default_factory=dict)


def put_tensor(module: nn.Module, path: str, tensor: torch.Tensor) -> None:
    """Register `tensor` at `path` on the copy, creating containers on the way."""
    owner_path, _, name = path.rpartition(".")
    owner = module
    for part in owner_path.split(".") if owner_path else []:
        child = owner._modules.get(part)
        if child is None:
            child = nn.Module()
            owner.add_module(part, child)
        owner = child
    if isinstance(tensor, nn.Parameter):
        owner.register_parameter(name, tensor)
    else:
        owner.register_buffer(name, tensor)


def emit_named(
    gm: torch.fx.GraphModule,
    state: LoraState,
    adapters: tuple[str, ...],
    sites: dict[str, Site],
    out: ExportGraph,
) -> None:
    """Branches as the graph runs them; A/B keep their PEFT in-memory names (no copy).

    Variants are built from the same records as the training graph's (`branch_spec`; Arrow
    routers: `emit_arrow`), their tensors named too (KaSA's `lora_diag`, DoRA's magnitude, the
    experts and prototypes of a router); aLoRA reads its offsets from a graph input.

    An ONNX file is for inference, so a "fused" graph exports its sites as `W + scale * B @ A`
    (the "weight" layout): ONNX Runtime folds that at session start, so the unmerged file runs
    at merged speed and still holds A and B under their own names. "plain" is kept as chosen.
    """
    layout = "plain" if state.layout == "plain" else "weight"
    for name in adapters:
        for fqn, rec in state.adapters[name].sites.items():
            site = sites[fqn]
            # A float32 adapter on a half-precision site (autocast_adapter_dtype) runs in float32.
            site_dtype = _graph.get_attr(gm, site.weight).dtype
            paths = lora_paths(rec.kind, fqn, name)
            if rec.arrow is not None:  # a router reads its experts' A and B and its prototypes
                cast = _graph.get_attr(gm, paths.a).dtype != site_dtype
                for expert in rec.arrow.experts:
                    expert_paths = lora_paths(rec.kind, fqn, expert)
                    expert_rec = state.adapters[expert].sites[fqn]
                    _name_tensors(gm, out, _named_tensors(expert_paths, expert_rec))
                prototypes = f"{fqn}.lora_arrow.{name}.prototypes"
                _name_tensors(gm, out, {prototypes: None})  # not in PEFT files: no key
                out.buffers.append(prototypes)
                emit_arrow(out.module.graph, site, name, rec, cast=cast, export=True)
                continue
            _name_tensors(gm, out, _named_tensors(paths, rec))
            cast = _graph.get_attr(gm, paths.a).dtype != site_dtype
            spec = branch_spec(site, name, rec, cast=cast, layout=layout, export=True)
            emit_branch(out.module.graph, site, spec)
    _alora_inputs(gm, state, adapters, out)


def alora_input_name(adapter: str, adapters: list[str]) -> str:
    """The offsets input of `adapter`: `alora_offsets`, or `alora_offsets_<adapter>` for several."""
    return ALORA_INPUT if len(adapters) == 1 else f"{ALORA_INPUT}_{adapter}"  # names: identifiers


def _alora_inputs(
    gm: torch.fx.GraphModule, state: LoraState, adapters: tuple[str, ...], out: ExportGraph
) -> None:
    """Each aLoRA adapter's offsets become a `[batch]` int64 graph input its branches read.

    A runtime sets them per request (`math.alora.alora_offsets`: from the end of each row to its
    last invocation sequence, 0: the base model), instead of `set_alora_offsets` on a buffer.
    """
    names = [n for n in adapters if any(r.alora for r in state.adapters[n].sites.values())]
    graph = out.module.graph
    for name in names:
        paths = {lora_paths(r.kind, f, name).alora for f, r in state.adapters[name].sites.items()}
        reads = [n for n in graph.nodes if n.op == "get_attr" and n.target in paths]
        node = _add_input(out.module, alora_input_name(name, names))
        for read in reads:
            read.replace_all_uses_with(node)
            graph.erase_node(read)
        example = _graph.get_attr(gm, next(iter(paths))).detach()
        out.alora_inputs[node.target] = example.to(torch.int64)


def _named_tensors(paths: LoraPaths, rec: SiteRecord) -> dict[str, str | None]:
    """Path -> PEFT file key of every tensor a branch reads: A, B, B's bias, DoRA, KaSA."""
    tensors = {paths.a: paths.a_key, paths.b: paths.b_key}
    if rec.lora_bias:
        tensors[paths.b_bias] = paths.b_bias_key
    if rec.use_dora:
        tensors[paths.magnitude] = paths.magnitude_key
    if rec.use_kasa:
        tensors[paths.diag] = paths.diag_key
    return tensors


def _name_tensors(
    gm: torch.fx.GraphModule, out: ExportGraph, tensors: dict[str, str | None]
) -> None:
    """Register each tensor of `gm` under its path on the copy (no copy); record its file key."""
    for path, key in tensors.items():
        put_tensor(out.module, path, _graph.get_attr(gm, path))
        if key is not None:
            out.lora_tensors[path] = key


def emit_inputs(
    gm: torch.fx.GraphModule,
    state: LoraState,
    adapters: tuple[str, ...],
    sites: dict[str, Site],
    out: ExportGraph,
) -> None:
    """One adapter-free A/B pair per site, scale folded into B (made graph inputs later).

    The export traces with the first adapter's tensors; the ONNX stage replaces them by zero-rank
    defaults and makes the rank symbolic.
    """
    for fqn, site in sites.items():
        recs = [
            (n, state.adapters[n].sites[fqn]) for n in adapters if fqn in state.adapters[n].sites
        ]
        first, rec = recs[0]
        src, names = lora_paths(site.kind, fqn, first), input_names(site.kind, fqn)
        dtype = _graph.get_attr(gm, site.weight).dtype  # LoRA inputs take the site's dtype
        a = _graph.get_attr(gm, src.a).detach()
        b = _graph.get_attr(gm, src.b).detach()
        put_tensor(out.module, names.a, a.to(dtype))
        put_tensor(out.module, names.b, (b.float() * rec.scale).to(dtype))
        out.lora_tensors.update({names.a: names.a_key, names.b: names.b_key})
        out.rank_axes[names.a] = (0, rank_dim(fqn))
        out.rank_axes[names.b] = (1, rank_dim(fqn))
        bias = None
        if any(r.lora_bias for _, r in recs):
            bias = names.b_bias
            put_tensor(
                out.module, bias, torch.zeros(site.out_features, dtype=dtype, device=b.device)
            )
            out.lora_tensors[bias] = names.b_bias_key
        # Plain layout: the rank may be 0 at run time (no adapter fed), and ORT's Gemm rejects
        # the empty inner dimension an accumulate would then have; MatMul + Add accept it.
        spec = BranchSpec("inputs", names.a, names.b, bias, None, layout="plain", export=True)
        emit_branch(out.module.graph, site, spec)


def emit_stacked(
    gm: torch.fx.GraphModule,
    state: LoraState,
    adapters: tuple[str, ...],
    sites: dict[str, Site],
    out: ExportGraph,
) -> None:
    """Per-row adapters: stacks of every adapter's A and scale*B, indexed by a new graph input."""
    for site in sites.values():
        if not kind_of(site).can.mixed_batch:
            raise UnsupportedSiteError(
                f"site {site.fqn!r} ({kind_of(site).label}) adds its delta to a weight shared by "
                "every row; lora_layout='stacked' needs per-row branches (use "
                "'initializers' or 'inputs')"
            )
        if site.kind == "conv" and site.conv.groups > 1:
            raise UnsupportedSiteError(
                f"site {site.fqn!r} is a conv with groups={site.conv.groups}; "
                "lora_layout='stacked' supports groups=1 only"
            )
    index = _add_input(out.module, INDEX_INPUT)
    out.has_index_input = True
    graph = out.module.graph
    for fqn, site in sites.items():
        a, b, bias = _stacks(gm, state, adapters, site)
        paths = lora_paths(site.kind, fqn, STACKED)
        keys = {paths.a: paths.a_key, paths.b: paths.b_key}
        if bias is not None:
            keys[paths.b_bias] = paths.b_bias_key
        names = list(keys)
        for path, tensor in zip(names, (a, b, bias), strict=False):
            put_tensor(out.module, path, tensor)
        out.lora_tensors.update(keys)
        for base, x in zip(site.nodes, site.inputs, strict=True):
            end = chain_end(base)
            emit = Emitter(graph, end, {"adapter": STACKED, "site": fqn})
            nodes = [emit("weight", "get_attr", path) for path in names]
            a_n, b_n, bias_n = nodes[0], nodes[1], nodes[2] if bias is not None else None
            if site.kind == "linear":
                args = (x, index, a_n, b_n, bias_n)
                delta = emit("lora_b", "call_function", stacked_linear, args)
            elif site.kind == "embedding":
                args = (x, index, a_n, b_n, site.in_features)
                delta = emit("lora_b", "call_function", stacked_embedding, args)
            else:
                spec = site.conv
                geometry = (list(spec.stride), spec.padding, list(spec.dilation))
                args = (x, index, a_n, b_n, bias_n, *geometry, len(adapters) + 1)
                delta = emit("lora_b", "call_function", stacked_conv, args)
            add = emit("add", "call_function", _aten.add.Tensor, (end, delta))
            emit.attach(end, add)


def _stacks(
    gm: torch.fx.GraphModule, state: LoraState, adapters: tuple[str, ...], site: Site
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A, scale*B (and scale*bias) of every adapter, rank-padded, with a zero slot last.

    Layouts (slots = adapters + 1, r = the largest rank on the site):
        linear     A [slots, r, in]            B [slots, out, r]           bias [slots, out]
        embedding  A [slots * num, r]          B [slots, dim, r]
        conv       A [slots * r, in, *k]       B [out, slots * r, *1]      bias [slots, out]
    """
    recs = {
        n: state.adapters[n].sites[site.fqn]
        for n in adapters
        if site.fqn in state.adapters[n].sites
    }
    rank = max(rec.r for rec in recs.values())
    weight = _graph.get_attr(gm, site.weight)
    slots = [*adapters, None]  # the last slot is the base model's (zeros)
    lora_as, lora_bs, scales, bias_list = [], [], [], []
    for name in slots:
        rec = recs.get(name)
        if rec is None:  # no LoRA here for this adapter, or the base slot
            lora_as.append(None)
            lora_bs.append(None)
            scales.append(0.0)
            bias_list.append(torch.zeros(site.out_features))
            continue
        paths = lora_paths(site.kind, site.fqn, name)
        lora_as.append(_graph.get_attr(gm, paths.a).detach().float().cpu())
        lora_bs.append(_graph.get_attr(gm, paths.b).detach().float().cpu())
        scales.append(rec.scale)
        bias_list.append(
            _graph.get_attr(gm, paths.b_bias).detach().float().cpu() * rec.scale
            if rec.lora_bias
            else torch.zeros(site.out_features)
        )
    # The torch graph's mixed batches stack with the same function (`math/stack.py`).
    a, b = stack_adapters(lora_as, lora_bs, scales, rank, kind=site.kind)
    if site.kind == "embedding":
        a = a.transpose(1, 2).reshape(-1, rank)  # [slots, r, num] -> [slots * num, r]
    elif site.kind == "conv":
        a = a.flatten(0, 1)  # [slots * r, in, *k]
        b = b.transpose(0, 1).flatten(1, 2).contiguous()  # [out, slots * r, *1]
    with_bias = any(rec.lora_bias for rec in recs.values())
    bias = torch.stack(bias_list) if with_bias else None
    cast = [t.to(weight.dtype).to(weight.device) if t is not None else None for t in (a, b, bias)]
    return cast[0], cast[1], cast[2]


def _add_input(module: torch.fx.GraphModule, name: str) -> torch.fx.Node:
    """Append the input `name`: a placeholder after the others, and a keyword argument."""
    graph = module.graph
    last = [n for n in graph.nodes if n.op == "placeholder"][-1]
    with graph.inserting_after(last):
        node = graph.placeholder(name)
    info = getattr(graph._codegen, "pytree_info", None)
    if info is not None:
        args_tree, kwargs_tree = pytree.tree_unflatten(
            [_LEAF] * info.in_spec.num_leaves, info.in_spec
        )
        spec = pytree.tree_structure((args_tree, {**kwargs_tree, name: _LEAF}))
        graph._codegen.pytree_info = info._replace(orig_args=[*info.orig_args, name], in_spec=spec)
    return node


def stacked_linear(
    x: torch.Tensor,
    index: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """Each batch row's LoRA delta with its own adapter: x [batch, ..., in] -> [batch, ..., out].

    Rows stay batch-major when a site flattens them (GPT-2's `addmm` on `[batch * seq, in]`), so
    `x` is viewed as `[batch, m, in]`; A and B are gathered per row: `[batch, r, in]`,
    `[batch, out, r]`.
    """
    batch = index.shape[0]
    rows = x.reshape(batch, -1, x.shape[-1])  # [batch, m, in]
    low = torch.bmm(rows, a.index_select(0, index).transpose(1, 2))  # [batch, m, r]
    up = torch.bmm(low, b.index_select(0, index).transpose(1, 2))  # [batch, m, out]
    if bias is not None:
        up = up + bias.index_select(0, index).unsqueeze(1)
    return up.reshape(*x.shape[:-1], up.shape[-1])


def stacked_embedding(
    ids: torch.Tensor, index: torch.Tensor, a: torch.Tensor, b: torch.Tensor, num: int
) -> torch.Tensor:
    """Per-row embedding delta: row i looks up slot i of A `[slots * num, r]` (ids + i * num)."""
    batch = index.shape[0]
    low = slot_lookup(ids, index, a, num)  # [batch, ..., r]
    up = torch.bmm(low.reshape(batch, -1, low.shape[-1]), b.index_select(0, index).transpose(1, 2))
    return up.reshape(*ids.shape, up.shape[-1])


def stacked_conv(
    x: torch.Tensor,
    index: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    bias: torch.Tensor | None,
    stride: list[int],
    padding: list[int] | str,
    dilation: list[int],
    slots: int,
) -> torch.Tensor:
    """Per-row conv delta: every slot's A runs, a one-hot row mask keeps the row's slot, then B.

    A `[slots * r, in, *k]` gives `[batch, slots * r, ...]`; the mask zeroes other slots' channels;
    B `[out, slots * r, *1]` sums what is left. One-hot rather than a gather because a per-row conv
    would need `groups = batch`, which cannot stay a dynamic dimension in ONNX.
    """
    dims = x.dim() - 2
    rank = a.shape[0] // slots
    low = _CONV_FNS[dims](x, a, None, stride, padding, dilation)  # [batch, slots * r, *spatial]
    onehot = (index.unsqueeze(1) == torch.arange(slots, device=index.device)).to(x.dtype)
    keep = onehot.unsqueeze(2).expand(-1, -1, rank).reshape(-1, slots * rank, *([1] * dims))
    up = _CONV_FNS[dims](low * keep, b)  # [batch, out, *spatial]
    if bias is not None:
        up = up + (onehot @ bias).reshape(*up.shape[:2], *([1] * dims))
    return up
