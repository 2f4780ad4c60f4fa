"""Arrow on one site: the router's prototypes buffer and the routed branch (PEFT's Arrow variant).

    y' = y + scale * B(A(x))   ->   c = arrow_coefficients(x, P, top_k, T)       [..., E]
                                    y' = y + arrow_delta(x, c, [A_e], [B_e], [s_e])

Rules:
1. A router is an adapter whose config has `arrow_config` (PEFT's `arrow_router`). Its experts
   are other adapters on the graph: `task_adapter_names`, or (None) every adapter that is not a
   router nor a general one, PEFT's `task_*` / `gks_*` naming. Planning refuses, before any
   change: unknown experts, `top_k` above the number of experts, GenKnowSub without general
   adapters, experts with a variant (DoRA, KaSA, ...), experts whose sites or ranks differ
   (PEFT's `check_loaded_lora_compatibility_arrow`), and non-linear sites. (Merged experts:
   inject refuses while any adapter is merged.)
2. Like PEFT's lazy first forward, but once at inject: GenKnowSub subtracts the general
   adapters' mean A and mean B from every expert's A and B (in place; a failed inject puts
   them back), then each expert's prototype (the top right singular vector of B @ A, PEFT's
   power iteration and seed) is stored as the non-persistent buffer
   `<site>.lora_arrow.<router>.prototypes` [E, in] (PEFT's path; never saved).
3. The branch reads the prototypes and the experts' A and B from the module tree: a "route" node
   computes the per-token coefficients, a "lora_b" node the weighted sum of the experts' outputs
   (`math/arrow.py`); no wrapper module, no Python control flow. The router's own A and B exist
   (as PEFT's) but are not read. Dropout (router's `lora_dropout`) acts on the delta, as PEFT's.
4. Per-token routing has no single `B @ A`: merge, mixed batches, weighted combinations, hotswap
   and merged ONNX export refuse routers (`state.require_no_arrow`); unload drops them.
5. ONNX export with `merged=False` ("initializers") emits the same branch in the export copy: the
   routing is abs / matmul / topk / scatter / softmax / einsum, the prototypes and the experts'
   A and B are named initializers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.fx
from torch import nn

from lora_fx.config import LoraConfig
from lora_fx.core import graph as _graph
from lora_fx.core.state import ArrowRoute, LoraState, SiteRecord, state_or_none
from lora_fx.errors import AdapterError, ConfigError, UnsupportedSiteError
from lora_fx.math.arrow import (
    arrow_coefficients,
    arrow_delta,
    arrow_prototypes,
    general_knowledge_mean,
)
from lora_fx.passes._emit import Emitter, chain_end, weighted_rows
from lora_fx.passes._rollback import Undo
from lora_fx.sites import Site
from lora_fx.sites.kinds import lora_paths

__all__ = ["ArrowPlan", "add_arrow", "emit_arrow", "plan_arrow"]

_aten = torch.ops.aten
_GENERAL = re.compile(r"gks_\d+")  # PEFT's names for general adapters (create_arrow_model)
# Expert features Arrow's routing ignores (it reads A and B only): refused, not dropped.
_VARIANTS = ("use_dora", "kasa_config", "use_bdlora", "velora_config", "lora_bias")


@dataclass(frozen=True)
class ArrowPlan:
    """A router's experts, general adapters, seed and per-site routes (checked, rule 1)."""

    experts: tuple[str, ...]
    general: tuple[str, ...]
    seed: int | None
    routes: dict[str, ArrowRoute]


