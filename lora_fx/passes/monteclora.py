"""MonteCLoRA's variational loss over a graph's samplers (PEFT's `LoraModel._get_monteclora_loss`).

    loss = mean over (site, adapter) samplers of
           kl_loss_weight * (KL_dir + KL_wishart + KL_mvn) [+ sum(expert_weights^2)]

Rules:
1. Only the samplers of `adapter_names` count (default: the active adapters), as in PEFT.
2. In eval each sampler gives 0.0 (PEFT's `get_variational_loss`); with no MonteCLoRA sampler
   the result is the float 0.0.
3. The covariance and sample weights are the last training forward's (kept on the sampler with
   their autograd history): add the loss to the task loss before `backward`.
"""

from __future__ import annotations

import torch
import torch.fx

from lora_fx.core.state import require_state, resolve_adapters
from lora_fx.math.monteclora import variational_loss
from lora_fx.passes._monteclora import HOLDER

__all__ = ["get_monteclora_loss"]


def get_monteclora_loss(
    gm: torch.fx.GraphModule, adapter_names: str | list[str] | None = None
) -> torch.Tensor | float:
    """MonteCLoRA's regulariser: the mean of each sampler's KL (and entropy) loss.

    Args:
        gm: A graph with MonteCLoRA adapters (`monteclora_config`), after a training forward.
        adapter_names: Adapters whose samplers count (default: the active ones).

    Returns:
        A scalar tensor in training; 0.0 in eval or when no adapter uses MonteCLoRA.

    Raises:
        AdapterError: No adapter on the graph, or an unknown adapter name.

    Example:
        >>> out = gm(ids, labels=ids)
        >>> loss = out.loss + lora_fx.get_monteclora_loss(gm)
        >>> loss.backward()
    """
    state = require_state(gm)
    total: torch.Tensor | float = 0.0
    count = 0
    for name in resolve_adapters(state, adapter_names):
        for fqn, rec in state.adapters[name].sites.items():
            if not rec.monteclora:
                continue
            sampler = gm.get_submodule(f"{fqn}.{HOLDER}.{name}")
            count += 1
            if not sampler.training:
                continue
            config = sampler.config
            total = total + variational_loss(
                sampler.std_prior,
                sampler.expert_weights_prior,
                sampler.gaussian_var_prior,
                sampler.expert_weights,
                dirichlet_prior=config["dirichlet_prior"],
                kl_loss_weight=config["kl_loss_weight"],
                use_entropy=config["use_entropy"],
            )
    return total / count if count else 0.0
