"""MonteCLoRA on one site: PEFT's `lora_monteclora_sampler` and the A the branch reads.

    low = lora_A(x) -> s = lora_monteclora_sampler.<adapter>();  low = linear(x, perturbed_a(A, s))

Rules:
1. The sampler is a module at `<site>.lora_monteclora_sampler.<adapter>` (PEFT's path) with
   parameters `std_prior [r]`, `expert_weights_prior [n]` and buffers `gaussian_var_prior [r, r]`,
   `expert_weights [n]`; the file keys are `<site>.lora_monteclora_sampler.<name>`.
2. Init as PEFT's variant `init`, after A and B, from the global RNG in PEFT's order: `rand(r)`,
   `rand(n)`, then the first `buffer_size` draws (`randn [b, n, in, r]`, `randn [b, n]`, then `b`
   Wishart(df=r, I) Bartlett samples). The same seed gives PEFT's tensors and draws.
3. The sampler is called from the graph (`call_module`) after the branch's dropout, as PEFT's
   forward calls it after dropout. In training it takes the next draws (refilling the buffer
   from the global RNG when it is used up, as PEFT), computes the covariance and sample weights
   (`math/monteclora.py`), keeps them in its two buffers for the loss (with their autograd
   history, as PEFT) and returns `(noise, weights)`; in eval it returns None: A is plain.
4. Merges fold plain LoRA's `scale * B @ A` (PEFT ignores the sampler there too).
5. `get_monteclora_loss` (`passes/monteclora.py`) reads the buffers: call it after the forward.
"""

from __future__ import annotations

import torch
import torch.fx
from torch import nn
from torch.distributions.wishart import Wishart

from lora_fx.core import graph as _graph
from lora_fx.core.keys import FILE_PREFIX
from lora_fx.core.state import LoraState
from lora_fx.math.monteclora import expert_weights, gaussian_noise, wishart_covariance
from lora_fx.sites import Site
from lora_fx.sites.kinds import lora_paths

__all__ = ["HOLDER", "MontecloraSampler", "add_monteclora", "monteclora_keys"]

HOLDER = "lora_monteclora_sampler"


class MontecloraSampler(nn.Module):
    """One adapter's variational parameters, its draw buffer and its last sample (rules 1-3)."""

    def __init__(self, in_features: int, r: int, config: dict, *, device, dtype) -> None:
        super().__init__()
        self.in_features, self.r, self.config = in_features, r, dict(config)
        self.num_samples = config["num_samples"]
        # PEFT's order: the two parameters, the two buffers, then the first buffer of draws
        self.std_prior = nn.Parameter(torch.rand(r, dtype=dtype))
        self.expert_weights_prior = nn.Parameter(torch.rand(self.num_samples, dtype=dtype))
        self.register_buffer("gaussian_var_prior", torch.eye(r, dtype=dtype))
        ones = torch.ones(self.num_samples, dtype=dtype)
        self.register_buffer("expert_weights", ones / self.num_samples)
        self.to(device)
        self._draws: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._next = 0
        self._refill()

    @torch.compiler.disable
    def _refill(self) -> None:
        """`buffer_size` draws from the global RNG, in PEFT's `_refill_buffer` order."""
        size, n, device = self.config["buffer_size"], self.num_samples, self.std_prior.device
        dtype = self.std_prior.dtype
        wishart = Wishart(df=self.r, scale_tril=torch.eye(self.r, device=device))
        with torch.no_grad():
            z_mvn = torch.randn((size, n, self.in_features, self.r), device=device, dtype=dtype)
            z_dirichlet = torch.randn((size, n), device=device, dtype=dtype)
            z_wishart = [wishart._bartlett_sampling(torch.Size()).to(dtype) for _ in range(size)]
        self._draws = list(zip(z_mvn, z_wishart, z_dirichlet, strict=True))
        self._next = 0

    @torch.compiler.disable
    def draw(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The next `(z_mvn [n, in, r], z_wishart [r, r], z_dirichlet [n])`, refilling first."""
        if self._next >= len(self._draws):
            self._refill()
        sample = self._draws[self._next]
        self._next += 1
        like = self.std_prior
        return tuple(z.to(device=like.device, dtype=like.dtype) for z in sample)

    def forward(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Training: `(noise [n, in, r], weights [n])` from the next draws; eval: None."""
        if not self.training:
            return None
        z_mvn, z_wishart, z_dirichlet = self.draw()
        covariance = wishart_covariance(self.std_prior, z_wishart)
        self.gaussian_var_prior = covariance  # kept for the loss, with its history (PEFT)
        noise = gaussian_noise(z_mvn, covariance, self.config["sample_scaler"])
        self.expert_weights = expert_weights(self.expert_weights_prior, z_dirichlet)
        return noise, self.expert_weights


def add_monteclora(
    gm: torch.fx.GraphModule, site: Site, adapter: str, r: int, config: dict, state: LoraState
) -> None:
    """Register `adapter`'s sampler on the site, drawn as PEFT draws it (rule 2)."""
    weight = _graph.get_attr(gm, lora_paths(site.kind, site.fqn, adapter).a)
    holder = _graph.own_module(gm, site.fqn, state)
    if HOLDER not in holder._modules:
        holder.add_module(HOLDER, nn.ModuleDict())
    sampler = MontecloraSampler(
        site.in_features, r, config, device=weight.device, dtype=weight.dtype
    )
    getattr(holder, HOLDER)[adapter] = sampler.train(gm.training)


def monteclora_keys(site: str, adapter: str, r: int, n: int) -> dict[str, tuple[str, tuple]]:
    """PEFT file key -> (module-tree path, shape) of one sampler's four tensors (rule 1)."""
    shapes = {
        "std_prior": (r,),
        "expert_weights_prior": (n,),
        "gaussian_var_prior": (r, r),
        "expert_weights": (n,),
    }
    return {
        f"{FILE_PREFIX}{site}.{HOLDER}.{name}": (f"{site}.{HOLDER}.{adapter}.{name}", shape)
        for name, shape in shapes.items()
    }
