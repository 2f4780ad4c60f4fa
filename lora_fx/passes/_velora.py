"""VeLoRA on one site: PEFT's `lora_velora_embed` buffer and the A projection that reads it.

    low = lora_A(x)   ->   v = lora_velora_embed(x, adapter);  low = velora_linear(x, A, v, g, s)

Rules:
1. The projection `v` `[ceil(in / num_groups)]` is a *buffer* at
   `<site>.lora_velora_embed.<adapter>` (PEFT's BufferDict path), saved as
   `<site>.lora_velora_embed`; it never requires grad.
2. Init as PEFT's variant `init`, after A and B: "random" draws a unit-norm `randn` (the same
   seed gives PEFT's), the batch-average types start at zero and uninitialised.
3. The holder is called from the graph (`call_module`) on the branch input after dropout. In
   training with grad enabled it rewrites `v` as PEFT's forward does ("batch_average": every
   call; "batch_average_once": the first call after inject or load) and returns it; otherwise
   it returns None and A is a plain `linear` (PEFT's eval path). The "initialised" flags live on
   the holder, not in files (PEFT's too).
4. Forward outputs and merges are plain LoRA's; only A's gradient is approximated.
"""

from __future__ import annotations

import torch
import torch.fx
from torch import nn

from lora_fx.core import graph as _graph
from lora_fx.core.state import LoraState, SiteRecord
from lora_fx.math.velora import group_dim, mean_projection, normalize_projection
from lora_fx.sites import Site
from lora_fx.sites.kinds import lora_paths

__all__ = ["VeloraEmbed", "add_velora"]


class VeloraEmbed(nn.Module):
    """PEFT's `lora_velora_embed` BufferDict: one projection buffer per adapter (rules 1, 3)."""

    def __init__(self) -> None:
        super().__init__()
        self.num_groups: dict[str, int] = {}
        self.init_type: dict[str, str] = {}
        self.initialized: dict[str, bool] = {}

    def __contains__(self, adapter: str) -> bool:
        return adapter in self._buffers

    def __len__(self) -> int:
        return len(self._buffers)

    def __getitem__(self, adapter: str) -> torch.Tensor:
        return self._buffers[adapter]

    def __delitem__(self, adapter: str) -> None:
        del self._buffers[adapter]
        for table in (self.num_groups, self.init_type, self.initialized):
            table.pop(adapter, None)

    def add(self, adapter: str, embed: torch.Tensor, num_groups: int, init_type: str) -> None:
        """Register `adapter`'s projection (persistent: it is saved with the adapter)."""
        self.register_buffer(adapter, embed, persistent=True)
        self.num_groups[adapter], self.init_type[adapter] = num_groups, init_type
        self.initialized[adapter] = init_type == "random"

    def forward(self, x: torch.Tensor, adapter: str) -> torch.Tensor | None:
        """The projection to compress `x` with in training (updated first, rule 3), else None."""
        if not (self.training and torch.is_grad_enabled()):
            return None
        embed = self._buffers[adapter]
        if self.init_type[adapter] != "random" and not (
            self.init_type[adapter] == "batch_average_once" and self.initialized[adapter]
        ):
            with torch.no_grad():
                value = mean_projection(x, self.num_groups[adapter])
                embed = value.to(device=embed.device, dtype=embed.dtype)
            self._buffers[adapter] = embed  # PEFT assigns a new tensor, too
            self.initialized[adapter] = True
        return embed


def add_velora(
    gm: torch.fx.GraphModule, site: Site, adapter: str, record: SiteRecord, state: LoraState
) -> None:
    """Register `adapter`'s projection buffer on the site, drawn as PEFT draws it (rule 2)."""
    num_groups, _, init_type = record.velora
    weight = _graph.get_attr(gm, lora_paths(site.kind, site.fqn, adapter).a)
    dtype = _graph.get_attr(gm, site.weight).dtype
    holder = _graph.own_module(gm, site.fqn, state)
    if "lora_velora_embed" not in holder._modules:
        holder.add_module("lora_velora_embed", VeloraEmbed())
    d = group_dim(site.in_features, num_groups)
    if init_type == "random":
        embed = normalize_projection(torch.randn(d, device=weight.device, dtype=dtype)).to(dtype)
    else:
        embed = torch.zeros(d, device=weight.device, dtype=dtype)
    holder.lora_velora_embed.add(adapter, embed, num_groups, init_type)
