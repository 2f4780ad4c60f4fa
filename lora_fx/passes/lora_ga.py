"""Inject an adapter initialised from the loss gradient of the base weight: LoRA-GA.

    y = linear(x, W)   ->   y = linear(x, W - scale * B @ A) + scale * B(A(x))
    G = mean over calls of dloss/dW = U S V^T;  A, B from the top 2r triplets (`math/lora_ga.py`)

Rules:
1. Plan: the config, the batches, the loss and the sites are checked, the batches run forward and
   backward and every site's A, B and residual weight are computed before the graph changes;
   then `inject` adds plain branches and A, B and the residual are written (all rolled back if
   anything fails).
2. Gradients, as PEFT's `estimate_gradients`: the graph runs in train mode with active adapters
   disabled; only the site weights require grad while the batches run; each batch's loss is
   backpropagated and the sum divided by the number of site calls (PEFT's backward-hook count).
   `requires_grad`, `.grad`, the training flag and the adapters are restored, also on failure.
3. The loss is `loss_fn(output, batch)`, or, without `loss_fn`, the output's `.loss` for dict
   batches with `labels` that the graph takes (a Hugging Face model captured with `labels`).
4. **The base weight is rewritten in place** (as CorDA and PEFT): base + adapter is the
   original weight to float32 rounding. `load_adapter` never reruns the init.
5. Differences from PEFT: `torch.svd_lowrank` is randomized (global RNG), so A and B equal PEFT's
   only from the same random state; a site the loss does not reach raises (PEFT silently falls
   back to the default init); `2 r > min(in, out)` raises (PEFT writes wrongly shaped factors);
   PEFT's `cache_file` (a pickle) has no equivalent.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.fx

from lora_fx.capture import as_graph_module
from lora_fx.config import LoraConfig
from lora_fx.core import graph as _graph
from lora_fx.core.state import state_or_none
from lora_fx.errors import CalibrationError, ConfigError, UnsupportedSiteError
from lora_fx.math.lora_ga import lora_ga
from lora_fx.passes._calibrate import check_batches, graph_inputs, inject_with_inits, run_batch
from lora_fx.passes.adapters import disable_adapters
from lora_fx.passes.inject import check_request, site_record
from lora_fx.sites import Site, find_sites

__all__ = ["initialize_lora_ga"]

log = logging.getLogger(__name__)

LossFn = Callable[[Any, Any], torch.Tensor]


def initialize_lora_ga(
    gm: torch.fx.GraphModule | torch.export.ExportedProgram,
    cfg: LoraConfig,
    batches: Iterable[Any],
    loss_fn: LossFn | None = None,
    adapter_name: str = "default",
    *,
    autocast_adapter_dtype: bool = True,
) -> torch.fx.GraphModule:
    """Inject adapter `adapter_name` with LoRA-GA's A, B and residual base weights, in place.

    PEFT's `preprocess_loraga(model, config, train_step=...)` followed by
    `get_peft_model(model, config)`, as one pass: every batch runs forward and backward through
    the base graph (in train mode, as PEFT), the site weights' gradients are averaged, and the
    adapter is injected with the gradient's singular directions; the base weights keep the rest.

    Args:
        gm: A captured graph (`lora_fx.capture`), an ExportedProgram, or a traced GraphModule.
        cfg: A config with `init_lora_weights="lora_ga"` (and `lora_ga_config`, PEFT's
            `LoraGAConfig`).
        batches: Calibration inputs, each run once: a dict of keyword inputs, a tuple of
            positional inputs, or a tensor.
        loss_fn: `loss_fn(output, batch) -> scalar tensor`. Default: the output's `.loss`, for
            dict batches with `labels` passed to a graph that takes them (PEFT's examples run
            `model(**batch).loss.backward()`; capture with `{"labels": ids}` for that).
        adapter_name: The adapter to create.
        autocast_adapter_dtype: Passed to `inject`.

    Returns:
        `gm` itself, recompiled (a new GraphModule only for an ExportedProgram).

    Raises:
        TypeError: `cfg` is not a LoraConfig.
        ConfigError: `init_lora_weights` is not "lora_ga"; or what `inject` refuses.
        UnsupportedSiteError: A site that is not linear, quantized, or with `2 r > min(in, out)`.
        CalibrationError: No batches, no batch, a batch that does not fit the graph's inputs,
            no loss to take, or a site the loss does not reach.

    Example:
        >>> cfg = LoraConfig(r=8, target_modules="all-linear", init_lora_weights="lora_ga",
        ...                  lora_ga_config=LoraGAConfig(direction="ArB2r"))
        >>> gm = lora_fx.capture(model, (ids,), {"labels": ids, "use_cache": False})
        >>> gm = lora_fx.initialize_lora_ga(gm, cfg, [{"input_ids": ids, "labels": ids}])
    """
    # plan
    if not isinstance(cfg, LoraConfig):
        raise TypeError(f"cfg must be a lora_fx.LoraConfig, got {type(cfg).__name__}")
    if cfg.init_lora_weights != "lora_ga":
        raise ConfigError(
            f"initialize_lora_ga needs init_lora_weights='lora_ga', got "
            f"{cfg.init_lora_weights!r}; use lora_fx.inject for other initialisations"
        )
    gm = as_graph_module(gm)
    check_request(gm, cfg, adapter_name)
    batches = check_batches(gm, batches, "lora_ga")
    if loss_fn is None:
        _check_default_loss(gm, batches)
    sites = find_sites(gm, cfg)  # refuses non-linear and quantized sites, r > min(in, out)
    for site in sites:
        r = site_record(cfg, site).r
        if 2 * r > min(site.in_features, site.out_features):
            raise UnsupportedSiteError(
                f"init_lora_weights='lora_ga' takes 2r singular directions of the gradient; site "
                f"{site.fqn!r} ({site.out_features}x{site.in_features}) has "
                f"{min(site.in_features, site.out_features)}, r={r}"
            )
    grads = _gradients(gm, sites, batches, loss_fn)
    ga = cfg.lora_ga_config
    inits = {}
    for site in sites:
        record = site_record(cfg, site)
        weight = _graph.get_attr(gm, site.weight).detach()
        grad = grads[site.fqn]
        weight, grad = (weight.T, grad.T) if site.transposed else (weight, grad)  # [out, in]
        inits[site.fqn] = lora_ga(
            grad,
            weight,
            record.r,
            record.scale,
            direction=ga["direction"],
            scaling=ga["scale"],
            stable_gamma=ga["stable_gamma"],
        )

    # apply: plain branches, then A, B and the residual base weight
    plain = dataclasses.replace(cfg, init_lora_weights=True, lora_ga_config=None)
    inject_with_inits(
        gm, cfg, plain, adapter_name, inits, autocast_adapter_dtype=autocast_adapter_dtype
    )
    log.info(
        "initialize_lora_ga: adapter %r -> %d sites (%s, %s, %d batches)",
        adapter_name,
        len(sites),
        ga["direction"],
        ga["scale"],
        len(batches),
    )
    return gm


def _check_default_loss(gm: torch.fx.GraphModule, batches: list[Any]) -> None:
    """Without `loss_fn`, every batch is a dict with `labels` and the graph takes `labels`."""
    takes = graph_inputs(gm)
    for i, batch in enumerate(batches):
        if not isinstance(batch, dict) or "labels" not in batch:
            raise CalibrationError(
                f"batch {i} has no 'labels', so there is no default loss; pass "
                "loss_fn(output, batch) -> scalar tensor to initialize_lora_ga"
            )
    if "labels" not in takes:
        raise CalibrationError(
            f"the batches have 'labels' but the graph's inputs are {takes}; capture the model "
            "with labels (e.g. kwargs {'labels': ids}) so its output has a .loss, or pass "
            "loss_fn(output, batch) to initialize_lora_ga"
        )


def _loss(output: Any, batch: Any, i: int, loss_fn: LossFn | None) -> torch.Tensor:
    """Batch `i`'s scalar loss: `loss_fn(output, batch)` or the output's `.loss`."""
    loss = loss_fn(output, batch) if loss_fn is not None else getattr(output, "loss", None)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.requires_grad:
        raise CalibrationError(
            f"batch {i}: the loss must be a scalar tensor that depends on the weights, got "
            f"{type(loss).__name__}{list(loss.shape) if isinstance(loss, torch.Tensor) else ''}"
        )
    return loss


@contextlib.contextmanager
def _weights_requiring_grad(
    gm: torch.fx.GraphModule, weights: list[torch.Tensor]
) -> Iterator[None]:
    """Only `weights` require grad (from no `.grad`) inside; flags and `.grad` restored on exit."""
    params = list(dict.fromkeys([*gm.parameters(), *weights]))
    flags = [(p, p.requires_grad, p.grad) for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        for w in weights:
            w.grad = None
            w.requires_grad_(True)
        yield
    finally:
        for p, flag, grad in flags:
            p.grad = grad
            p.requires_grad_(flag)


def _gradients(
    gm: torch.fx.GraphModule, sites: list[Site], batches: list[Any], loss_fn: LossFn | None
) -> dict[str, torch.Tensor]:
    """Each site's loss gradient `[stored weight layout]`, averaged over its calls (PEFT)."""
    weights = {site.fqn: _graph.get_attr(gm, site.weight) for site in sites}
    takes = graph_inputs(gm)
    training = gm.training
    state = state_or_none(gm)
    with contextlib.ExitStack() as stack:
        if state is not None and state.active:  # PEFT measures the base model
            stack.enter_context(disable_adapters(gm))
        stack.enter_context(_weights_requiring_grad(gm, list(weights.values())))
        stack.callback(gm.train, training)
        gm.train()  # as PEFT's `estimate_gradients`
        for i, batch in enumerate(batches):
            output = run_batch(gm, batch, i, takes, grad=True)
            with torch.enable_grad():
                _loss(output, batch, i, loss_fn).backward()
        grads = {}
        for site in sites:
            grad = weights[site.fqn].grad
            if grad is None:
                raise CalibrationError(
                    f"the loss does not depend on site {site.fqn!r}'s weight (no gradient); "
                    "exclude it from target_modules or check loss_fn"
                )
            # PEFT's backward hook counts one call per module call and batch
            grads[site.fqn] = grad.detach() / (len(batches) * len(site.nodes))
    return grads
