"""Inject LoRA branches beside every site a config selects.

    y = linear(x, W, b)  ->  y = linear(x, W, b) + scale * lora_B(lora_A(dropout(x)))

Rules:
1. Plan first (match sites and `modules_to_save`, check every value), then change anything: a
   rejected call leaves the graph and its parameters as they were.
2. Parameters are registered in the module tree under PEFT's in-memory names
   (`<site>.lora_A.<adapter>.weight`), so `gm.state_dict()` reads like a PEFT model's.
3. Base parameters are frozen; the adapter's A/B, the biases `bias` selects and the trainable copies
   of `modules_to_save` require grad (PEFT's `_mark_only_adapters_as_trainable`).
4. `modules_to_save` modules get a deep copy at `<module>.modules_to_save.<adapter>` and every graph
   reference to the module is pointed at the copy; the original stays, frozen.
5. LoRA parameters take the device of the site's base weight and its dtype, except that with
   `autocast_adapter_dtype=True` (PEFT's default) float16 / bfloat16 become float32; the branch then
   casts its input to the adapter's dtype and its output back (nodes with role "cast").
6. As in PEFT, the first adapter on a graph becomes active and trainable; later ones are added
   inactive and frozen (no nodes, no cost) until `set_adapter` activates them.
7. Variants, per site, after A and B exist: `init_lora_weights` "pissa" / "olora" / "loftq" /
   "orthogonal" (`inits.py`; the first three rewrite the base weight), then DoRA's magnitude
   `<site>.lora_magnitude_vector.<adapter>.weight` (`use_dora`), an Arrow router's GenKnowSub
   and prototypes (`arrow_config`, `_arrow.py`). `target_parameters` adds "param"
   sites (`W -> W + delta` where W is read). On a bitsandbytes base the adapter is float32.
8. `trainable_token_indices` adds "tokens" sites (`sites/tokens.py`): the chosen embedding rows
   (and a tied output layer's) read `<embedding>.token_adapter.trainable_tokens_delta.<adapter>`,
   which starts as the rows' values; they train with the adapter's LoRA parameters.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import warnings
from collections import Counter

import torch
import torch.fx
from torch import nn

from lora_fx.capture import as_graph_module
from lora_fx.config import LoraConfig
from lora_fx.core import graph as _graph
from lora_fx.core.keys import is_adapter_parameter
from lora_fx.core.state import (
    AdapterRecord,
    SiteRecord,
    get_state,
    require_flat,
    state_or_none,
)
from lora_fx.errors import AdapterError, ConfigError
from lora_fx.math import quant
from lora_fx.math.inits import changes_base
from lora_fx.passes._alora import add_alora
from lora_fx.passes._arrow import add_arrow, plan_arrow
from lora_fx.passes._base_init import init_from_base
from lora_fx.passes._bdlora import add_block_diagonal
from lora_fx.passes._dora import add_magnitude
from lora_fx.passes._inline import inline_targeted_leaves
from lora_fx.passes._kasa import add_kasa
from lora_fx.passes._monteclora import add_monteclora
from lora_fx.passes._qalora import add_qalora
from lora_fx.passes._rollback import rollback_on_error
from lora_fx.passes._sync import sync
from lora_fx.passes._velora import add_velora
from lora_fx.passes.replicate import apply_replication
from lora_fx.sites import (
    Site,
    all_sites,
    convert_moe_config,
    find_sites,
    match_modules_to_save,
    pattern_key,
)
from lora_fx.sites.kinds import kind_of
from lora_fx.sites.tokens import token_weights

__all__ = ["check_request", "inject", "site_record", "targeted_weights"]

log = logging.getLogger(__name__)

_UPCAST = (torch.float16, torch.bfloat16)  # adapter dtypes autocast_adapter_dtype makes float32
_NOT_YET = {}


def inject(
    gm: torch.fx.GraphModule | torch.export.ExportedProgram,
    cfg: LoraConfig,
    adapter_name: str = "default",
    *,
    autocast_adapter_dtype: bool = True,
) -> torch.fx.GraphModule:
    """Add adapter `adapter_name` to every site `cfg` selects, in place.

    Args:
        gm: A captured graph (`lora_fx.capture`), an ExportedProgram, or a traced GraphModule.
        cfg: The LoRA config (PEFT field names and semantics).
        adapter_name: Name of the new adapter.
        autocast_adapter_dtype: As PEFT's: on float16 / bfloat16 sites, create the adapter's
            parameters in float32 (the branch casts its input to float32 and its output back).
            False: the adapter takes the base weight's dtype.

    Returns:
        The same GraphModule (a new one only when given an ExportedProgram), recompiled.

    Raises:
        TypeError: `cfg` is not a LoraConfig.
        ConfigError: A config value lora_fx cannot honour.
        AdapterError: `adapter_name` is taken or not a valid name.
        NoTargetMatchedError: `target_modules` or `modules_to_save` matched nothing.
        UnsupportedSiteError: A matched site cannot carry this adapter (e.g. conv groups vs rank).

    Example:
        >>> gm = lora_fx.capture(model, (ids,), {"use_cache": False})
        >>> gm = lora_fx.inject(gm, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    """
    # plan
    if not isinstance(cfg, LoraConfig):
        raise TypeError(f"cfg must be a lora_fx.LoraConfig, got {type(cfg).__name__}")
    if cfg.init_lora_weights == "eva":
        raise ConfigError(
            "init_lora_weights='eva' initialises A from calibration batches: call "
            "lora_fx.initialize_eva(gm, cfg, batches) instead of inject"
        )
    if cfg.init_lora_weights == "corda":
        raise ConfigError(
            "init_lora_weights='corda' builds A and B from the covariance of calibration "
            "batches: call lora_fx.initialize_corda(gm, cfg, batches) instead of inject"
        )
    if cfg.init_lora_weights == "lora_ga":
        raise ConfigError(
            "init_lora_weights='lora_ga' builds A and B from the gradients of calibration "
            "batches: call lora_fx.initialize_lora_ga(gm, cfg, batches, loss_fn) instead of inject"
        )
    gm = as_graph_module(gm)
    check_request(gm, cfg, adapter_name)
    cfg = convert_moe_config(gm, cfg)  # PEFT's targets on transformers-5 MoE models
    # All or nothing from here: a failing init or DoRA magnitude also takes back the replication.
    with rollback_on_error(gm) as undo:
        apply_replication(gm, cfg.layer_replication)  # sites get the new layer indices
        inline_targeted_leaves(gm, targeted_weights(gm, cfg))  # fx leaves hide weight reads
        sites = find_sites(gm, cfg)
        saved_modules = (
            match_modules_to_save(gm, cfg.modules_to_save) if cfg.modules_to_save else []
        )
        _warn_fan_in_fan_out(cfg, sites)
        records = {site.fqn: site_record(cfg, site) for site in sites}
        arrow = plan_arrow(gm, cfg, sites) if cfg.arrow_config is not None else None
        if arrow is not None:  # an Arrow router: its branches route among the experts
            records = {f: dataclasses.replace(r, arrow=arrow.routes[f]) for f, r in records.items()}

        # apply
        state = get_state(gm)
        first = not state.adapters  # PEFT: the first adapter is active; later ones start inactive
        for site in sites:
            _add_lora_modules(
                gm,
                site,
                adapter_name,
                records[site.fqn],
                cfg.init_lora_weights,
                state,
                autocast_adapter_dtype=autocast_adapter_dtype,
            )
            if kind_of(site).can.base_inits:  # other kinds refuse these inits (tokens: ignore)
                if changes_base(cfg.init_lora_weights):
                    undo.keep(_graph.get_attr(gm, site.weight))
                init_from_base(gm, site, adapter_name, records[site.fqn], cfg)  # PiSSA, LoftQ
            if records[site.fqn].use_kasa:  # truncates the base weight: kept for a rollback
                undo.keep(_graph.get_attr(gm, site.weight))
                add_kasa(gm, site, adapter_name, records[site.fqn], state)
            if records[site.fqn].velora is not None:  # VeLoRA: the projection buffer
                add_velora(gm, site, adapter_name, records[site.fqn], state)
            if records[site.fqn].alora:  # aLoRA: the per-row offsets buffer
                add_alora(gm, site, adapter_name, state)
            if records[site.fqn].monteclora:  # MonteCLoRA: the sampler and its first draws
                rec = records[site.fqn]
                add_monteclora(gm, site, adapter_name, rec.r, cfg.monteclora_config, state)
            if records[site.fqn].qalora_group_size:  # QALoRA: A reads pooled inputs
                add_qalora(gm, site, adapter_name, records[site.fqn])
            if records[site.fqn].block_diagonal:  # BD-LoRA: A or B as blocks
                add_block_diagonal(gm, site, adapter_name, records[site.fqn])
            if records[site.fqn].use_dora:
                add_magnitude(gm, site, adapter_name, records[site.fqn], state)
            if arrow is not None:  # GenKnowSub on the experts, the router's prototypes
                add_arrow(gm, site, adapter_name, arrow, state, undo)
        for path in saved_modules:
            _add_module_copy(gm, path, adapter_name, state)
        state.adapters[adapter_name] = AdapterRecord(cfg, records, saved_modules)
        if first:
            state.active.append(adapter_name)
        _freeze_base(gm, sites, cfg.bias)
        sync(gm)

    # report
    kinds = Counter(site.kind for site in sites)
    log.info(
        "inject: adapter %r -> %d sites (%s)%s",
        adapter_name,
        len(sites),
        ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())),
        f", {len(saved_modules)} modules_to_save" if saved_modules else "",
    )
    return gm


def check_request(gm: torch.fx.GraphModule, cfg: LoraConfig, adapter_name: str) -> None:
    """Reject names and config features that cannot be honoured, before anything changes."""
    require_flat(gm)
    if not isinstance(adapter_name, str) or not adapter_name.isidentifier():
        raise AdapterError(
            f"adapter_name={adapter_name!r} is invalid; expected a Python identifier"
        )
    state = state_or_none(gm)
    if state is not None and adapter_name in state.adapters:
        raise AdapterError(
            f"adapter {adapter_name!r} already exists; existing adapters: {list(state.adapters)}"
        )
    if state is not None and any(rec.merged for rec in state.adapters.values()):
        raise AdapterError(
            "cannot inject while adapters are merged; call lora_fx.unmerge(gm) first"
        )
    for name, feature in _NOT_YET.items():
        if getattr(cfg, name):
            raise ConfigError(f"{name}={getattr(cfg, name)!r}: {feature} is not supported yet")
    if state is not None and state.adapters:
        # PEFT: KaSA truncates the base weight, so it does not mix with other adapters
        kasa = {name: rec.config.kasa_config is not None for name, rec in state.adapters.items()}
        mixed = [name for name, uses in kasa.items() if uses != (cfg.kasa_config is not None)]
        if mixed:
            raise ConfigError(
                f"kasa_config={cfg.kasa_config!r} cannot be combined with adapters {mixed}, "
                "which "
                + ("do not use KaSA" if cfg.kasa_config is not None else "use KaSA")
                + ": KaSA truncates the base weights (as in PEFT)"
            )
    rewrites = "kasa_config" if cfg.kasa_config is not None else None
    if changes_base(cfg.init_lora_weights):
        rewrites = f"init_lora_weights={cfg.init_lora_weights!r}"
    if cfg.layer_replication and rewrites:
        raise ConfigError(
            f"{rewrites} rewrites base weights, which layer_replication shares between copies; "
            "use plain LoRA (init_lora_weights=True or 'gaussian') with it"
        )


def site_record(cfg: LoraConfig, site: Site) -> SiteRecord:
    """Rank, alpha and scale for one site after rank/alpha patterns (`SiteRecord.from_config`)."""
    new_record = kind_of(site).new_record
    if new_record is not None:  # a kind with its own record (trainable tokens: the rows)
        return new_record(cfg, site)
    return SiteRecord.from_config(cfg, pattern_key(site), site.kind)


def targeted_weights(gm: torch.fx.GraphModule, cfg: LoraConfig) -> list[str]:
    """Parameters whose reads a config rewrites: `target_parameters`, trainable-token tables."""
    if cfg.trainable_token_indices is None:
        return list(cfg.target_parameters or ())
    sites = all_sites(gm)
    tables = token_weights(gm, cfg, sites, check=False)
    return [*(cfg.target_parameters or ()), *(sites[fqn].weight for fqn in tables)]


def _warn_fan_in_fan_out(cfg: LoraConfig, sites: list[Site]) -> None:
    """PEFT warns when fan_in_fan_out disagrees with a layer; lora_fx reads the graph's layout."""
    linear = [s for s in sites if s.kind == "linear"]
    if cfg.fan_in_fan_out and any(not s.transposed for s in linear):
        warnings.warn(
            "fan_in_fan_out=True but some sites store weights [out, in]; lora_fx uses each "
            "site's own layout from the graph",
            stacklevel=3,
        )


def _add_lora_modules(
    gm: torch.fx.GraphModule,
    site: Site,
    adapter: str,
    record: SiteRecord,
    init: bool | str,
    state,
    *,
    autocast_adapter_dtype: bool,
) -> None:
    """Register A, B and dropout for one site under PEFT's names, initialised as PEFT does."""
    holder = _graph.own_module(gm, site.fqn, state)
    base = _graph.get_attr(gm, site.weight)
    # PEFT's cast_adapter_dtype: half-precision adapters would lose most small updates to rounding.
    # On a quantized (bitsandbytes) base the adapter is float32, as in PEFT.
    base_dtype = torch.float32 if quant.is_quantized(base) else base.dtype
    dtype = torch.float32 if autocast_adapter_dtype and base_dtype in _UPCAST else base_dtype
    kind = kind_of(site)
    factors = kind.new_factors(site, record.r, record.lora_bias, init)
    if kind.init_factors is not None:  # values read from the base weight (trainable tokens)
        factors = kind.init_factors(site, record, base)
    for holder_name, factor in zip(kind.holders, factors, strict=True):
        # PEFT's containers: a ModuleDict of nn.Linear / nn.ConvNd, or a ParameterDict of tensors
        is_module = isinstance(factor, nn.Module)
        if holder_name not in holder._modules:
            holder.add_module(holder_name, nn.ModuleDict() if is_module else nn.ParameterDict())
        value = factor.to(base.device, dtype)
        getattr(holder, holder_name)[adapter] = value if is_module else nn.Parameter(value)
    if "lora_dropout" not in holder._modules:
        holder.add_module("lora_dropout", nn.ModuleDict())
    dropout = nn.Dropout(record.dropout) if record.dropout > 0 else nn.Identity()
    holder.lora_dropout[adapter] = dropout.train(gm.training)


def _add_module_copy(gm: torch.fx.GraphModule, path: str, adapter: str, state) -> None:
    """A deep copy of a module at `<path>.modules_to_save.<adapter>` (sync points to it)."""
    trained = copy.deepcopy(gm.get_submodule(path))
    holder = _graph.own_module(gm, path, state)
    if "modules_to_save" not in holder._modules:
        holder.add_module("modules_to_save", nn.ModuleDict())
    holder.modules_to_save[adapter] = trained


def _freeze_base(gm: torch.fx.GraphModule, sites: list[Site], bias: str) -> None:
    """Freeze every base parameter except the biases `bias` selects (PEFT's bias rule)."""
    for name, param in gm.named_parameters():
        if not is_adapter_parameter(name):
            param.requires_grad_(bias == "all" and name.rsplit(".", 1)[-1] == "bias")
    if bias == "lora_only":
        for site in sites:
            if site.bias is not None:
                _graph.get_attr(gm, site.bias).requires_grad_(True)
