"""Add a new adapter that combines existing ones (PEFT's `add_weighted_adapter`).

    adapters a, b on site s:  Δ_a = s_a B_a A_a,  Δ_b = s_b B_b A_b
    ->  new adapter n on s:   Δ_n = B_n A_n  (scale 1)  ≈ w_a Δ_a + w_b Δ_b  (exact for cat and svd)

The math is in `lora_fx.math.combine`; this pass plans, checks, creates the adapter with `inject`
and writes the combined factors into it.

Rules:
1. Plan first: every check runs, and every factor is computed, before the graph changes; a rejected
   call leaves the graph, its parameters and their `requires_grad` as they were.
2. Combination types and ranks (checked per site; PEFT compares each adapter's largest rank):
   `linear`, `ties`, `dare_linear`, `dare_ties`, `magnitude_prune` combine factors and need the
   adapters on a site to have one rank, which the new adapter keeps; `cat` stacks ranks (new rank
   on a site = sum of the ranks there); the `*svd` types combine deltas and factor them at
   `svd_rank`, by default the largest input rank, on every site. With one adapter every type is
   `linear` (as PEFT), with a warning when another type was asked for.
3. The new adapter covers the union of the inputs' sites (PEFT unions `target_modules` and inherits
   the first adapter's `layers_to_transform` / `exclude_modules`, which can drop or add sites). Its
   config is the first adapter's with `r` / `lora_alpha` equal to the new rank, so the scale is 1,
   `rank_pattern` / `alpha_pattern` where ranks differ per site, and `target_modules` listing the
   sites.
4. The new adapter is inactive and frozen, as PEFT leaves it; `set_adapter` switches to it.
5. DARE's random masks come from the global RNG in PEFT's order: PEFT first initialises the new
   adapter (drawing from the RNG), then draws masks site by site in module order, adapter by
   adapter, A before B. This pass makes the same draws, so under one seed the masks are PEFT's.
6. The svd types run in float32 even for half-precision adapters (torch has no half SVD; PEFT
   upcasts through type promotion). The new adapter's dtype follows the inputs': float32 when they
   were autocast (`autocast_adapter_dtype`), else the base dtype (PEFT's svd types leave float32
   factors in a half-precision adapter).

Deviations from PEFT (each fixes a PEFT defect):
7. An existing `adapter_name` raises `AdapterError` (PEFT returns silently, doing nothing).
8. The new adapter's scale is 1 even when the inputs use rsLoRA: PEFT inherits `use_rslora`, which
   scales the combined adapter by `sqrt(r)` more than its factors mean. The factors equal PEFT's.
9. `svd_rank` above a site's `min(out, in)` pads the factors with zeros (PEFT builds factors of the
   wrong shape, and the forward fails). Conv1d / Conv3d sites are factored like Conv2d (PEFT runs
   a batched SVD on them, and the forward fails).
10. Refused where PEFT gives a wrong adapter: inputs with `lora_bias` (PEFT leaves the new bias at
    its initial value), `cat` and the svd types on grouped convs, DARE with `density=0` (0/0).
    Adapters targeting one module with `modules_to_save` are refused as in PEFT; a single adapter's
    module copy is not part of the new adapter (PEFT gives it an untrained copy: the same outputs).
11. `svd_driver` on CPU tensors, an unknown `majority_sign_method`, or a missing `density` raise
    before anything changes (PEFT raises after injecting the new adapter).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import numbers
import re
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.fx

from lora_fx.config import LoraConfig
from lora_fx.core import graph as _graph
from lora_fx.core.state import (
    LoraState,
    require_no_arrow,
    require_no_tokens,
    require_state,
    resolve_adapters,
)
from lora_fx.errors import AdapterError
from lora_fx.math import combine, ops
from lora_fx.passes._rollback import transactional
from lora_fx.passes._sync import sync
from lora_fx.passes.inject import inject
from lora_fx.sites import Site, all_sites, find_sites
from lora_fx.sites.kinds import kind_of, lora_paths

__all__ = ["COMBINATION_TYPES", "add_weighted_adapter"]

log = logging.getLogger(__name__)

# combination type -> the task-arithmetic merge it applies (to factors, or to deltas for *svd).
_FACTOR_TYPES = {name: name for name in combine.MERGES}
_SVD_TYPES = {
    "svd": "linear",
    "ties_svd": "ties",
    "dare_linear_svd": "dare_linear",
    "dare_ties_svd": "dare_ties",
    "magnitude_prune_svd": "magnitude_prune",
}
COMBINATION_TYPES = (
    "svd",
    "linear",
    "cat",
    "ties",
    "ties_svd",
    "dare_ties",
    "dare_linear",
    "dare_ties_svd",
    "dare_linear_svd",
    "magnitude_prune",
    "magnitude_prune_svd",
)
_SVD_DRIVERS = (None, "gesvd", "gesvdj", "gesvda")


@dataclass(frozen=True)
class _SitePlan:
    """One site of the new adapter: the inputs there (in call order) and the new rank."""

    site: Site
    adapters: tuple[str, ...]
    weights: tuple[float, ...]
    rank: int


@dataclass(frozen=True)
class _Plan:
    """Everything the pass will do, decided before anything changes."""

    combination_type: str
    sites: tuple[_SitePlan, ...]  # in module order (PEFT's loop order)
    config: LoraConfig
    peft_rank: int  # the one rank PEFT gives every site (only its RNG draws depend on it)
    density: float | None
    majority_sign_method: str
    svd_clamp: float | None
    svd_full_matrices: bool
    svd_driver: str | None


@transactional
def add_weighted_adapter(
    gm: torch.fx.GraphModule,
    adapters: Sequence[str],
    weights: Sequence[float],
    adapter_name: str,
    combination_type: str = "svd",
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
    svd_full_matrices: bool = True,
    svd_driver: str | None = None,
    density: float | None = None,
    majority_sign_method: str = "total",
) -> torch.fx.GraphModule:
    """Add adapter `adapter_name` combining `adapters` with `weights`, in place (PEFT's semantics).

    Args:
        gm: A graph holding the adapters to combine.
        adapters: Names of existing adapters (a name may repeat).
        weights: One weight per adapter; negative weights subtract.
        adapter_name: Name of the new adapter (must be new).
        combination_type: One of `svd`, `linear`, `cat`, `ties`, `ties_svd`, `dare_linear`,
            `dare_ties`, `dare_linear_svd`, `dare_ties_svd`, `magnitude_prune`,
            `magnitude_prune_svd`. `cat` and `svd` are exact (svd up to truncation at `svd_rank`);
            `linear` mixes the factors and is a rough approximation.
        svd_rank: Rank of the new adapter for the svd types (default: the largest input rank).
        svd_clamp: Quantile in [0, 1] to clamp the svd factors' entries at (None: no clamping).
        svd_full_matrices: Passed to `torch.linalg.svd`.
        svd_driver: cuSOLVER driver (`gesvd`, `gesvdj`, `gesvda`); CUDA tensors only.
        density: Fraction of entries kept, in [0, 1] ((0, 1] for DARE); needed by every type
            except `linear`, `cat` and `svd`.
        majority_sign_method: `"total"` or `"frequency"`: how TIES elects each entry's sign.

    Returns:
        The same GraphModule, recompiled, with the new adapter inactive and frozen.

    Raises:
        AdapterError: An unknown or merged adapter, an existing `adapter_name`, mismatched
            `weights`, ranks the combination type cannot combine, an argument out of range, or
            an input PEFT would combine wrongly (see the module docstring).

    Example:
        >>> lora_fx.add_weighted_adapter(gm, ["a", "b"], [0.7, 0.3], "ab", combination_type="cat")
        >>> lora_fx.set_adapter(gm, "ab")
    """
    # plan: check everything and compute every factor; nothing changes yet
    state = require_state(gm)
    _check_arguments(state, adapters, weights, adapter_name, combination_type)
    if len(adapters) == 1 and combination_type != "linear":
        warnings.warn(
            f"combination_type={combination_type!r} with one adapter is computed as 'linear' "
            "(as PEFT does)",
            stacklevel=2,
        )
        combination_type = "linear"
    _check_options(combination_type, svd_rank, svd_clamp, svd_driver, density, majority_sign_method)
    sites, config, peft_rank = _plan_sites(gm, state, adapters, weights, combination_type, svd_rank)
    plan = _Plan(
        combination_type,
        sites,
        config,
        peft_rank,
        density,
        majority_sign_method,
        svd_clamp,
        svd_full_matrices,
        svd_driver,
    )
    _check_inputs(gm, state, plan)
    factors = _compute_factors(gm, state, plan)

    # apply
    _create_adapter(gm, state, plan, adapter_name, factors)

    # report (inject and sync recompiled)
    ranks = sorted({sp.rank for sp in plan.sites})
    log.info(
        "add_weighted_adapter: %r = %s of %s with weights %s -> %d sites, rank %s",
        adapter_name,
        plan.combination_type,
        list(adapters),
        [float(w) for w in weights],
        len(plan.sites),
        ranks[0] if len(ranks) == 1 else ranks,
    )
    return gm


def _compute_factors(
    gm: torch.fx.GraphModule, state: LoraState, plan: _Plan
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The new adapter's `(A, B)` per site, drawing from the global RNG as PEFT does (rule 5)."""
    _draw_like_peft_init(plan)  # PEFT initialises the new adapter before it draws DARE masks
    factors = {}
    for sp in plan.sites:
        try:
            factors[sp.site.fqn] = _combine_site(gm, state, plan, sp)
        except ValueError as e:
            raise AdapterError(f"add_weighted_adapter failed on site {sp.site.fqn!r}: {e}") from e
    return factors


def _create_adapter(
    gm: torch.fx.GraphModule,
    state: LoraState,
    plan: _Plan,
    adapter_name: str,
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
) -> None:
    """Inject the new adapter, inactive and frozen, and write its factors; other flags unchanged."""
    requires_grad = {name: p.requires_grad for name, p in gm.named_parameters()}
    autocast = _inputs_upcast(gm, plan)
    with torch.random.fork_rng(devices=[]):  # inject's initial values are overwritten below
        inject(gm, plan.config, adapter_name, autocast_adapter_dtype=autocast)
    if adapter_name in state.active:  # PEFT leaves the combined adapter inactive
        state.active.remove(adapter_name)
        sync(gm)
    with torch.no_grad():
        for sp in plan.sites:
            paths = lora_paths(sp.site.kind, sp.site.fqn, adapter_name)
            for path, value in zip((paths.a, paths.b), factors[sp.site.fqn], strict=True):
                param = _graph.get_attr(gm, path)
                param.copy_(value.reshape(param.shape))  # svd factors of convs are [.., r] matrices
    for name, param in gm.named_parameters():
        param.requires_grad_(requires_grad.get(name, False))  # inject re-marks the base biases


# ---------------------------------------------------------------- plan


def _check_arguments(
    state: LoraState,
    adapters: Sequence[str],
    weights: Sequence[float],
    adapter_name: str,
    combination_type: str,
) -> None:
    """Names, weights and the combination type."""
    if isinstance(adapters, str) or not isinstance(adapters, Sequence) or not adapters:
        raise AdapterError(
            f"adapters={adapters!r} is invalid; expected a non-empty list of adapter names"
        )
    resolve_adapters(state, list(adapters))  # unknown names -> AdapterError listing the known ones
    require_no_tokens(state, adapters, "add_weighted_adapter")
    require_no_arrow(state, adapters, "add_weighted_adapter")
    if isinstance(weights, str) or not isinstance(weights, Sequence):
        raise AdapterError(f"weights={weights!r} is invalid; expected a list of numbers")
    if len(weights) != len(adapters):
        raise AdapterError(
            f"got {len(adapters)} adapters {list(adapters)} but {len(weights)} weights "
            f"{list(weights)}; give one weight per adapter"
        )
    bad = [w for w in weights if not _is_real(w) or not math.isfinite(w)]
    if bad:
        raise AdapterError(f"weights {bad!r} are invalid; expected finite numbers")
    if not isinstance(adapter_name, str) or not adapter_name.isidentifier():
        raise AdapterError(
            f"adapter_name={adapter_name!r} is invalid; expected a Python identifier"
        )
    if adapter_name in state.adapters:
        raise AdapterError(
            f"adapter {adapter_name!r} already exists (PEFT would silently do nothing); "
            f"pick a new name or delete_adapter(gm, {adapter_name!r}) first"
        )
    if combination_type not in COMBINATION_TYPES:
        raise AdapterError(
            f"combination_type={combination_type!r} is invalid; expected one of "
            f"{list(COMBINATION_TYPES)}"
        )
    merged = [name for name, rec in state.adapters.items() if rec.merged]
    if merged:
        raise AdapterError(
            f"adapters {merged} are merged; call lora_fx.unmerge(gm) before add_weighted_adapter"
        )
    for field, what in (
        ("kasa_config", "KaSA"),
        ("use_bdlora", "BD-LoRA"),
        ("velora_config", "VeLoRA"),
        ("alora_invocation_tokens", "aLoRA"),
        ("use_qalora", "QALoRA"),
        ("monteclora_config", "MonteCLoRA"),
    ):
        configs = {n: state.adapters[n].config for n in adapters if n in state.adapters}
        used = [n for n, config in configs.items() if getattr(config, field)]
        if used:
            raise AdapterError(
                f"adapters {used} use {what} (not a plain A and B), which add_weighted_adapter "
                "does not combine"
            )


def _check_options(
    combination_type: str,
    svd_rank: int | None,
    svd_clamp: float | None,
    svd_driver: str | None,
    density: float | None,
    majority_sign_method: str,
) -> None:
    """The options of the (effective) combination type; unused ones only warn."""
    merge = _FACTOR_TYPES.get(combination_type) or _SVD_TYPES.get(combination_type)
    if majority_sign_method not in combine.SIGN_METHODS:
        raise AdapterError(
            f"majority_sign_method={majority_sign_method!r} is invalid; expected one of "
            f"{list(combine.SIGN_METHODS)}"
        )
    if merge in (None, "linear"):
        if density is not None:
            warnings.warn(
                f"density={density!r} is ignored by combination_type={combination_type!r}",
                stacklevel=3,
            )
    elif density is None or not _is_real(density) or not 0 <= density <= 1:
        raise AdapterError(
            f"combination_type={combination_type!r} needs density in [0, 1] (the fraction of "
            f"entries kept), got {density!r}"
        )
    elif merge.startswith("dare") and density == 0:
        raise AdapterError(
            f"combination_type={combination_type!r} rescales by 1/density; density=0 gives NaN "
            "(PEFT's result); use a density in (0, 1]"
        )
    if combination_type in _SVD_TYPES:
        if svd_rank is not None and (
            isinstance(svd_rank, bool) or not isinstance(svd_rank, int) or svd_rank <= 0
        ):
            raise AdapterError(f"svd_rank={svd_rank!r} is invalid; expected a positive integer")
        if svd_clamp is not None and (not _is_real(svd_clamp) or not 0 <= svd_clamp <= 1):
            raise AdapterError(
                f"svd_clamp={svd_clamp!r} is invalid; expected a quantile in [0, 1] or None"
            )
        if svd_driver not in _SVD_DRIVERS:
            raise AdapterError(
                f"svd_driver={svd_driver!r} is invalid; expected one of {list(_SVD_DRIVERS)}"
            )
    else:
        unused = {"svd_rank": svd_rank, "svd_clamp": svd_clamp, "svd_driver": svd_driver}
        for name, value in unused.items():
            if value is not None:
                warnings.warn(
                    f"{name}={value!r} is ignored by combination_type={combination_type!r}",
                    stacklevel=3,
                )


def _plan_sites(
    gm: torch.fx.GraphModule,
    state: LoraState,
    adapters: Sequence[str],
    weights: Sequence[float],
    combination_type: str,
    svd_rank: int | None,
) -> tuple[tuple[_SitePlan, ...], LoraConfig, int]:
    """The new adapter's sites (the inputs' union, in module order), its config and PEFT's rank."""
    by_name = all_sites(gm)
    fqns = {fqn for name in adapters for fqn in state.adapters[name].sites}
    order = {path: i for i, (path, _) in enumerate(gm.named_modules())}
    graph_order = {fqn: i for i, fqn in enumerate(by_name)}
    ordered = sorted(fqns, key=lambda f: (order.get(f, len(order)), graph_order[f]))
    largest = max(rec.r for name in adapters for rec in state.adapters[name].sites.values())
    sites = []
    for fqn in ordered:
        here = [
            (n, float(w))
            for n, w in zip(adapters, weights, strict=True)
            if fqn in state.adapters[n].sites
        ]
        ranks = [state.adapters[n].sites[fqn].r for n, _ in here]
        if combination_type == "cat":
            rank = sum(ranks)
        elif combination_type in _SVD_TYPES:
            rank = svd_rank or largest
        elif len(set(ranks)) == 1:
            rank = ranks[0]
        else:
            raise AdapterError(
                f"combination_type={combination_type!r} needs equal ranks on each site, but on "
                f"{fqn!r} the ranks are {dict(zip([n for n, _ in here], ranks, strict=True))}; "
                "use 'cat' or an svd type"
            )
        names, ws = zip(*here, strict=True)
        sites.append(_SitePlan(by_name[fqn], names, ws, rank))
    config = _new_config(gm, state.adapters[adapters[0]].config, sites)
    return tuple(sites), config, _peft_rank(state, adapters, combination_type, svd_rank)


def _peft_rank(
    state: LoraState, adapters: Sequence[str], combination_type: str, svd_rank: int | None
) -> int:
    """PEFT's `new_rank`, from each config's largest rank (`_check_add_weighted_adapter`)."""
    configs = [state.adapters[name].config for name in adapters]
    ranks = [max([cfg.r, *cfg.rank_pattern.values()]) for cfg in configs]
    if combination_type == "cat":
        return sum(ranks)
    if combination_type in _SVD_TYPES:
        return svd_rank or max(ranks)
    return max(ranks)


def _new_config(gm: torch.fx.GraphModule, first: LoraConfig, sites: list[_SitePlan]) -> LoraConfig:
    """The first input's config with the new targets and ranks; scale 1 everywhere (rules 3, 8)."""
    ranks = {sp.site.fqn: sp.rank for sp in sites}
    r = Counter(ranks.values()).most_common(1)[0][0]
    for exact in (False, True):
        # Plain site names read best; anchored regexes are exact when one name ends another.
        names = [_exact(fqn) if exact else fqn for fqn in ranks]
        pattern = {
            name: rank for name, rank in zip(names, ranks.values(), strict=True) if rank != r
        }
        cfg = dataclasses.replace(
            first,
            r=r,
            lora_alpha=r,
            use_rslora=False,
            target_modules=f"(?:{'|'.join(names)})" if exact else names,
            rank_pattern=pattern,
            alpha_pattern=dict(pattern),
            exclude_modules=None,
            layers_to_transform=None,
            layers_pattern=None,
            modules_to_save=None,
            lora_bias=False,
            target_parameters=None,
        )
        chosen = {site.fqn for site in find_sites(gm, cfg)}
        if chosen == set(ranks) and all(cfg.rank_for(f) == k for f, k in ranks.items()):
            return cfg
    raise AssertionError(f"no config selects exactly the sites {list(ranks)}")


def _exact(fqn: str) -> str:
    """A regex matching exactly `fqn`, also behind `rank_pattern`'s optional-prefix group."""
    return "^" + re.escape(fqn)


def _check_inputs(gm: torch.fx.GraphModule, state: LoraState, plan: _Plan) -> None:
    """Inputs the combination cannot honour: lora_bias, shared copies, grouped convs, driver."""
    names = list(dict.fromkeys(n for sp in plan.sites for n in sp.adapters))
    with_bias = [n for n in names if any(rec.lora_bias for rec in state.adapters[n].sites.values())]
    if with_bias:
        raise AdapterError(
            f"adapters {with_bias} have lora_bias=True; add_weighted_adapter cannot combine LoRA "
            "biases (PEFT leaves the new bias at its initial value)"
        )
    copies = Counter(p for n in names for p in state.adapters[n].modules_to_save)
    shared = sorted(p for p, k in copies.items() if k > 1)
    if shared:
        raise AdapterError(
            f"several adapters have modules_to_save copies of {shared}; these cannot be combined "
            "(as in PEFT)"
        )
    if copies:
        warnings.warn(
            f"the modules_to_save copies of {sorted(copies)} are not part of the combined adapter, "
            "which uses the original modules",
            stacklevel=3,
        )
    kind = plan.combination_type
    if kind == "cat" or kind in _SVD_TYPES:
        grouped = [sp.site.fqn for sp in plan.sites if sp.site.conv and sp.site.conv.groups > 1]
        if grouped:
            raise AdapterError(
                f"combination_type={kind!r} cannot combine grouped-conv sites {grouped}: their "
                "delta is not one B @ A; use 'linear' or another factor type"
            )
    if plan.svd_driver is not None and kind in _SVD_TYPES:
        first = plan.sites[0]
        device = _graph.get_attr(
            gm, lora_paths(first.site.kind, first.site.fqn, first.adapters[0]).a
        ).device
        if device.type != "cuda":
            raise AdapterError(
                f"svd_driver={plan.svd_driver!r} works only for CUDA tensors "
                f"(torch.linalg.svd); the adapters are on {device}; pass svd_driver=None"
            )


def _inputs_upcast(gm: torch.fx.GraphModule, plan: _Plan) -> bool:
    """Whether the inputs were autocast (float32 on a half site): the new adapter follows them."""
    sp = plan.sites[0]
    lora_a = _graph.get_attr(gm, lora_paths(sp.site.kind, sp.site.fqn, sp.adapters[0]).a)
    return lora_a.dtype != _graph.get_attr(gm, sp.site.weight).dtype


def _is_real(value: object) -> bool:
    """A real number that is not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


# ---------------------------------------------------------------- math per site


def _draw_like_peft_init(plan: _Plan) -> None:
    """Advance the global RNG as PEFT's `inject_adapter` does when it creates the new adapter.

    PEFT builds A/B as `nn.Linear` / `nn.ConvNd` (kaiming-uniform: one `uniform_` each) or, for
    embeddings, with `torch.randn`; then `reset_lora_parameters` re-draws A (`uniform_` for
    `init_lora_weights=True`, `normal_` for "gaussian"), or embedding B (`normal_`). Same-shape
    draws consume the RNG identically, so the DARE masks drawn next are PEFT's.
    """
    init = plan.config.init_lora_weights
    for sp in plan.sites:
        a_shape, b_shape = kind_of(sp.site).factor_shapes(sp.site, plan.peft_rank)
        if sp.site.kind == "embedding":
            torch.empty(a_shape).normal_()
            torch.empty(b_shape).normal_()
            if init:
                torch.empty(b_shape).normal_()
            continue
        torch.empty(a_shape).uniform_()
        torch.empty(b_shape).uniform_()
        if init is True:
            torch.empty(a_shape).uniform_()
        elif init == "gaussian":
            torch.empty(a_shape).normal_()


def _combine_site(
    gm: torch.fx.GraphModule, state: LoraState, plan: _Plan, sp: _SitePlan
) -> tuple[torch.Tensor, torch.Tensor]:
    """The new adapter's `(A, B)` on one site."""
    site, kind = sp.site, plan.combination_type
    paths = [lora_paths(site.kind, site.fqn, name) for name in sp.adapters]
    lora_as = [_graph.get_attr(gm, p.a).detach() for p in paths]
    lora_bs = [_graph.get_attr(gm, p.b).detach() for p in paths]
    scales = [state.adapters[name].sites[site.fqn].scale for name in sp.adapters]
    if kind == "cat":
        return combine.concat_factors(lora_as, lora_bs, sp.weights, scales)
    if kind in _FACTOR_TYPES:
        return combine.combine_factors(
            kind,
            lora_as,
            lora_bs,
            sp.weights,
            scales,
            density=plan.density,
            majority_sign_method=plan.majority_sign_method,
        )
    # svd types: deltas in the base weight's layout (where PEFT draws its masks), float32 at least
    deltas = [
        ops.delta_weight(site.kind, a, b, s, transposed=site.transposed)
        for a, b, s in zip(lora_as, lora_bs, scales, strict=True)
    ]
    weights = torch.tensor(sp.weights).to(deltas[0].device)
    delta = combine.merge_tensors(
        _SVD_TYPES[kind],
        deltas,
        weights,
        density=plan.density,
        majority_sign_method=plan.majority_sign_method,
    )
    matrix = combine.to_matrix(site.kind, delta, transposed=site.transposed)
    return combine.svd_factors(
        matrix,
        sp.rank,
        clamp=plan.svd_clamp,
        full_matrices=plan.svd_full_matrices,
        driver=plan.svd_driver,
    )
