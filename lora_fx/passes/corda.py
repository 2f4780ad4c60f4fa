"""Inject an adapter initialised from the base weight and its input covariance: CorDA.

    y = linear(x, W)   ->   y = linear(x, W - scale * B @ A) + scale * B(A(x))
    W C = U S Vh  (C: covariance of the observed x);  A, B from the top (ipm) or bottom (kpm) r

Rules:
1. Plan: the config, the batches and the sites are checked, the batches run and every site's A, B
   and residual weight are computed before the graph changes; then `inject` adds plain branches
   and A, B and the residual are written (all rolled back if anything fails).
2. Observers are graph nodes (`_calibrate.observing`, shared with EVA), erased before this pass
   returns or raises. Every batch runs once; each call of a site adds the covariance of its
   input (a module called twice adds two; q/k/v reading one node share it, as PEFT's hooks
   compute the same matrix three times). Every row counts: PEFT's `run_model` sees no mask.
3. As PEFT: the covariance is accumulated in float32 (the inputs' dtype with
   `use_float16_for_covariance`); A and B are float32 (PEFT assigns float32 tensors whatever the
   base dtype) and the residual weight is cast back to the base weight's dtype.
4. **The base weight is rewritten in place** (the captured model sees it too, as with PEFT), so
   `base + adapter` is the original weight to float32 rounding; keep the residual as the base
   that the adapter's files go with. `load_adapter` never reruns the init.
5. Differences from PEFT: `cache_file` / `covariance_file` are refused (PEFT reads or writes
   pickles); a covariance that no damping makes invertible raises (PEFT loops forever); inputs
   with a batch dimension above 1 are flattened to rows (PEFT's hook fails on them).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable
from typing import Any

import torch
import torch.fx

from lora_fx.capture import as_graph_module
from lora_fx.config import LoraConfig
from lora_fx.core import graph as _graph
from lora_fx.errors import CalibrationError, ConfigError
from lora_fx.math.corda import corda, input_covariance
from lora_fx.passes._calibrate import (
    check_batches,
    graph_inputs,
    inject_with_inits,
    observing,
    run_batch,
)
from lora_fx.passes.inject import check_request, site_record
from lora_fx.sites import Site, find_sites

__all__ = ["initialize_corda"]

log = logging.getLogger(__name__)


def initialize_corda(
    gm: torch.fx.GraphModule | torch.export.ExportedProgram,
    cfg: LoraConfig,
    batches: Iterable[Any],
    adapter_name: str = "default",
    *,
    autocast_adapter_dtype: bool = True,
) -> torch.fx.GraphModule:
    """Inject adapter `adapter_name` with CorDA's A, B and residual base weights, in place.

    PEFT's `preprocess_corda(model, config, run_model=...)` followed by
    `get_peft_model(model, config)`, as one pass: the batches run through the base graph,
    observer nodes collect each site's input covariance, and the adapter is injected with the
    singular directions of `W @ C` that `corda_method` picks; the base weights keep the rest.

    Args:
        gm: A captured graph (`lora_fx.capture`), an ExportedProgram, or a traced GraphModule.
        cfg: A config with `init_lora_weights="corda"` (and `corda_config`, PEFT's `CordaConfig`).
        batches: Calibration inputs, each run once: a dict of keyword inputs, a tuple of
            positional inputs, or a tensor.
        adapter_name: Name of the new adapter.
        autocast_adapter_dtype: As in `inject`.

    Returns:
        The same GraphModule (a new one only when given an ExportedProgram), recompiled.

    Raises:
        TypeError: `cfg` is not a LoraConfig.
        ConfigError: `init_lora_weights` is not "corda", a cache / covariance file is asked
            for; or what `inject` refuses.
        UnsupportedSiteError: A site that is not linear, quantized, or with `r > min(in, out)`.
        CalibrationError: No batches, no batch, a batch that does not fit the graph's inputs, or
            a covariance that is not finite or cannot be inverted.

    Example:
        >>> cfg = LoraConfig(r=8, target_modules="all-linear", init_lora_weights="corda",
        ...                  corda_config=CordaConfig(corda_method="kpm"))
        >>> gm = lora_fx.initialize_corda(lora_fx.capture(model, (ids,)), cfg, batches)
    """
    # plan
    if not isinstance(cfg, LoraConfig):
        raise TypeError(f"cfg must be a lora_fx.LoraConfig, got {type(cfg).__name__}")
    if cfg.init_lora_weights != "corda":
        raise ConfigError(
            f"initialize_corda needs init_lora_weights='corda', got {cfg.init_lora_weights!r}; "
            "use lora_fx.inject for other initialisations"
        )
    for name in ("cache_file", "covariance_file"):
        if cfg.corda_config[name] is not None:
            raise ConfigError(
                f"corda_config {name}={cfg.corda_config[name]!r} is not supported; "
                "initialize_corda computes from the batches (set it to None)"
            )
    gm = as_graph_module(gm)
    check_request(gm, cfg, adapter_name)
    batches = check_batches(gm, batches, "corda")
    sites = find_sites(gm, cfg)  # refuses non-linear and quantized sites, r > min(in, out)
    covariances = _measure(
        gm, sites, batches, float32=not cfg.corda_config["use_float16_for_covariance"]
    )
    inits = {}
    for site in sites:
        record = site_record(cfg, site)
        weight = _graph.get_attr(gm, site.weight).detach().float()
        weight = weight.T if site.transposed else weight  # [out, in]
        try:
            inits[site.fqn] = corda(
                weight,
                covariances[site.fqn],
                record.r,
                record.scale,
                cfg.corda_config["corda_method"],
            )
        except CalibrationError as e:
            raise CalibrationError(f"CorDA on site {site.fqn!r}: {e}") from e

    # apply: plain branches, then A, B and the residual base weight
    plain = dataclasses.replace(cfg, init_lora_weights=True, corda_config=None)
    inject_with_inits(
        gm, cfg, plain, adapter_name, inits, autocast_adapter_dtype=autocast_adapter_dtype
    )
    log.info(
        "initialize_corda: adapter %r -> %d sites (%s, %d batches)",
        adapter_name,
        len(sites),
        cfg.corda_config["corda_method"],
        len(batches),
    )
    return gm


def _measure(
    gm: torch.fx.GraphModule, sites: list[Site], batches: list[Any], *, float32: bool
) -> dict[str, torch.Tensor]:
    """Run every batch once with observers on the site inputs; each site's mean covariance."""
    sums: dict[str, torch.Tensor] = {}
    calls = dict.fromkeys((site.fqn for site in sites), 0)
    takes = graph_inputs(gm)
    with observing(gm, [n for site in sites for n in site.inputs]) as observed:
        observed.watching = {n.name for site in sites for n in site.inputs}
        for i, batch in enumerate(batches):
            observed.seen = {}
            run_batch(gm, batch, i, takes)
            covariance = {}
            for name, x in observed.seen.items():
                covariance[name] = input_covariance(x, float32=float32)
                if not torch.isfinite(covariance[name]).all():
                    raise CalibrationError(
                        f"batch {i} gives inf or nan values in the input covariance at node "
                        f"{name!r}; check the batch (PEFT raises the same)"
                    )
            for site in sites:  # PEFT's hook: one sum per call of the module
                for node in site.inputs:
                    c = covariance[node.name]
                    sums[site.fqn] = sums[site.fqn] + c if site.fqn in sums else c
                    calls[site.fqn] += 1
    return {fqn: sums[fqn] / calls[fqn] for fqn in calls}
