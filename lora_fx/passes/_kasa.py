"""KaSA on one site: the learnable diagonal and the truncated base weight (PEFT's KaSA variant).

    W <- U[:, :k-r] S[:k-r] Vh[:k-r]          (k = min(out, in): the r smallest directions go)
    y = x W^T + b + scale * B(diag(lora_diag) A(dropout(x)))       lora_diag ~ randn(r)

Rules:
1. Run after A and B are initialised, as PEFT's variant `init` runs after `reset_lora_parameters`:
   the same seed gives PEFT's A, B and `lora_diag`.
2. The truncation rewrites the base weight in place (the captured model sees it, as with PEFT);
   `inject` keeps the weight for its rollback first. Unload keeps the truncated weight (PEFT too).
3. The diagonal is `<site>.lora_diag.<adapter>` (an `nn.ParameterDict` entry, as PEFT holds it),
   saved as `<site>.lora_diag`; the branch multiplies the rank-r activations by it (`_branch.py`).
"""

from __future__ import annotations

import torch
import torch.fx
from torch import nn

from lora_fx.core import graph as _graph
from lora_fx.core.state import LoraState, SiteRecord
from lora_fx.math.inits import kasa_truncate
from lora_fx.sites import Site
from lora_fx.sites.kinds import lora_paths

__all__ = ["add_kasa"]


def add_kasa(
    gm: torch.fx.GraphModule, site: Site, adapter: str, record: SiteRecord, state: LoraState
) -> None:
    """Register `lora_diag ~ randn(r)` and truncate the site's base weight (rules 1-2)."""
    paths = lora_paths(site.kind, site.fqn, adapter)
    lora_a = _graph.get_attr(gm, paths.a)
    holder = _graph.own_module(gm, site.fqn, state)
    if "lora_diag" not in holder._modules:
        holder.add_module("lora_diag", nn.ParameterDict())
    diag = torch.randn(record.r, device=lora_a.device, dtype=lora_a.dtype)
    holder.lora_diag[adapter] = nn.Parameter(diag)
    weight = _graph.get_attr(gm, site.weight)
    with torch.no_grad():
        weight.copy_(kasa_truncate(weight.detach().float(), record.r).to(weight.dtype))
