"""Parameter sites (`target_parameters`): a parameter read directly by ops, not through a module.

    found by name (`params.py`), not by an op: every `get_attr` of the parameter is a node
    branch:  W' = W + delta(A, B) where W is read, whatever op reads it (`passes/_param.py`)
    delta:   PEFT's `ParamWrapper` delta, per expert for a 3-D `[E, out, in]` parameter

A `[r * E, in]`, B `[out, r * E]` (PEFT's layout for E stacked experts). No dropout, DoRA,
`lora_bias`, base-weight inits or mixed-batch rows: `x` cannot be factored out of the op in general
(PEFT refuses the same).
"""

from __future__ import annotations

import torch
from torch import nn

from lora_fx.math import ops
from lora_fx.sites.kind import Capabilities, SiteKind, init_factor_modules
from lora_fx.sites.site import Site

__all__ = ["PARAM"]


def factor_shapes(site: Site, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """A `[r * E, in]`, B `[out, r * E]`: PEFT's ParamWrapper, r per expert."""
    rank = r * site.experts
    return (rank, site.in_features), (site.out_features, rank)


def new_factors(
    site: Site, r: int, lora_bias: bool, init: bool | str
) -> tuple[nn.Module, nn.Module]:
    """PEFT's `lora_A` / `lora_B` nn.Linear modules at rank `r * E`."""
    rank = r * site.experts
    lora_a = nn.Linear(site.in_features, rank, bias=False)
    lora_b = nn.Linear(rank, site.out_features, bias=lora_bias)
    init_factor_modules(lora_a, lora_b, r, init)
    return lora_a, lora_b


def delta(
    site: Site, a: torch.Tensor, b: torch.Tensor, scale: float, shape: tuple[int, ...]
) -> torch.Tensor:
    """PEFT's ParamWrapper delta, shaped like the parameter."""
    return ops.param_delta(a, b, scale, shape)


def fold_factors(site: Site, w: torch.Tensor, a: torch.Tensor, b: torch.Tensor):
    """2-D: W[out, in] += B @ A; 3-D: per expert, batched (`ops.param_delta`'s layout)."""
    if w.dim() == 3:
        # A [r*E, in] -> [E, r, in];  B [out, r*E] -> [out, r, E] -> [E, out, r]
        experts = w.shape[0]
        left = b.reshape(b.shape[0], -1, experts).permute(2, 0, 1)
        return w, left, a.reshape(experts, -1, a.shape[-1])
    return w, b, a


PARAM = SiteKind(
    name="param",
    label="target_parameters site",
    matchers=(),  # chosen by `target_parameters` (`params.py`), never by op
    holders=("lora_A", "lora_B"),
    factor_suffix=".weight",
    factor_shapes=factor_shapes,
    new_factors=new_factors,
    emit_down=None,
    emit_up=None,
    emit_base=None,
    delta=delta,
    fold_factors=fold_factors,
    magnitude_shape=lambda site: (site.out_features,),
    can=Capabilities(
        dora=False,
        lora_bias=False,
        dropout=False,
        mixed_batch=False,
        layouts=("plain",),
        branch_at="weight_read",
    ),
    refusal_note=" (parameter {weight!r}): the parameter is used directly, not as `W x`",
)