def plan_arrow(gm: torch.fx.GraphModule, cfg: LoraConfig, sites: list[Site]) -> ArrowPlan:
    """Check a router config against the adapters on the graph (rule 1); change nothing.

    Raises:
        AdapterError: An unknown expert.
        ConfigError: No expert, top_k too large, GenKnowSub without general adapters, an expert
            with a variant, experts whose sites or ranks differ, or router sites they lack.
        UnsupportedSiteError: A router or expert site that is not linear.
    """
    arrow = cfg.arrow_config
    state = state_or_none(gm)
    adapters = state.adapters if state is not None else {}
    general = _general_names(arrow, adapters)
    experts = _expert_names(arrow, adapters, general)
    unknown = [n for n in [*experts, *general] if n not in adapters]
    if unknown:
        raise AdapterError(
            f"arrow_config names unknown adapter(s) {unknown}; adapters on this graph: "
            f"{list(adapters)}"
        )
    if not experts:
        raise ConfigError(
            "arrow_config found no task expert on this graph; load the experts first "
            "(lora_fx.create_arrow_model loads them as task_0, task_1, ...)"
        )
    if arrow["top_k"] > len(experts):
        raise ConfigError(
            f"arrow_config top_k={arrow['top_k']} is larger than the number of task experts "
            f"({len(experts)}: {experts}); use top_k <= {len(experts)}"
        )
    _check_experts(state, [*experts, *general])
    for site in sites:
        if site.kind != "linear":
            raise UnsupportedSiteError(
                f"arrow_config on {site.kind} site {site.fqn!r}: Arrow routes linear sites only"
            )
    missing = [s.fqn for s in sites if s.fqn not in adapters[experts[0]].sites]
    if missing:
        raise ConfigError(
            f"the Arrow router targets {missing}, where the experts have no adapter; target "
            f"the experts' sites: {sorted(adapters[experts[0]].sites)}"
        )
    routes = {}
    for site in sites:
        scales = tuple(adapters[e].sites[site.fqn].scale for e in experts)
        routes[site.fqn] = ArrowRoute(
            tuple(experts), scales, arrow["top_k"], float(arrow["router_temperature"])
        )
    return ArrowPlan(tuple(experts), tuple(general), arrow["rng_seed"], routes)


def _expert_names(arrow: dict, adapters: dict, general: list[str]) -> list[str]:
    """The task experts: the named ones, else every adapter but routers and general ones."""
    if arrow["task_adapter_names"] is not None:
        return list(arrow["task_adapter_names"])
    return [
        n
        for n, rec in adapters.items()
        if rec.config.arrow_config is None and n not in general and not _GENERAL.fullmatch(n)
    ]


def _general_names(arrow: dict, adapters: dict) -> list[str]:
    """The GenKnowSub adapters: none without `use_gks`, else the named or `gks_<i>` ones."""
    if not arrow["use_gks"]:
        return []
    general = arrow["gks_adapter_names"]
    if general is None:
        general = [n for n in adapters if _GENERAL.fullmatch(n)]
    if not general:
        raise ConfigError(
            "arrow_config use_gks=True needs general adapters (gks_adapter_names, or adapters "
            "named gks_0, gks_1, ...: create_arrow_model's general_adapter_paths)"
        )
    return list(general)


def _check_experts(state: LoraState, names: list[str]) -> None:
    """Experts (and general adapters): plain LoRA, linear, the same sites and ranks."""
    first = names[0]
    for name in names:
        record = state.adapters[name]  # none is merged: inject refuses while any is
        used = [v for v in _VARIANTS if getattr(record.config, v)]
        if record.config.arrow_config is not None or record.config.trainable_token_indices:
            used.append("arrow_config or trainable_token_indices")
        if used:
            raise ConfigError(f"Arrow expert {name!r} uses {used}; Arrow mixes plain LoRA experts")
        bad = [f for f, rec in record.sites.items() if rec.kind != "linear"]
        if bad:
            raise UnsupportedSiteError(
                f"Arrow expert {name!r} adapts non-linear sites {bad}; Arrow experts must "
                "target linear layers only (as in PEFT)"
            )
        ref = state.adapters[first].sites
        if set(record.sites) != set(ref):
            raise ConfigError(
                f"Arrow expert {name!r} targets {sorted(record.sites)}, but {first!r} targets "
                f"{sorted(ref)}; every expert must adapt the same sites (as in PEFT)"
            )
        ranks = {rec.r for rec in record.sites.values()} | {rec.r for rec in ref.values()}
        if any(rec.r != ref[fqn].r for fqn, rec in record.sites.items()) or len(ranks) > 1:
            raise ConfigError(
                f"Arrow expert {name!r} has rank(s) {sorted({r.r for r in record.sites.values()})}"
                f" but {first!r} has {sorted({r.r for r in ref.values()})}; every expert must "
                "have the same rank (as in PEFT)"
            )


