"""Arrow: load a library of task experts (and general adapters) and route each token among them.

    gm --load task_0..task_{n-1} (gks_0..)--> inject router "arrow_router" --set_adapter--> gm
    y' = y + sum_e c_e(x) * s_e * B_e A_e x,   c(x) = softmax(top_k(|x @ P^T|) / T)

Rules:
1. PEFT's `create_arrow_model`: the experts become adapters `task_<i>` (general ones `gks_<i>`,
   loaded only with `use_gks`), the router is an adapter `arrow_router` whose config carries the
   `arrow_config` with those names, targets the experts' sites with their rank, and becomes the
   only active adapter (the experts stay loaded, inactive and frozen; the router's unused A and B
   train as PEFT's do).
2. Routing, GenKnowSub and the prototypes are the router's inject (`_arrow.py`); a graph that
   already holds the experts gets a router from `inject(gm, LoraConfig(arrow_config=...))`.
3. All or nothing: a failed load or a rejected router puts the graph and its state back.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import torch
import torch.fx

from lora_fx.capture import as_graph_module
from lora_fx.config import ArrowConfig, LoraConfig
from lora_fx.core.state import require_state, state_or_none
from lora_fx.errors import AdapterError, ConfigError
from lora_fx.passes._rollback import rollback_on_error
from lora_fx.passes.adapters import set_adapter
from lora_fx.passes.files import load_adapter
from lora_fx.passes.inject import inject

__all__ = ["GKS_ADAPTER_PREFIX", "TASK_ADAPTER_PREFIX", "create_arrow_model"]

log = logging.getLogger(__name__)

TASK_ADAPTER_PREFIX = "task_"
GKS_ADAPTER_PREFIX = "gks_"


def create_arrow_model(
    gm: torch.fx.GraphModule | torch.export.ExportedProgram,
    task_specific_adapter_paths: Sequence[str | os.PathLike],
    arrow_config: ArrowConfig | dict,
    general_adapter_paths: Sequence[str | os.PathLike] | None = None,
    *,
    adapter_name: str = "arrow_router",
) -> torch.fx.GraphModule:
    """Load task experts (and general adapters) and add an Arrow router over them, in place.

    Args:
        gm: A captured graph (or an ExportedProgram).
        task_specific_adapter_paths: PEFT adapter folders of the task experts (`task_<i>`).
        arrow_config: `ArrowConfig` (or its dict): top_k, router_temperature, use_gks, rng_seed.
        general_adapter_paths: PEFT adapter folders of the general adapters (`gks_<i>`), needed
            with `use_gks=True`.
        adapter_name: The router's name (PEFT's `arrow_router`).

    Returns:
        The same GraphModule (a new one only when given an ExportedProgram), the router active.

    Raises:
        ConfigError: No expert path, `use_gks` without general paths, top_k above the number of
            experts, or experts whose sites or ranks differ.
        AdapterError: A folder that is not a LoRA adapter for this graph, or a name in use
            (`task_<i>`, `gks_<i>`, `adapter_name`).
        UnsupportedSiteError: An expert on a non-linear site.

    Example:
        >>> gm = lora_fx.create_arrow_model(
        ...     gm, ["experts/0", "experts/1", "experts/2"], ArrowConfig(top_k=2, rng_seed=0)
        ... )
    """
    # plan
    if isinstance(task_specific_adapter_paths, (str, os.PathLike)) or not list(
        task_specific_adapter_paths or ()
    ):
        raise ConfigError(
            f"task_specific_adapter_paths={task_specific_adapter_paths!r} is invalid; expected a "
            "list of at least one adapter folder"
        )
    arrow = LoraConfig(arrow_config=arrow_config).arrow_config  # checked, as a dict
    general = list(general_adapter_paths or ()) if arrow["use_gks"] else []
    if arrow["use_gks"] and not general:
        raise ConfigError(
            "arrow_config use_gks=True needs general_adapter_paths (the general adapters whose "
            "mean GenKnowSub subtracts)"
        )
    gm = as_graph_module(gm)
    experts = [f"{TASK_ADAPTER_PREFIX}{i}" for i in range(len(task_specific_adapter_paths))]
    generals = [f"{GKS_ADAPTER_PREFIX}{i}" for i in range(len(general))]
    state = state_or_none(gm)
    taken = [n for n in [*experts, *generals, adapter_name] if state and n in state.adapters]
    if taken:
        raise AdapterError(
            f"create_arrow_model names its adapters {[*experts, *generals, adapter_name]}, but "
            f"{taken} already exist on this graph; delete them, or load the experts yourself "
            "and inject a router with arrow_config=ArrowConfig(task_adapter_names=[...])"
        )

    # apply (rule 3: all or nothing)
    with rollback_on_error(gm):
        for name, path in zip(experts, task_specific_adapter_paths, strict=True):
            load_adapter(gm, path, name)
        for name, path in zip(generals, general, strict=True):
            load_adapter(gm, path, name)
        sites = require_state(gm).adapters[experts[0]].sites
        arrow.update(task_adapter_names=experts, gks_adapter_names=generals)
        rank = next(iter(sites.values())).r
        inject(gm, LoraConfig(r=rank, target_modules=list(sites), arrow_config=arrow), adapter_name)
        set_adapter(gm, adapter_name)
    log.info(
        "create_arrow_model: %r routes %d experts on %d sites (top_k=%d, %d general)",
        adapter_name,
        len(experts),
        len(sites),
        arrow["top_k"],
        len(generals),
    )
    return gm
