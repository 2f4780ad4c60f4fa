"""Attention sites: `nn.MultiheadAttention`'s packed in-projection and its out-projection.

    found    get_attr <mha>.in_proj_weight      -> site <mha>                      W [3E, E]
             get_attr <mha>.out_proj.weight     -> site <mha>.base_layer.out_proj  W [E, E]
    branch   W' = W + scale * B @ A where W is read (`passes/_param.py`), whatever op reads it:
             export's aten.linear / bmm chain, or `multi_head_attention` below (fx capture)

PEFT's `lora.MultiheadAttention` is merge-style: its forward folds `B @ A` into `in_proj_weight` and
`out_proj.weight`, runs the module and unfolds. The weight-read rewrite is that same math as plain
graph ops, with gradients to A and B and no in-place writes.

Rules:
1. Targeting the MHA's name (`target_modules=["mha"]`) adapts both projections, as PEFT does: the
   out-projection site is named as PEFT nests it (`mha.base_layer.out_proj`, file keys
   `mha.base_layer.out_proj.lora_A.weight`) and goes with its MHA (`target_name`), never alone.
2. PEFT 0.21.2 adds the out-projection delta twice (its `merge` writes `W + dW`, then calls
   `out_proj.merge`, which adds `dW` again; peft#3774): lora_fx adds it once, as PEFT documents.
3. `out_proj` targeted by itself (PEFT's all-linear on SigLIP's head) is a linear site
   `<mha>.out_proj` in export graphs; in fx graphs MHA reads `out_proj.weight` inside
   `multi_head_attention`, so it is a weight-read site here. PEFT's unmerged forward ignores that
   LoRA (MHA never calls `out_proj.forward`), its merged model includes it: lora_fx applies it,
   matching PEFT's merged model.
4. `fx` capture turns each MHA call into `multi_head_attention(mha, q, k, v, W_in, W_out, ...)`,
   a `torch.func.functional_call` of the module with its two weights passed in as get_attr
   reads: the module's own forward runs (batch_first, masks, `need_weights`, train-mode dropout),
   and the weights become graph values the rewrite can reach. A leaf `call_module` (a graph traced
   elsewhere) is refused by name: its weights are read inside the module.
5. Refused, as PEFT refuses: DoRA; MHAs with separate q/k/v weights (kdim / vdim != embed_dim).
   Refused here: `lora_bias` (PEFT's MHA never applies B's bias), base-weight inits, quantized
   weights, mixed-batch rows. `lora_dropout` is accepted and not applied (PEFT's merge-style
   forward has no place for it either); `find_sites` warns.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx
from torch import nn

from lora_fx.core.state import lora_tag
from lora_fx.sites.kind import Capabilities, SiteKind
from lora_fx.sites.linear import LINEAR
from lora_fx.sites.node_reads import base_weight_read
from lora_fx.sites.site import Match, Site

__all__ = ["MHA", "multi_head_attention"]

_OUT = ".out_proj"
_NESTED_OUT = ".base_layer.out_proj"  # PEFT's path of the out-projection inside its MHA wrapper
_SEPARATE_WEIGHTS = ("q_proj_weight", "k_proj_weight", "v_proj_weight")


def multi_head_attention(
    module: nn.MultiheadAttention,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    in_proj_weight: torch.Tensor,
    out_proj_weight: torch.Tensor,
    *args: Any,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`module(query, key, value, *args, **kwargs)` with its projection weights given (rule 4)."""
    weights = {"in_proj_weight": in_proj_weight, "out_proj.weight": out_proj_weight}
    return torch.func.functional_call(module, weights, (query, key, value, *args), kwargs)


def match_mha(gm: torch.fx.GraphModule, node: torch.fx.Node) -> Match | tuple[Match, ...] | None:
    """An MHA's weight reads (sites), and the ops reading its in-projection (claimed, no site)."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        return _leaf_match(node, module) if isinstance(module, nn.MultiheadAttention) else None
    if node.op == "call_function":
        # export's linear / chunk / _native_multi_head_attention on `in_proj_weight` (or q/k/v
        # weights) belong to the MHA site, not to a linear site PEFT has no module for
        reads = [base_weight_read(a) for a in node.all_input_nodes]
        return () if any(_reads_in_projection(gm, a) for a in reads) else None
    if node.op != "get_attr":
        return None
    path = node.target
    owner, _, name = path.rpartition(".")
    mha = _mha(gm, owner)
    if mha is not None and name in ("in_proj_weight", "q_proj_weight"):
        # q_proj_weight: separate q/k/v weights, kept only to be refused by name (rule 5)
        embed_dim, in_f = mha.out_proj.weight.shape[0], gm.get_parameter(path).shape[1]
        out_f = 3 * embed_dim if name == "in_proj_weight" else embed_dim
        bias = f"{owner}.in_proj_bias" if _has(mha, "in_proj_bias") else None
        return Match(owner, "mha", node, node, path, bias, in_f, out_f)
    holder = owner.removesuffix(_OUT)
    mha = _mha(gm, holder) if owner.endswith(_OUT) and name == "weight" else None
    if mha is None or not _has(mha, "in_proj_weight"):
        return None
    bias = f"{owner}.bias" if _has(mha.out_proj, "bias") else None
    out_f, in_f = gm.get_parameter(path).shape
    nested = Match(holder + _NESTED_OUT, "mha", node, node, path, bias, in_f, out_f)
    if _read_by_mha_call(node):
        return nested, Match(owner, "mha", node, node, path, bias, in_f, out_f)  # rule 3 (fx)
    return nested


def _read_by_mha_call(node: torch.fx.Node) -> bool:
    """Whether `multi_head_attention` reads `node`, directly or through LoRA's `W + delta` adds."""
    for user in node.users:
        if user.target is multi_head_attention:
            return True
        if (lora_tag(user) or {}).get("role") == "add" and user.args[0] is node:
            return _read_by_mha_call(user)
    return False


