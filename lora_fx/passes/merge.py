"""Merge adapters into the base weights, and take them back out.

    merge:    W <- W + scale * B @ A   (per site; the branch nodes leave the graph)
    unmerge:  W <- W - scale * B @ A   (the branches come back for active adapters)

Rules:
1. The delta is never formed: `W.addmm_(B, A, alpha=scale)` in place (float32 weights, no extra
   memory), or row chunks upcast to float32 and rounded once (bf16/fp16: a few MiB at most;
   `ops.add_low_rank_`). `lora_bias` folds `scale * b_B` into the base bias.
2. Low-precision weights lose part of the delta to rounding. `merge` measures it per site
   (`||applied - delta|| / ||delta||`), keeps the report on the graph until the next merge, past
   `unload` (`lora_fx.merge_report(gm)` after `merge_and_unload`), logs it, and warns above 1 %.
   A delta with NaN or Inf reports NaN, and `merge` warns that it wrote non-finite weights
   (PEFT merges them silently; `safe_merge=True` refuses them instead).
3. `safe_merge=True` computes every merged weight in a copy first and raises on non-finite values
   before any weight is written.
4. A weight read by several sites (tied embeddings) or other ops is first given a private copy for
   the merged site, so the other users keep the base weight (PEFT would change them all). A
   warning says how many bytes that costs.
5. A merged graph runs exactly the base ops: merging an adapter removes its branch nodes.
6. The graph shares weights with the captured model, so merging changes the eager model too (as
   PEFT's merge does); `unmerge` restores it, up to rounding.
7. DoRA folds `W <- m / ||W + delta|| * (W + delta)` and keeps the norm for `unmerge`; DoRA
   adapters fold before plain ones on a site, and only one DoRA adapter per site can be merged.
   Quantized (bitsandbytes) weights are dequantized, folded and re-quantized, with a warning;
   `unmerge` in reverse fold order restores them bitwise (`_fold.py`).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import warnings
from collections.abc import Iterable

import torch
import torch.fx
from torch import nn

from lora_fx.core import graph as _graph
from lora_fx.core.state import (
    MERGE_REPORT_META,
    LoraState,
    SiteRecord,
    lora_tag,
    require_no_arrow,
    require_state,
    resolve_adapters,
)
from lora_fx.errors import AdapterError, MergeError
from lora_fx.passes import _fold
from lora_fx.passes._branch import remove_branches
from lora_fx.passes._rollback import active_undo, transactional
from lora_fx.passes._sync import sync
from lora_fx.sites import Site, all_sites
from lora_fx.sites.kinds import kind_of
from lora_fx.sites.node_reads import feeds_only, weight_getter

__all__ = ["merge", "merge_report", "unmerge"]

log = logging.getLogger(__name__)

_ROUNDING_WARN = 0.01


@transactional
def merge(
    gm: torch.fx.GraphModule, adapter_names: Iterable[str] | None = None, safe_merge: bool = False
) -> torch.fx.GraphModule:
    """Fold adapters into the base weights, in place, and remove their branches from the graph.

    Args:
        gm: A graph with adapters injected.
        adapter_names: Adapters to merge; default: every active adapter not merged yet.
        safe_merge: Compute all merged weights in copies and check they are finite before writing.

    Returns:
        The same GraphModule, recompiled. `merge_report(gm)` gives the rounding loss per site.

    Raises:
        AdapterError: An unknown adapter name, or no adapter on the graph.
        MergeError: `safe_merge` found non-finite values, or a site cannot be merged
            (grouped conv, `lora_bias` on a site without bias). Nothing was written.

    Example:
        >>> gm = lora_fx.merge(gm)   # outputs unchanged, zero LoRA overhead
    """
    # plan
    state = require_state(gm)
    names = resolve_adapters(state, adapter_names)
    if state.batch_adapters is not None:
        raise AdapterError(
            "cannot merge in mixed-batch mode; call set_adapter_batch(gm, None) first"
        )
    already = [n for n in names if state.adapters[n].merged]
    for name in already:
        warnings.warn(f"adapter {name!r} is already merged; nothing to do for it", stacklevel=2)
    names = [n for n in names if not state.adapters[n].merged]
    require_no_arrow(state, names, "merge", MergeError)  # PEFT refuses to merge a router too
    sites = all_sites(gm)
    plan = [
        (name, sites[fqn], rec) for name in names for fqn, rec in state.adapters[name].sites.items()
    ]
    for _, site, rec in plan:
        _check_mergeable(gm, site, rec)
    _check_dora_once(state, plan)
    # DoRA first on each site: its norm must see the weight its branch reads (before plain folds).
    plan.sort(key=lambda item: not item[2].use_dora)
    if safe_merge:
        _check_finite(gm, plan)

    # apply
    report: dict[tuple[str, str], float] = {}
    quantized: list[tuple[str, str]] = []
    remove_branches(gm)  # the "weight" layout reads W through its own nodes; sync rebuilds
    readers = _graph.tensor_readers(gm)
    undo = active_undo(gm)
    for name, site, rec in plan:
        shared = _graph.get_attr(gm, site.weight)
        site = _untie_if_shared(gm, site, state, readers)
        # If this pass (or one that called it) fails later, the fold comes back out; a private
        # copy of a tied weight just goes with the module tree.
        if _graph.get_attr(gm, site.weight) is shared:
            undo.on_restore(functools.partial(_unfold_if_folded, gm, site, name, rec, state))
        report[(name, site.fqn)] = _fold.fold(gm, site, name, rec, state)
        if _fold.is_quantized_site(gm, site):
            quantized.append((name, site.fqn))
    for name in names:
        state.adapters[name].merged = True
    gm.meta[MERGE_REPORT_META] = report
    sync(gm)

    # report
    broken = [f"{name}:{fqn}" for (name, fqn), loss in report.items() if not math.isfinite(loss)]
    if broken:
        warnings.warn(
            f"merge wrote non-finite weights (NaN or Inf in the adapter) into {len(broken)} "
            f"sites: {broken[:4]}{' ...' if len(broken) > 4 else ''}; the model's outputs will "
            "be NaN; merge with safe_merge=True to refuse such an adapter",
            stacklevel=2,
        )
    report_ok = {k: v for k, v in report.items() if math.isfinite(v)}
    worst = max(report_ok.values(), default=0.0)
    log.info("merge: %d adapters, %d sites, worst rounding loss %.2e", len(names), len(plan), worst)
    if quantized:
        warnings.warn(
            f"merge re-quantized {len(quantized)} quantized base weights: up to "
            f"{max(report_ok.get(k, 0.0) for k in quantized):.1%} of a site's delta was lost "
            "to rounding; "
            "merge_and_unload(gm, dequantize=True) merges exactly into a dequantized graph; "
            "see lora_fx.merge_report(gm)",
            stacklevel=2,
        )
        worst = max((v for k, v in report_ok.items() if k not in quantized), default=0.0)
    if worst > _ROUNDING_WARN:
        warnings.warn(
            f"merge lost up to {worst:.1%} of a site's delta to rounding in the base weight dtype; "
            "merge in float32 (gm.float()) to keep it; see lora_fx.merge_report(gm)",
            stacklevel=2,
        )
    return gm


@transactional
def unmerge(
    gm: torch.fx.GraphModule, adapter_names: Iterable[str] | None = None
) -> torch.fx.GraphModule:
    """Take merged adapters back out of the base weights, in place, restoring active branches.

    Args:
        gm: A graph with merged adapters.
        adapter_names: Adapters to unmerge; default: every merged adapter.

    Returns:
        The same GraphModule, recompiled.

    Raises:
        AdapterError: An unknown adapter name.

    Example:
        >>> gm = lora_fx.unmerge(gm)   # base weights as before merge (up to rounding)
    """
    state = require_state(gm)
    merged = [n for n, rec in state.adapters.items() if rec.merged]
    names = (
        merged
        if adapter_names is None
        else [n for n in resolve_adapters(state, adapter_names) if n in merged]
    )
    sites = all_sites(gm)
    undo = active_undo(gm)
    for name, fqn in _unfold_order(state, names):
        rec = state.adapters[name].sites[fqn]
        # If this pass (or one that called it) fails later, the delta goes back in.
        undo.on_restore(functools.partial(_fold_if_unfolded, gm, sites[fqn], name, rec, state))
        _fold.unfold(gm, sites[fqn], name, rec, state)
    for name in names:
        state.adapters[name].merged = False
    sync(gm)  # active branches come back, in activation order
    log.info("unmerge: %d adapters", len(names))
    return gm


def merge_report(gm: torch.fx.GraphModule) -> dict[str, float]:
    """The last merge's rounding loss per `"adapter:site"` (relative error of the folded delta).

    The report stays on the graph until the next merge, so it is there after `merge_and_unload`.
    """
    kept = gm.meta.get(MERGE_REPORT_META, {})  # by (adapter, site); shown as "adapter:site"
    return {f"{adapter}:{site}": loss for (adapter, site), loss in kept.items()}


def _unfold_if_folded(
    gm: torch.fx.GraphModule, site: Site, adapter: str, rec: SiteRecord, state: LoraState
) -> None:
    """Rollback of one fold: unfold it if it is still in the weights (its undo entry says so)."""
    if (adapter, site.fqn) in state.merge_undo:
        _fold.unfold(gm, site, adapter, rec, state)


def _fold_if_unfolded(
    gm: torch.fx.GraphModule, site: Site, adapter: str, rec: SiteRecord, state: LoraState
) -> None:
    """Rollback of one unfold: fold the delta back in if it is out of the weights."""
    if (adapter, site.fqn) not in state.merge_undo:
        _fold.fold(gm, site, adapter, rec, state)


def _unfold_order(state: LoraState, names: list[str]) -> list[tuple[str, str]]:
    """(adapter, site) pairs to unfold: the reverse of the fold order, then any not recorded."""
    wanted = {(n, fqn) for n in names for fqn in state.adapters[n].sites}
    recorded = list(reversed(state.merge_undo))
    order = [pair for pair in recorded if pair in wanted]
    rest = [(n, fqn) for n in reversed(names) for fqn in state.adapters[n].sites]
    return order + [pair for pair in rest if pair not in set(order)]


def _check_mergeable(gm: torch.fx.GraphModule, site: Site, rec: SiteRecord) -> None:
    """Refuse sites whose delta is not one weight, before anything is written."""
    reason = kind_of(site).refuse_merge(site)
    if reason is not None:
        raise MergeError(reason)
    if rec.lora_bias and site.bias is None:
        raise MergeError(f"site {site.fqn!r} has lora_bias=True but no base bias to fold it into")
    if rec.alora:
        raise MergeError(
            f"site {site.fqn!r} has an aLoRA adapter (alora_invocation_tokens), which acts only "
            "from each row's invocation tokens on, so it is no weight change: it cannot be merged "
            "(PEFT: 'aLoRA does not support merging'); keep it unmerged or unload it"
        )


def _check_dora_once(state: LoraState, plan: list[tuple[str, Site, SiteRecord]]) -> None:
    """At most one DoRA adapter per site can be merged exactly (each rescales the whole weight)."""
    dora: dict[str, list[str]] = {}
    for name, rec in state.adapters.items():
        if rec.merged:
            for fqn, site_rec in rec.sites.items():
                if site_rec.use_dora:
                    dora.setdefault(fqn, []).append(name)
    for name, site, rec in plan:
        if rec.use_dora:
            dora.setdefault(site.fqn, []).append(name)
    for fqn, names in dora.items():
        if len(names) > 1:
            raise MergeError(
                f"site {fqn!r} would hold {len(names)} merged DoRA adapters {names}; DoRA "
                "rescales the whole weight, so only one can be merged per site"
            )


def _check_finite(gm: torch.fx.GraphModule, plan: list[tuple[str, Site, SiteRecord]]) -> None:
    """safe_merge: every merged weight must be finite; nothing is written here."""
    for name, site, rec in plan:
        merged = _fold.merged_value(gm, site, name, rec)
        if not torch.isfinite(merged).all():
            raise MergeError(
                f"safe_merge: merging adapter {name!r} into site {site.fqn!r} gives non-finite "
                "weights; nothing was merged"
            )


def _untie_if_shared(
    gm: torch.fx.GraphModule, site: Site, state: LoraState, readers: dict[int, list[torch.fx.Node]]
) -> Site:
    """Give the site a private copy of its weight when other nodes read it too; returns the site."""
    weight = _graph.get_attr(gm, site.weight)
    own_nodes = set(site.nodes)
    others = [
        n
        for n in readers.get(id(weight), [])
        if n not in own_nodes
        and not all(feeds_only(u, own_nodes) for u in n.users)
        and lora_tag(n) is None
    ]
    if not others:
        return site
    private = nn.Parameter(weight.detach().clone(), requires_grad=False)
    path = f"{site.fqn}.weight"
    holder = _graph.own_module(gm, site.fqn, state)
    if site.nodes[0].op == "call_module":
        holder.weight = private
    else:
        holder.register_parameter("weight", private)
        for node in site.nodes:
            consumer, reader = _weight_reader(node, site.weight)
            with gm.graph.inserting_before(consumer):
                getter = gm.graph.get_attr(path)
            consumer.replace_input_with(reader, getter)
    # Later sites must not count this site's nodes as readers of the old weight any more.
    readers[id(weight)] = [n for n in readers[id(weight)] if n not in own_nodes]
    users = [n.target if n.op in ("get_attr", "call_module") else n.name for n in others]
    warnings.warn(
        f"site {site.fqn!r} shares its weight with {users}; merging gives it a "
        f"private copy ({private.numel() * private.element_size():,d} bytes) so the other users "
        "keep the base weight",
        stacklevel=3,
    )
    return dataclasses.replace(site, weight=path)


def _weight_reader(node: torch.fx.Node, weight: str) -> tuple[torch.fx.Node, torch.fx.Node]:
    """`(consumer, get_attr)` where a site op reads `weight` (directly or through a view)."""
    found = weight_getter(node, weight)
    if found is not None:
        return found
    raise MergeError(
        f"cannot give {node.format_node()} a private weight: it reads {weight!r} through another op"
    )
