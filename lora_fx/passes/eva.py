"""Inject an adapter initialised from calibration data: EVA (PEFT's `init_lora_weights="eva"`).

    x = <site input>   ->   x = <site input>;  observe(x)        (only while the batches run)
    A <- top right-singular vectors of the observed x (incremental PCA, `math/eva.py`);  B <- 0

Rules:
1. Plan: the config, the batches and the sites are checked before anything runs; the graph is
   changed only by the final `inject` (rolled back whole if anything after it fails).
2. Observers are graph nodes (`_calibrate.observing`, shared with CorDA): one `call_function`
   after each distinct site input records the tensor; they are erased and the graph recompiled
   before this pass returns or raises. Sites that read the same node (q/k/v, gate/up) share one
   PCA (PEFT finds them by hashing the first batch's inputs; lora_fx sees the shared node).
3. As PEFT: the batches cycle until every site's needed components have converged (cosine
   similarity to the previous batch >= `tau`); a converged site is no longer observed; a batch
   with fewer tokens than a site's components is skipped for that site. After `max_steps`
   forward passes without convergence it raises (PEFT loops forever).
4. Ranks: the config's total rank goes to the largest explained-variance ratios, at most
   `round(r * rho)` per site; a site with rank 0 gets no branch. The adapter's config is PEFT's
   result: `target_modules` lists the sites kept, `rank_pattern` / `alpha_pattern` the ranks and
   alphas (`alpha * new_r / r` with `adjust_scaling_factors`) that differ from `r` / `lora_alpha`.
5. Tokens: a dict batch is passed by keyword; `attention_mask` and `labels` are also read for the
   token mask (PEFT's default: tokens with mask 0, or with `use_label_mask` a label equal to
   `label_mask_value`, are left out) and need not be graph inputs. A tensor or tuple batch is
   passed positionally and every row of `[..., in]` counts.
6. Differences from PEFT: with `whiten`, PEFT divides a shared PCA's components in place once per
   site that reads them (q, k and v get different, repeatedly divided A's); here each site gets
   `V / sqrt(S)` once. A `target_modules` list of 20 or more is not shortened to suffixes.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from collections.abc import Iterable
from typing import Any

import torch
import torch.fx

from lora_fx.capture import as_graph_module
from lora_fx.config import LoraConfig
from lora_fx.core import graph as _graph
from lora_fx.core.state import state_or_none
from lora_fx.errors import CalibrationError, ConfigError, UnsupportedSiteError
from lora_fx.math.eva import Pca, distribute_ranks, pca_step, similarity
from lora_fx.passes._calibrate import Observed, check_batches, graph_inputs, observing, run_batch
from lora_fx.passes._rollback import rollback_on_error
from lora_fx.passes.inject import check_request, inject, site_record
from lora_fx.sites import Site, find_sites
from lora_fx.sites.kinds import lora_paths

__all__ = ["initialize_eva"]

log = logging.getLogger(__name__)


def initialize_eva(
    gm: torch.fx.GraphModule | torch.export.ExportedProgram,
    cfg: LoraConfig,
    batches: Iterable[Any],
    adapter_name: str = "default",
    *,
    max_steps: int = 1000,
    autocast_adapter_dtype: bool = True,
) -> torch.fx.GraphModule:
    """Inject adapter `adapter_name` with EVA's data-driven A (and zero B), in place.

    PEFT's `get_peft_model(model, LoraConfig(init_lora_weights="eva"))` followed by
    `initialize_lora_eva_weights(model, dataloader)`, as one pass: the batches run through the
    base graph, observer nodes collect each site's inputs, and the adapter is injected with the
    ranks EVA distributed.

    Args:
        gm: A captured graph (`lora_fx.capture`), an ExportedProgram, or a traced GraphModule.
        cfg: A config with `init_lora_weights="eva"` (and `eva_config`, PEFT's `EvaConfig`).
        batches: Calibration inputs, iterated more than once: each a dict of keyword inputs
            (`input_ids`, `attention_mask`, `labels`), a tuple of positional inputs, or a tensor.
        adapter_name: Name of the new adapter.
        max_steps: Forward passes allowed before unconverged components raise.
        autocast_adapter_dtype: As in `inject`.

    Returns:
        The same GraphModule (a new one only when given an ExportedProgram), recompiled.

    Raises:
        TypeError: `cfg` is not a LoraConfig.
        ConfigError: `init_lora_weights` is not "eva"; or what `inject` refuses.
        UnsupportedSiteError: A site that is not linear, or with `round(r * rho) > in_features`.
        CalibrationError: No batches, no batch, a batch that does not fit the graph's inputs, or
            components that did not converge within `max_steps` passes.

    Example:
        >>> cfg = LoraConfig(r=8, target_modules="all-linear", init_lora_weights="eva",
        ...                  eva_config=EvaConfig(rho=2.0))
        >>> gm = lora_fx.initialize_eva(lora_fx.capture(model, (ids,)), cfg, batches)
    """
    # plan
    if not isinstance(cfg, LoraConfig):
        raise TypeError(f"cfg must be a lora_fx.LoraConfig, got {type(cfg).__name__}")
    if cfg.init_lora_weights != "eva":
        raise ConfigError(
            f"initialize_eva needs init_lora_weights='eva', got {cfg.init_lora_weights!r}; "
            "use lora_fx.inject for other initialisations"
        )
    gm = as_graph_module(gm)
    check_request(gm, cfg, adapter_name)
    batches = check_batches(gm, batches, "eva")
    components = _measure(gm, cfg, batches, max_steps)
    final = _eva_config(gm, cfg, components)

    # apply: the branches PEFT's config describes, then A from the PCA (B stays zero)
    with rollback_on_error(gm):
        plain = dataclasses.replace(final, init_lora_weights=True, eva_config=None)
        inject(gm, plain, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)
        state_or_none(gm).adapters[adapter_name].config = final
        with torch.no_grad():
            for site in find_sites(gm, final):
                paths = lora_paths(site.kind, site.fqn, adapter_name)
                lora_a, lora_b = _graph.get_attr(gm, paths.a), _graph.get_attr(gm, paths.b)
                lora_a.copy_(components[site.fqn].to(lora_a.dtype))
                lora_b.zero_()
    kept = sum(1 for a in components.values() if len(a))
    log.info(
        "initialize_eva: adapter %r -> %d sites (%d with rank 0 left out), ranks %s",
        adapter_name,
        kept,
        len(components) - kept,
        {fqn: len(a) for fqn, a in components.items()},
    )
    return gm


def _measure(
    gm: torch.fx.GraphModule, cfg: LoraConfig, batches: list[Any], max_steps: int
) -> dict[str, torch.Tensor]:
    """Run the batches with observers on the site inputs; return each site's A `[rank, in]`."""
    eva = cfg.eva_config
    sites = find_sites(gm, cfg)
    rank = {site.fqn: site_record(cfg, site).r for site in sites}
    most = {site.fqn: round(rank[site.fqn] * eva["rho"]) for site in sites}
    for site in sites:
        if site.kind != "linear":  # PEFT measures nn.Linear / Conv1D only
            raise UnsupportedSiteError(
                f"init_lora_weights='eva' initialises linear sites only; {site.fqn!r} is a "
                f"{site.kind} site (exclude it, or use another init)"
            )
        if most[site.fqn] > site.in_features:
            raise UnsupportedSiteError(
                f"init_lora_weights='eva' measures round(r * rho) = {most[site.fqn]} directions "
                f"of the inputs of site {site.fqn!r}, which has in_features={site.in_features}; "
                f"use r * rho <= {site.in_features}"
            )
    # sites reading the same nodes share one PCA, measured by the first; max ranks made equal
    groups: dict[tuple[torch.fx.Node, ...], list[Site]] = {}
    for site in sites:
        groups.setdefault(site.inputs, []).append(site)
    measured = {group[0].fqn: inputs for inputs, group in groups.items()}
    shared = {s.fqn: group[0].fqn for group in groups.values() for s in group[1:]}
    for group in groups.values():
        top = max(most[s.fqn] for s in group)
        most.update({s.fqn: top for s in group})

    plan = _Plan(measured, most, shared, sum(rank.values()), eva)
    with observing(gm, [n for inputs in measured.values() for n in inputs]) as observed:
        pcas = _converge(gm, batches, plan, observed, max_steps)
    ranks = distribute_ranks(
        {fqn: pcas[fqn].explained_variance_ratio[: most[fqn]] for fqn in measured},
        shared,
        sum(rank.values()),
    )
    components = {}
    for site in sites:  # graph order, as PEFT's module order
        pca, r = pcas[shared.get(site.fqn, site.fqn)], ranks[site.fqn]
        a = pca.components[:r]
        if eva["whiten"]:
            a = a / pca.singular_values[:r].sqrt().reshape(-1, 1)
        components[site.fqn] = a
    return components


@dataclasses.dataclass(frozen=True)
class _Plan:
    """What to measure: input nodes per measuring site, max ranks, shared inputs, rank budget."""

    measured: dict[str, tuple[torch.fx.Node, ...]]  # measuring site -> the nodes it reads
    most: dict[str, int]  # round(r * rho), equal across sites sharing an input
    shared: dict[str, str]  # site -> the site measuring its input
    budget: int  # the config's total rank
    eva: dict[str, Any]  # the config's eva_config


def _converge(
    gm: torch.fx.GraphModule,
    batches: list[Any],
    plan: _Plan,
    observed: Observed,
    max_steps: int,
) -> dict[str, Pca]:
    """PEFT's loop: cycle the batches until every measured site's needed components converged."""
    measured, most, tau = plan.measured, plan.most, plan.eva["tau"]
    pcas: dict[str, Pca | None] = dict.fromkeys(measured)
    converged = {fqn: torch.zeros(most[fqn], dtype=torch.bool) for fqn in measured}
    done = dict.fromkeys(measured, False)
    needed = dict(most)  # PEFT's rank_dist: the max ranks until every site has a PCA
    takes = graph_inputs(gm)
    for step, (i, batch) in enumerate(itertools.cycle(enumerate(batches))):
        for fqn in measured:
            done[fqn] = bool(torch.all(converged[fqn][: needed[fqn]]))
        if all(done.values()):
            return pcas
        if step == max_steps:
            left = [fqn for fqn, ok in done.items() if not ok]
            raise CalibrationError(
                f"EVA's components of sites {left} did not converge (tau={tau}) in "
                f"max_steps={max_steps} forward passes; pass more or more varied batches, a "
                "lower tau, or a larger max_steps"
            )
        observed.watching = {n.name for fqn in measured if not done[fqn] for n in measured[fqn]}
        observed.seen = {}
        run_batch(gm, batch, i, takes)
        mask = _token_mask(batch, plan.eva) if isinstance(batch, dict) else None
        for fqn, inputs in measured.items():
            if done[fqn]:
                continue
            for node in inputs:  # a module called twice: one PCA step per call, as PEFT's hook
                x = _tokens(observed.seen[node.name], mask, fqn)
                if x.shape[0] < most[fqn]:  # PEFT skips a batch with too few tokens
                    continue
                pca = pca_step(pcas[fqn], x, most[fqn])
                if pcas[fqn] is not None:
                    converged[fqn] = similarity(pca, pcas[fqn]) >= tau
                pcas[fqn] = pca
        if all(pca is not None for pca in pcas.values()):
            ratios = {fqn: pcas[fqn].explained_variance_ratio[: most[fqn]] for fqn in measured}
            needed = distribute_ranks(ratios, plan.shared, plan.budget)
    raise AssertionError("unreachable: itertools.cycle of a non-empty list")


def _token_mask(batch: dict[str, Any], eva: dict[str, Any]) -> torch.Tensor | None:
    """PEFT's `prepare_model_inputs_fn_language_modeling`: the tokens that count, `[b, s]` bool."""
    if "attention_mask" in batch:
        mask = batch["attention_mask"].bool()
    elif "input_ids" in batch:
        mask = torch.ones_like(batch["input_ids"]).bool()
    else:
        return None
    if eva["use_label_mask"] and "labels" in batch:
        mask = torch.logical_and(mask, batch["labels"] != eva["label_mask_value"])
    return mask


def _tokens(x: torch.Tensor, mask: torch.Tensor | None, fqn: str) -> torch.Tensor:
    """A site input as rows `[n, in]`: the masked tokens, or every row."""
    if mask is None:
        return x.reshape(-1, x.shape[-1]) if x.ndim > 2 else x
    if tuple(x.shape[: mask.ndim]) != tuple(mask.shape):
        raise CalibrationError(
            f"the input of site {fqn!r} has shape {tuple(x.shape)}, which does not start with the "
            f"token mask's shape {tuple(mask.shape)} (attention_mask / input_ids); pass tuple "
            "batches to use every row"
        )
    return x[mask.nonzero().T.unbind()]


def _eva_config(
    gm: torch.fx.GraphModule, cfg: LoraConfig, components: dict[str, torch.Tensor]
) -> LoraConfig:
    """PEFT's `_load_eva_state_dict` config: the sites kept, their ranks and alphas."""
    sites = {site.fqn: site for site in find_sites(gm, cfg)}
    rank_pattern, alpha_pattern = {}, {}
    for fqn, a in components.items():
        record = site_record(cfg, sites[fqn])
        new_r, alpha = a.shape[0], record.lora_alpha
        if new_r == 0:
            continue
        if new_r != record.r and cfg.eva_config["adjust_scaling_factors"]:
            alpha *= new_r / record.r
        if new_r != cfg.r:
            rank_pattern[fqn] = new_r
        if alpha != cfg.lora_alpha:
            alpha_pattern[fqn] = alpha
    kept = [fqn for fqn, a in components.items() if a.shape[0]]
    return dataclasses.replace(
        cfg, target_modules=kept, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern
    )
