"""What a kind of site is, as data: `SiteKind` and its `Capabilities`.

    site = match(gm, node)            a kind's matchers find its ops, in both graph flavours
    A, B = new_factors(site, r, ...)  PEFT's modules / tensors, shaped by factor_shapes
    low = emit_down(emit, site, x, A);  up = emit_up(emit, site, low, B, bias)   the branch ops
    delta = delta(site, A, B, scale, weight_shape)                              merge / export

Every pass reads a site's kind from the table in `kinds.py` (`kind_of(site)`), never by comparing
kind names: adding a kind is one entry (a module beside this one) and its tests. Shape of an entry
after onnxscript's rewrite rules (pattern / check / rewrite) and PEFT's `LoraVariant` classes; no
class hierarchy: an entry is a frozen record of functions and flags.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
from torch import nn

from lora_fx.core.keys import FILE_PREFIX, LoraPaths
from lora_fx.core.state import SiteRecord
from lora_fx.sites.site import Match, Site

__all__ = ["Capabilities", "Emit", "Matcher", "SiteKind", "init_factor_modules"]

Emit = Callable[..., torch.fx.Node]  # (role, op, target, args) -> a tagged node after the last one
# A node's match; a tuple for several sites on one node, `()` for a node claimed without a site.
Matcher = Callable[[torch.fx.GraphModule, torch.fx.Node], Match | tuple[Match, ...] | None]
Shape = tuple[int, ...]


@dataclass(frozen=True)
class Capabilities:
    """What a kind of site can carry; checks read these instead of naming kinds."""

    merge: bool = True  # its delta folds into one base weight (a per-site `refuse_merge` may veto)
    dora: bool = True
    lora_bias: bool = True
    dropout: bool = True  # a dropout on the branch input
    base_inits: bool = False  # PiSSA / OLoRA / LoftQ / orthogonal (they decompose a linear weight)
    kasa: bool = False  # KaSA: a `[r]` diagonal between A and B, the base weight truncated
    velora: bool = False  # VeLoRA: A's gradient from compressed inputs (`velora_config`)
    bdlora: bool = False  # BD-LoRA: a block-diagonal A or B (`use_bdlora`)
    alora: bool = False  # aLoRA: the branch masked by position (`alora_invocation_tokens`)
    qalora: bool = False  # QALoRA: A reads the input averaged over feature groups (`use_qalora`)
    monteclora: bool = False  # MonteCLoRA: A averaged over sampled perturbations in training
    quantized: bool = False  # a bitsandbytes base weight
    mixed_batch: bool = True  # branches weighted per batch row
    input_is_ids: bool = False  # the branch input is token ids: no dtype cast, no dropout
    layouts: tuple[str, ...] = ("plain",)  # branch layouts (`set_layout`)
    fused_branch: bool = False  # "fused": the whole branch is one `add_lora` (A, B, scale, add)
    onnx: bool = True  # `export_onnx` rebuilds its branches
    # "output": y + branch; "weight_read": W -> W + delta where read; "rows": rows of W replaced
    # by the adapter's tensor where read (trainable tokens; merge writes the rows)
    branch_at: str = "output"


@dataclass(frozen=True)
class SiteKind:
    """One kind of site: how it is found, what its adapter tensors are, how its branch is built."""

    name: str
    label: str  # how errors name a site of this kind: "linear site", "target_parameters site"
    matchers: tuple[Matcher, ...]
    holders: tuple[str, ...]  # PEFT's containers of A and B on the module (A alone: one tensor)
    factor_suffix: str  # ".weight" when A / B are modules (nn.Linear, nn.ConvNd), "" for tensors
    factor_shapes: Callable[[Site, int], tuple[Shape, Shape]]
    # (site, r, lora_bias, init_lora_weights) -> A, B as PEFT makes them: modules or tensors
    new_factors: Callable[[Site, int, bool, bool | str], tuple[Any, Any]]
    emit_down: Callable[[Emit, Site, torch.fx.Node, torch.fx.Node], torch.fx.Node] | None
    emit_up: Callable[..., torch.fx.Node] | None  # (emit, site, low, B, bias) -> up
    # (emit, site, x, W) -> `W x` without bias, recomputed (DoRA's base term under dropout)
    emit_base: Callable[..., torch.fx.Node] | None
    delta: Callable[[Site, torch.Tensor, torch.Tensor, float, Shape], torch.Tensor]
    # (site, W, A, B) -> (W view, left, right) with merge's in-place `W += scale * left @ right`,
    # or None where no such view exists (the merge then writes `W + delta`)
    fold_factors: Callable[[Site, torch.Tensor, torch.Tensor, torch.Tensor], Any]
    magnitude_shape: Callable[[Site], Shape]
    can: Capabilities
    # Per-site limits: a reason the site cannot take `r` / `use_dora`, or cannot be merged.
    refuse: Callable[[Site, int, bool], str | None] = lambda site, r, use_dora: None
    refuse_merge: Callable[[Site], str | None] = lambda site: None
    refusal_note: str = ""  # appended to "... is not supported on <label> <site>" ({weight})
    # The name `target_modules` / `exclude_modules` / rank patterns select a site by (a site
    # nested in PEFT's wrapper of another goes with it), and whether `"all-linear"` takes it.
    target_name: Callable[[Site], str] = lambda site: site.fqn
    in_all_linear: Callable[[Site], bool] = lambda site: False
    # (cfg, site) -> the adapter's record on a site of this kind; None: `SiteRecord.from_config`
    new_record: Callable[[Any, Site], SiteRecord] | None = None
    # (site, record, base weight) -> initial factor values read from the base weight, or None
    init_factors: Callable[[Site, SiteRecord, torch.Tensor], tuple[torch.Tensor, ...]] | None = None
    # (site) -> (fn, extra args): `fn(y, x, index, a_t, b_t, *extra)` adds each batch row's delta
    # from its slot of the stacks (`math/stack.py`); None: mixed batches mask a branch per slot
    gathered: Callable[[Site], tuple[Callable[..., torch.Tensor], tuple] | None] = lambda site: None

    def paths(self, site: str, adapter: str) -> LoraPaths:
        """Module-tree paths and PEFT file keys of `adapter`'s tensors on `site`."""
        a_holder, b_holder = (*self.holders, "")[:2]
        b_key = f"{FILE_PREFIX}{site}.{b_holder}{self.factor_suffix}" if b_holder else ""
        return LoraPaths(
            a=f"{site}.{a_holder}.{adapter}{self.factor_suffix}",
            b=f"{site}.{b_holder}.{adapter}{self.factor_suffix}" if b_holder else "",
            b_bias=f"{site}.{b_holder}.{adapter}.bias",
            dropout=f"{site}.lora_dropout.{adapter}",
            a_key=f"{FILE_PREFIX}{site}.{a_holder}{self.factor_suffix}",
            b_key=b_key,
            b_bias_key=f"{FILE_PREFIX}{site}.{b_holder}.bias",
            magnitude=f"{site}.lora_magnitude_vector.{adapter}.weight",
            magnitude_key=f"{FILE_PREFIX}{site}.lora_magnitude_vector",
            diag=f"{site}.lora_diag.{adapter}",
            diag_key=f"{FILE_PREFIX}{site}.lora_diag",
            velora=f"{site}.lora_velora_embed.{adapter}",
            velora_key=f"{FILE_PREFIX}{site}.lora_velora_embed",
            alora=f"{site}.lora_alora_offsets.{adapter}",
        )


def init_factor_modules(lora_a: nn.Module, lora_b: nn.Module, r: int, init: bool | str) -> None:
    """PEFT's `reset_lora_parameters` for A / B modules (nn.Linear, nn.ConvNd), in place.

    `init=False` keeps both random (non-trivial adapters for tests); other strings ("pissa", ...)
    are overwritten from the base weight afterwards (`passes/_base_init.py`).
    """
    if init is False:
        return
    if init is True:
        nn.init.kaiming_uniform_(lora_a.weight, a=math.sqrt(5))
    elif init == "gaussian":
        nn.init.normal_(lora_a.weight, std=1 / r)
    nn.init.zeros_(lora_b.weight)
    if lora_b.bias is not None:
        nn.init.zeros_(lora_b.bias)