def add_arrow(
    gm: torch.fx.GraphModule,
    site: Site,
    adapter: str,
    plan: ArrowPlan,
    state: LoraState,
    undo: Undo,
) -> None:
    """GenKnowSub on the experts, then the prototypes buffer of `adapter` on `site` (rule 2)."""
    paths = [lora_paths(site.kind, site.fqn, e) for e in plan.experts]
    lora_as = [_graph.get_attr(gm, p.a) for p in paths]
    lora_bs = [_graph.get_attr(gm, p.b) for p in paths]
    if plan.general:
        general = [lora_paths(site.kind, site.fqn, g) for g in plan.general]
        mean_a, mean_b = general_knowledge_mean(
            [_graph.get_attr(gm, p.a) for p in general], [_graph.get_attr(gm, p.b) for p in general]
        )
        with torch.no_grad():
            for tensor, mean in [*((a, mean_a) for a in lora_as), *((b, mean_b) for b in lora_bs)]:
                undo.keep(tensor)
                tensor.sub_(mean)
    holder = _graph.own_module(gm, site.fqn, state)
    if "lora_arrow" not in holder._modules:
        holder.add_module("lora_arrow", nn.ModuleDict())
    router = nn.Module()
    router.register_buffer("prototypes", arrow_prototypes(lora_as, lora_bs, plan.seed), False)
    holder.lora_arrow[adapter] = router


def emit_arrow(
    graph: torch.fx.Graph,
    site: Site,
    adapter: str,
    record: SiteRecord,
    *,
    cast: bool,
    export: bool = False,
    row_mask: tuple[str, int] | None = None,
) -> None:
    """The routed branch after every node of `site` (rule 3); `cast`: a float32 adapter.

    `export`: for an export copy, which runs in eval (no dropout node; rule 5). `row_mask`:
    `(index buffer, k)` in a mixed batch: the delta only on the rows whose slot is k (each
    token routes on its own, so the router's rows get what PEFT's sub-batch forward gives).
    """
    route = record.arrow
    experts = [lora_paths(site.kind, site.fqn, e) for e in route.experts]
    for base, x in zip(site.nodes, site.inputs, strict=True):
        end, x = chain_end(base), chain_end(x)
        emit = Emitter(graph, end, {"adapter": adapter, "site": site.fqn})
        protos = emit("weight", "get_attr", f"{site.fqn}.lora_arrow.{adapter}.prototypes")
        lora_as = [emit("weight", "get_attr", p.a) for p in experts]
        lora_bs = [emit("weight", "get_attr", p.b) for p in experts]
        if cast:
            x = emit("cast", "call_function", _aten.type_as.default, (x, lora_as[0]))
        args = (x, protos, route.top_k, route.temperature)
        coefficients = emit("route", "call_function", arrow_coefficients, args)
        args = (x, coefficients, lora_as, lora_bs, route.scales)
        delta = emit("lora_b", "call_function", arrow_delta, args)
        if record.dropout > 0 and not export:
            dropout = lora_paths(site.kind, site.fqn, adapter).dropout
            delta = emit("dropout", "call_module", dropout, (delta,))
        if row_mask is not None:
            delta = weighted_rows(emit, row_mask, delta, 1.0)
        if cast:
            delta = emit("cast", "call_function", _aten.type_as.default, (delta, end))
        emit.attach(end, emit("add", "call_function", _aten.add.Tensor, (end, delta)))