def _leaf_match(node: torch.fx.Node, mha: nn.MultiheadAttention) -> Match:
    """A leaf `call_module` of an MHA: a site only so that targeting it is refused by name."""
    weight = "in_proj_weight" if mha._qkv_same_embed_dim else "q_proj_weight"
    out = 3 * mha.embed_dim if mha._qkv_same_embed_dim else mha.embed_dim
    path = f"{node.target}.{weight}"
    return Match(node.target, "mha", node, node, path, None, mha.embed_dim, out)


def _mha(gm: torch.fx.GraphModule, path: str) -> nn.Module | None:
    """The module at `path` if it is an MHA, else None.

    Export graphs keep only the parameters of the module tree (plain `nn.Module`s), so an MHA is
    also recognised by its parameter names: `in_proj_weight` (or `q_proj_weight`) beside an
    `out_proj` holding a `weight`.
    """
    try:
        module = gm.get_submodule(path)
    except AttributeError:
        return None
    if isinstance(module, nn.MultiheadAttention):
        return module
    out = module._modules.get("out_proj")
    packed = _has(module, "in_proj_weight") or _has(module, "q_proj_weight")
    return module if packed and out is not None and _has(out, "weight") else None


def _has(module: nn.Module, name: str) -> bool:
    """Whether `module` holds a (non-None) parameter `name` of its own."""
    return module._parameters.get(name) is not None


def _reads_in_projection(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    """Whether `node` reads an MHA's in-projection weight (packed, or one of q / k / v)."""
    if node.op != "get_attr":
        return False
    owner, _, name = node.target.rpartition(".")
    return name in ("in_proj_weight", *_SEPARATE_WEIGHTS) and _mha(gm, owner) is not None


def target_name(site: Site) -> str:
    """The name `target_modules` selects the site by: the nested out-projection's MHA (rule 1)."""
    return site.fqn.removesuffix(_NESTED_OUT)


def refuse(site: Site, r: int, use_dora: bool) -> str | None:
    """MHAs with separate q / k / v weights, and leaf module calls (rules 4 and 5)."""
    if site.weight.endswith(".q_proj_weight"):
        return (
            f"attention site {site.fqn!r} has separate q/k/v weights (kdim or vdim != "
            f"embed_dim={site.out_features}); only MultiheadAttention with one packed "
            "in_proj_weight can be adapted (PEFT refuses the same); target its out_proj instead"
        )
    if site.nodes[0].op == "call_module":
        return (
            f"attention site {site.fqn!r} is a leaf call_module of nn.MultiheadAttention, whose "
            "weights are read inside the module where no rewrite reaches; capture the model with "
            "lora_fx.capture(model, args, method='fx' or 'export'), which exposes them"
        )
    return None


MHA = SiteKind(
    name="mha",
    label="attention site",
    matchers=(match_mha,),
    holders=("lora_A", "lora_B"),
    factor_suffix=".weight",
    # A [r, E] and B [3E, r] (in-projection) or [E, r] (out-projection) are nn.Linear modules,
    # made and folded as on linear sites: PEFT's `get_delta_weight` is `scale * B @ A` for both
    factor_shapes=LINEAR.factor_shapes,
    new_factors=LINEAR.new_factors,
    emit_down=None,
    emit_up=None,
    emit_base=None,
    delta=LINEAR.delta,
    fold_factors=LINEAR.fold_factors,
    magnitude_shape=lambda site: (site.out_features,),
    can=Capabilities(
        dora=False,
        lora_bias=False,
        mixed_batch=False,
        layouts=("plain",),
        branch_at="weight_read",
    ),
    refuse=refuse,
    refusal_note=" (weight {weight!r} of an nn.MultiheadAttention, adapted where it is read)",
    target_name=target_name,
    # fx's lone out_proj is an nn.Linear to PEFT's all-linear (rule 3); the nested one is not
    in_all_linear=lambda site: site.fqn.endswith(_OUT) and not site.fqn.endswith(_NESTED_OUT),
)
