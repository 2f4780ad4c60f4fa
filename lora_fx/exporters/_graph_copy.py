"""The graph torch.export sees: the user's graph copied, sharing tensors, branches rebuilt.

    gm (left untouched) --copy graph, share tensors, strip lora_fx nodes--> base graph, then
        merged:   nothing more; merged site weights are swapped in at the ONNX stage
        others:   branches rebuilt for the layout (`_branches.py`)

Rules:
1. Nothing of `gm` changes. The copy has its own graph and module containers and shares every
   tensor (no weight is copied). Leaf modules the graph calls are shallow copies without LoRA
   children.
2. Branches are rebuilt from the graph's LoRA state, not copied from the graph.
3. A merged site whose weight is also read by other ops (GPT-2's `lm_head` and `wte`) gets an
   alias tensor (same storage, no copy) under a name only it reads: its ONNX initializer is its own.
4. `modules_to_save` copies are full modules, not A/B pairs: the "inputs" and "stacked" layouts
   refuse them; the other layouts point each module at the first exported adapter's copy.
5. Adapters already merged into the weights cannot be served unmerged; "initializers" exports of
   other adapters keep them in the weights.
6. LoRA on linear, conv, embedding, MHA and `target_parameters` sites is exported (MHA and
   parameter sites: `W + scale * B @ A` where the weight is read, or merged; not "stacked",
   which needs per-row branches). Variants, checked before anything is built:
       merged          every variant `merge` folds (DoRA, KaSA, BD-LoRA, QALoRA, VeLoRA,
                       MonteCLoRA); aLoRA and Arrow routers are refused (no merged weight)
       "initializers"  every variant, with its own branch ops (`_branches.emit_named`)
       "inputs", "stacked"  plain LoRA only (and VeLoRA / MonteCLoRA, plain in eval)
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.fx
from torch import nn

from lora_fx.core import graph as _graph
from lora_fx.core.keys import HOLDERS
from lora_fx.core.state import (
    LoraState,
    SiteRecord,
    state_or_none,
)
from lora_fx.errors import (
    AdapterError,
    MergeError,
    OnnxExportError,
    UnsupportedSiteError,
)
from lora_fx.exporters._branches import (
    ExportGraph,
    emit_inputs,
    emit_named,
    emit_stacked,
    put_tensor,
)
from lora_fx.passes import _fold
from lora_fx.passes._emit import point_module_copies, strip_branches
from lora_fx.sites import Site, all_sites
from lora_fx.sites.kinds import KINDS, kind_of
from lora_fx.sites.node_reads import feeds_only
from lora_fx.sites.params import find_param_sites

__all__ = ["LORA_LAYOUTS", "ExportPlan", "build_export_graph", "plan_export"]

# Where an unmerged export keeps the LoRA tensors (`export_onnx(lora_layout=...)`); not the
# branch layout of `set_layout`, nor the PEFT file keys (`passes/_file_keys.py`).
LORA_LAYOUTS = ("initializers", "inputs", "stacked")
_ONNX_KINDS = [name for name, kind in KINDS.items() if kind.can.onnx]
# Variants that differ from LoRA in training only: every layout exports them as plain LoRA.
_EVAL_PLAIN = ("VeLoRA", "MonteCLoRA")
# Variants (`SiteRecord.variant`) with no merged weight, and why: "initializers" only.
_UNMERGEABLE = {
    "aLoRA": "which cannot be merged (a row is adapted from its invocation tokens on; unmerged, "
    "the file takes the offsets as the input 'alora_offsets')",
    "an Arrow router": "which routes each token among its experts and has no merged weight",
}


@dataclass(frozen=True)
class ExportPlan:
    """What to export: the layout and the adapters, checked against the graph."""

    lora_layout: str  # "merged" or one of LORA_LAYOUTS
    adapters: tuple[str, ...]


def plan_export(
    gm: torch.fx.GraphModule,
    *,
    lora_layout: str,
    adapter_names: str | list[str] | None,
    with_past: bool = False,
) -> ExportPlan:
    """Check the request against the graph's adapters; nothing is built or changed here.

    Raises:
        AdapterError: Unknown or unsuitable adapters, mixed-batch mode, or no adapter at all.
        UnsupportedSiteError: A site kind or variant the layout does not export (rule 6).
    """
    state = state_or_none(gm)
    if state is not None and getattr(state, "batch_adapters", None) is not None:
        raise AdapterError(
            "the graph is in mixed-batch mode; call lora_fx.set_adapter_batch(gm, None) first "
            "(for mixed batches in ONNX, export with merged=False, lora_layout='stacked')"
        )
    known = dict(state.adapters) if state is not None else {}
    if adapter_names is None:
        if lora_layout in ("merged", "initializers"):
            names = [n for n in (state.active if state else []) if not known[n].merged]
        else:
            names = list(known)
    else:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        unknown = [n for n in names if n not in known]
        if unknown:
            raise AdapterError(
                f"unknown adapter(s) {unknown}; adapters on this graph: {list(known)}"
            )
    if lora_layout == "merged":
        # Adapters merged already are in the base weights: nothing more to fold for them.
        names = [n for n in names if not known[n].merged]
        _check_supported(state, names, lora_layout, with_past=with_past)
        return ExportPlan(lora_layout, tuple(names))
    if not names:
        raise AdapterError(
            f"lora_layout={lora_layout!r} needs an adapter, but the graph has none to export; "
            "inject or load one, or export merged=True for the plain graph"
        )
    merged = [n for n, rec in known.items() if rec.merged]
    if merged and (lora_layout != "initializers" or set(merged) & set(names)):
        raise AdapterError(
            f"adapters {merged} are merged into the base weights; call lora_fx.unmerge(gm) "
            f"before exporting lora_layout={lora_layout!r}"
        )
    _check_supported(state, names, lora_layout, with_past=with_past)
    with_copies = [n for n in names if known[n].modules_to_save]
    if lora_layout in ("inputs", "stacked") and with_copies:
        raise AdapterError(
            f"adapters {with_copies} have modules_to_save copies, which "
            f"lora_layout={lora_layout!r} cannot switch per adapter; export them with "
            "lora_layout='initializers' or merged=True"
        )
    return ExportPlan(lora_layout, tuple(names))


def _check_supported(
    state: LoraState | None, names: list[str], layout: str, *, with_past: bool
) -> None:
    """Refuse sites and variants the layout does not export (rule 6)."""
    for name in names:
        for fqn, rec in state.adapters[name].sites.items():
            if with_past and rec.alora:
                raise UnsupportedSiteError(
                    f"adapter {name!r} is aLoRA at {fqn!r}: with_past=True decoders have no "
                    "'alora_offsets' input; export it without with_past (merged=False)"
                )
            if not kind_of(rec.kind).can.onnx:
                raise UnsupportedSiteError(
                    f"adapter {name!r} has a {rec.kind!r} site at {fqn!r}, which export_onnx "
                    f"does not export yet (supported: LoRA on {', '.join(_ONNX_KINDS)} sites)"
                )
            variant = None if rec.variant in _EVAL_PLAIN else rec.variant
            if variant is None or layout == "initializers":
                continue
            if layout == "merged" and variant in _UNMERGEABLE:
                raise UnsupportedSiteError(
                    f"adapter {name!r} is {variant} at {fqn!r}, {_UNMERGEABLE[variant]}; "
                    "export it with merged=False (lora_layout='initializers')"
                )
            if layout in ("inputs", "stacked"):
                merged = "" if variant in _UNMERGEABLE else " or merged=True"
                raise UnsupportedSiteError(
                    f"adapter {name!r} has {variant} at {fqn!r}; lora_layout={layout!r} carries "
                    f"plain A/B pairs only; export it with lora_layout='initializers'{merged}"
                )


def build_export_graph(gm: torch.fx.GraphModule, plan: ExportPlan) -> ExportGraph:
    """Copy `gm` (sharing tensors), strip its branches and rebuild them for `plan.lora_layout`.

    Raises:
        MergeError: A site cannot be merged (grouped conv; `lora_bias` without a base bias).
        UnsupportedSiteError: A site the stacked layout cannot serve (grouped conv).
    """
    state = state_or_none(gm)
    graph = _copy_graph(gm.graph)
    strip_branches(graph)
    if state is not None:
        point_module_copies(graph, state, plan.adapters)
    module = torch.fx.GraphModule(_root(gm, graph), graph, class_name="LoraFxExport")
    out = ExportGraph(module)
    if plan.adapters:
        sites = _adapter_sites(module, state, plan.adapters)
        build = {
            "merged": _plan_merged,
            "initializers": emit_named,
            "inputs": emit_inputs,
            "stacked": emit_stacked,
        }[plan.lora_layout]
        build(gm, state, plan.adapters, sites, out)
    _graph.cleanup(module)
    module.eval()
    return out


def _copy_graph(graph: torch.fx.Graph) -> torch.fx.Graph:
    """New nodes with shallow-copied meta, and a codegen of its own (its specs are immutable)."""
    new = torch.fx.Graph(tracer_cls=graph._tracer_cls)
    output_val, old_output = new.graph_copy(graph, {}, return_output_node=True)
    new._codegen = copy.copy(graph._codegen)
    out = new.output(output_val, type_expr=getattr(old_output, "type", None))
    out.meta = copy.copy(old_output.meta)
    return new


def _root(gm: torch.fx.GraphModule, graph: torch.fx.Graph) -> dict[str, object]:
    """Target -> object for every attribute the graph reads; leaf modules are shallow copies."""
    root: dict[str, object] = {}
    for node in graph.nodes:
        if node.op in ("get_attr", "call_module") and node.target not in root:
            obj = _graph.get_attr(gm, node.target)
            root[node.target] = _shallow(obj) if isinstance(obj, nn.Module) else obj
    return root


def _shallow(module: nn.Module) -> nn.Module:
    """A copy sharing parameters and buffers, without LoRA children.

    Children are copied too, so `eval()` on the export copy leaves the user's modules alone.
    """
    clone = copy.copy(module)
    clone._parameters = dict(module._parameters)
    clone._buffers = dict(module._buffers)
    clone._modules = {
        k: _shallow(v)
        for k, v in module._modules.items()
        if k not in HOLDERS and k != "modules_to_save" and v is not None
    }
    return clone


def _adapter_sites(
    module: torch.fx.GraphModule, state: LoraState, adapters: tuple[str, ...]
) -> dict[str, Site]:
    """The sites of the exported adapters, found again in the copy."""
    found = all_sites(module)
    # Parameter sites are found by the adapters' `target_parameters` (the copy has no state);
    # a 2-D one may share its name with a linear site on the same weight (a router's F.linear).
    for name in adapters:
        targets = state.adapters[name].config.target_parameters
        if targets:
            found.update({s.fqn: s for s in find_param_sites(module, list(targets))})
    wanted = {fqn for name in adapters for fqn in state.adapters[name].sites}
    missing = sorted(wanted - set(found))
    if missing:
        raise OnnxExportError(
            f"sites {missing[:4]} of the LoRA state are not in the export copy of the graph; "
            "was the graph changed outside lora_fx's passes after inject?"
        )
    return {fqn: found[fqn] for fqn in found if fqn in wanted}


def _plan_merged(
    gm: torch.fx.GraphModule,
    state: LoraState,
    adapters: tuple[str, ...],
    sites: dict[str, Site],
    out: ExportGraph,
) -> None:
    """Name each merged site weight (and bias) with a function that computes it when written."""
    readers = _tensor_paths(out.module)
    for fqn, site in sites.items():
        folds = [
            (name, state.adapters[name].sites[fqn])
            for name in adapters
            if fqn in state.adapters[name].sites
        ]
        folds.sort(key=lambda fold: not fold[1].use_dora)  # DoRA first, as `merge` folds
        reason = kind_of(site).refuse_merge(site)
        if reason is not None:
            raise MergeError(f"{reason}; export it with merged=False")
        dora = [n for n, rec in state.adapters.items() if rec.merged and fqn in rec.sites]
        dora = [n for n in dora if state.adapters[n].sites[fqn].use_dora]
        dora += [name for name, rec in folds if rec.use_dora]
        if len(dora) > 1:
            raise MergeError(
                f"site {fqn!r} would fold {len(dora)} DoRA adapters {dora}; DoRA rescales the "
                "whole weight, so only one folds exactly; export them with merged=False"
            )
        if any(rec.lora_bias for _, rec in folds) and site.bias is None:
            raise MergeError(f"site {fqn!r} has lora_bias=True but no base bias to fold it into")
        weight = _own_tensor(out.module, site, site.weight, readers)
        out.merged_weights[weight] = _merged_weight(gm, site, folds)
        if any(rec.lora_bias for _, rec in folds):
            bias = _own_tensor(out.module, site, site.bias, readers)
            out.merged_weights[bias] = _merged_bias(gm, site, folds)


def _merged_weight(
    gm: torch.fx.GraphModule, site: Site, folds: list[tuple[str, SiteRecord]]
) -> Callable[[], torch.Tensor]:
    """`W + sum(scale * B @ A)` (each variant's delta) in float32, as `merge` does; in W's dtype."""
    weight = _graph.get_attr(gm, site.weight)

    def compute() -> torch.Tensor:
        with torch.no_grad():
            total = weight.detach().to(torch.float32)
            for name, rec in folds:  # as `merge` folds them, DoRA's rescaling included
                total = _fold.fold_value(gm, site, name, rec, total).to(total.device)
            return total.to(weight.dtype)

    return compute


def _merged_bias(
    gm: torch.fx.GraphModule, site: Site, folds: list[tuple[str, SiteRecord]]
) -> Callable[[], torch.Tensor]:
    """`b + sum(scale * b_B)` for adapters with `lora_bias`."""
    bias = _graph.get_attr(gm, site.bias)

    def compute() -> torch.Tensor:
        with torch.no_grad():
            total = bias.detach().to(torch.float32)
            for name, rec in folds:
                if rec.lora_bias:
                    total = total + _fold.bias_delta(gm, site, name, rec)
            return total.to(bias.dtype)

    return compute


def _tensor_paths(module: nn.Module) -> dict[int, list[str]]:
    """id(tensor) -> every path it is registered under."""
    paths: dict[int, list[str]] = {}
    named = [
        *module.named_parameters(remove_duplicate=False),
        *module.named_buffers(remove_duplicate=False),
    ]
    for name, tensor in named:
        paths.setdefault(id(tensor), []).append(name)
    return paths


def _own_tensor(
    module: torch.fx.GraphModule, site: Site, path: str, readers: dict[int, list[str]]
) -> str:
    """A path that only the site reads its tensor under, aliasing the tensor if needed (rule 3).

    Export names a tensor registered twice once, so GPT-2's graph reads `lm_head.weight` for the
    embedding too. Other readers of the site's path move to another name of the same tensor
    (`transformer.wte.weight`); without one, the site gets `<site>.merged_weight` (or `_bias`).
    """
    graph = module.graph
    tensor = _graph.get_attr(module, path)
    others = [p for p in readers.get(id(tensor), []) if p != path]
    shared = [n for n in graph.nodes if n.op == "get_attr" and n.target == path]
    uses = [(n, u) for n in shared for u in n.users]
    # A weight-read site's nodes are the reads themselves: whatever consumes them is the site's.
    foreign = [(n, u) for n, u in uses if n not in site.nodes and not feeds_only(u, site.nodes)]
    if foreign and not others:
        path = _free_path(module, f"{site.fqn}.merged_{path.rpartition('.')[2]}")
        put_tensor(module, path, nn.Parameter(tensor.detach(), requires_grad=False))
        _rewire([(n, u) for n, u in uses if feeds_only(u, site.nodes)], path)
        return path
    _rewire(foreign, others[0] if foreign else path)
    if others:
        alias = nn.Parameter(tensor.detach(), requires_grad=False)  # same storage, own identity
        _replace_tensor(module, path, alias)
    return path


def _rewire(uses: list[tuple[torch.fx.Node, torch.fx.Node]], path: str) -> None:
    """Make each user read `path` through a get_attr of its own instead of the given node."""
    for node, user in uses:
        with node.graph.inserting_before(user):
            getter = node.graph.get_attr(path)
        user.replace_input_with(node, getter)


def _free_path(module: nn.Module, path: str) -> str:
    """`path`, or `path_1`, `path_2`, ... if something is registered there."""
    candidate, i = path, 0
    while True:
        try:
            _graph.get_attr(module, candidate)
        except AttributeError:
            return candidate
        i += 1
        candidate = f"{path}_{i}"


def _replace_tensor(module: nn.Module, path: str, tensor: torch.Tensor) -> None:
    """Swap the tensor registered at `path` on the copy (its owner is a copy too)."""
    owner_path, _, name = path.rpartition(".")
    owner = module.get_submodule(owner_path) if owner_path else module
    if name in owner._parameters:
        owner._parameters[name] = tensor
    else:
        owner._buffers[name] = tensor
