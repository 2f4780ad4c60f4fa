"""Fold one adapter's delta into one site's base weight, and back (the core of merge / unmerge).

    plain LoRA:  W <- W + scale * left @ right            unfold:  W <- W - scale * left @ right
    KaSA:        the same with B diag(lora_diag) for B
    BD-LoRA:     the same with block_diag(blocks) for the block-diagonal A or B
    QALoRA:      the same with expand_a(A, g) for A (PEFT cannot merge QALoRA)
    DoRA:        W <- g * (W + delta), g = m / ||W + delta||    unfold:  W <- W / g - delta
    quantized:   the same value from the dequantized W, then re-quantized in place
    lora_bias:   b <- b + scale * b_B                     unfold:  b <- b - scale * b_B
    tokens:      W[rows] <- delta                         unfold:  W[rows] <- the rows replaced

Rules:
1. Every fold leaves an entry in `state.merge_undo[(adapter, site)]` (in fold order): DoRA's norm,
   which the merged weight no longer determines, and for a quantized weight the packed storage it
   replaced. `unfold` pops it.
2. A quantized weight whose fold is the last one on that site is restored bitwise from its entry;
   otherwise (adapters unmerged out of order) it is dequantized, unfolded and re-quantized.
3. Plain LoRA on a float weight is folded in place by `ops.add_low_rank_` from the factors, as
   views of A, B and W (`_factors`):
       linear W[out, in] += B @ A            transposed linear / embedding  W[in, out] += A.T @ B.T
       conv   W.view(out, -1) += B.flatten(1) @ A.flatten(1)     (groups == 1, contiguous W)
       param  W[out, in] += B @ A, or per expert W[e] += B_e @ A_e
   No full-size delta is made: a float32 weight takes one `addmm_`, a bf16/fp16 weight is streamed
   in float32 chunks (`ops.MERGE_CHUNK_BYTES`), each rounded once.
4. DoRA, quantized weights and other layouts keep the full-size path: the delta and the merged
   value are computed in float32 (float64 for float64 adapters), then written; a plain fold into
   a weight of the delta's dtype adds in place.
5. The return value is the rounding loss `||written - wanted|| / ||wanted - before||`.
6. Trainable-token sites (`branch_at == "rows"`) write their rows exactly (PEFT's `index_copy`);
   the rows they replace are kept in the undo entry, so unfold restores them bitwise.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx

from lora_fx.core import graph as _graph
from lora_fx.core.state import LoraState, SiteRecord
from lora_fx.errors import MergeError
from lora_fx.math import dora, ops, quant
from lora_fx.math.qalora import expand_a
from lora_fx.sites import Site
from lora_fx.sites.kinds import kind_of, lora_paths

__all__ = [
    "bias_delta",
    "fold",
    "fold_value",
    "is_quantized_site",
    "merged_value",
    "site_delta",
    "unfold",
]


def site_delta(gm: torch.fx.GraphModule, site: Site, adapter: str, rec: SiteRecord) -> torch.Tensor:
    """The float32 delta `scale * B @ A` of one adapter on one site, in the base weight's layout."""
    a, b = _a_b(gm, site, adapter, rec)
    shape = tuple(_graph.get_attr(gm, site.weight).shape)
    return kind_of(site).delta(site, a, b, rec.scale, shape)


def is_quantized_site(gm: torch.fx.GraphModule, site: Site) -> bool:
    """Whether the site's base weight is a bitsandbytes quantized tensor."""
    return quant.is_quantized(_graph.get_attr(gm, site.weight))


def merged_value(
    gm: torch.fx.GraphModule, site: Site, adapter: str, rec: SiteRecord
) -> torch.Tensor:
    """The float value the weight would take if `adapter` were merged now (nothing is written)."""
    if kind_of(site).can.branch_at == "rows":
        values = _graph.get_attr(gm, lora_paths(site.kind, site.fqn, adapter).a).detach()
        return ops.replace_rows(_current(gm, site), values, rec.rows)
    return fold_value(gm, site, adapter, rec, _current(gm, site))


def fold_value(
    gm: torch.fx.GraphModule, site: Site, adapter: str, rec: SiteRecord, before: torch.Tensor
) -> torch.Tensor:
    """`before` with `adapter` folded in (DoRA: rescaled), in float32; nothing is written."""
    delta = site_delta(gm, site, adapter, rec)
    before = before.to(device=delta.device, dtype=delta.dtype)
    if rec.use_dora:
        return _dora_merge(gm, site, adapter, before, delta)[0]
    return before + delta


def fold(
    gm: torch.fx.GraphModule, site: Site, adapter: str, rec: SiteRecord, state: LoraState
) -> float:
    """Merge one adapter into one site's weight (and bias), in place; returns the rounding loss."""
    if kind_of(site).can.branch_at == "rows":
        weight = _graph.get_attr(gm, site.weight)
        state.merge_undo[(adapter, site.fqn)] = {"rows": weight.detach()[list(rec.rows)].clone()}
        values = _graph.get_attr(gm, lora_paths(site.kind, site.fqn, adapter).a)
        _write_rows(weight, rec.rows, values)
        return 0.0
    factors = _factors(gm, site, adapter, rec)
    if factors is not None:
        state.merge_undo[(adapter, site.fqn)] = None  # nothing to undo but the delta itself
        loss = ops.add_low_rank_(*factors, rec.scale)
        _fold_bias(gm, site, adapter, rec, sign=1.0)
        return loss
    weight, module = _graph.get_attr(gm, site.weight), _module(gm, site)
    delta = site_delta(gm, site, adapter, rec)
    before = _current(gm, site).to(delta.dtype)
    undo: dict[str, Any] = {}
    if rec.use_dora:
        wanted, undo["norm"] = _dora_merge(gm, site, adapter, before, delta)
    else:
        wanted = before + delta
    if quant.is_quantized(weight):
        undo["quantized"] = quant.snapshot(weight, module)
    state.merge_undo[(adapter, site.fqn)] = undo or None
    loss = _write(weight, module, before, wanted, delta if not rec.use_dora else None)
    _fold_bias(gm, site, adapter, rec, sign=1.0)
    return loss


def unfold(
    gm: torch.fx.GraphModule, site: Site, adapter: str, rec: SiteRecord, state: LoraState
) -> float:
    """Take one merged adapter back out of one site's weight (and bias), in place."""
    key = (adapter, site.fqn)
    keys = list(state.merge_undo)
    later = keys[keys.index(key) + 1 :] if key in keys else []
    undo = state.merge_undo.pop(key, None) or {}
    weight, module = _graph.get_attr(gm, site.weight), _module(gm, site)
    if "rows" in undo:  # trainable tokens: the replaced rows go back
        _write_rows(weight, rec.rows, undo["rows"])
        return 0.0
    _fold_bias(gm, site, adapter, rec, sign=-1.0)
    if "quantized" in undo and not any(fqn == site.fqn for _, fqn in later):
        quant.restore_(weight, undo["quantized"], module)  # the last fold here: bitwise restore
        return 0.0
    factors = _factors(gm, site, adapter, rec)
    if factors is not None:
        return ops.add_low_rank_(*factors, -rec.scale)
    delta = site_delta(gm, site, adapter, rec)
    before = _current(gm, site).to(delta.dtype)
    if rec.use_dora:
        if "norm" not in undo:
            raise MergeError(
                f"cannot unmerge DoRA adapter {adapter!r} from site {site.fqn!r}: the weight norm "
                "of its merge was not recorded"
            )
        paths = lora_paths(site.kind, site.fqn, adapter)
        magnitude = _graph.get_attr(gm, paths.magnitude).detach()
        wanted = dora.unmerged_weight(
            before, delta, magnitude, undo["norm"], kind=site.kind, transposed=site.transposed
        )
        return _write(weight, module, before, wanted, None)
    return _write(weight, module, before, before - delta, -delta)


def _factors(
    gm: torch.fx.GraphModule, site: Site, adapter: str, rec: SiteRecord
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """`(W, left, right)` views with plain LoRA's fold `W += scale * left @ right`; else None."""
    weight = _graph.get_attr(gm, site.weight)
    if rec.use_dora or quant.is_quantized(weight) or not weight.is_floating_point():
        return None
    a, b = _a_b(gm, site, adapter, rec)
    return kind_of(site).fold_factors(site, weight.detach(), a, b)


def _a_b(
    gm: torch.fx.GraphModule, site: Site, adapter: str, rec: SiteRecord
) -> tuple[torch.Tensor, torch.Tensor]:
    """A and B (detached); KaSA's B carries its diagonal: `B diag(lora_diag)`."""
    paths = lora_paths(site.kind, site.fqn, adapter)
    a, b = _graph.get_attr(gm, paths.a).detach(), _graph.get_attr(gm, paths.b).detach()
    if rec.use_kasa:  # (out, r) * (r,): PEFT's `(B * diag) @ A`
        b = b * _graph.get_attr(gm, paths.diag).detach()
    if rec.block_diagonal == "a":  # BD-LoRA: the stacked blocks as the full block-diagonal matrix
        a = ops.block_diag_matrix(a, rec.nblocks)
    elif rec.block_diagonal == "b":
        b = ops.block_diag_matrix(b, rec.nblocks)
    if rec.qalora_group_size:  # QALoRA: the pooling folded into a dense A [r, in]
        a = expand_a(a, rec.qalora_group_size)
    return a, b


def _dora_merge(
    gm: torch.fx.GraphModule, site: Site, adapter: str, before: torch.Tensor, delta: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """DoRA's merged weight and the norm it used (the same norm the branch computes)."""
    paths = lora_paths(site.kind, site.fqn, adapter)
    magnitude = _graph.get_attr(gm, paths.magnitude).detach()
    norm = dora.weight_norm(before, delta, kind=site.kind, transposed=site.transposed)
    wanted = dora.merged_weight(
        before, delta, magnitude, norm, kind=site.kind, transposed=site.transposed
    )
    return wanted, norm


def _write(
    weight: torch.Tensor,
    module: torch.nn.Module | None,
    before: torch.Tensor,
    wanted: torch.Tensor,
    add: torch.Tensor | None,
) -> float:
    """Store `wanted` in the weight; `add` (wanted - before) lets a float32 weight add in place."""
    with torch.no_grad():
        quantized = quant.is_quantized(weight)
        if not quantized and add is not None and weight.dtype == add.dtype:
            weight.add_(add)
            return 0.0
        start, intended = before.clone(), wanted - before  # `before` may alias the weight
        if quantized:
            quant.requantize_(weight, wanted, module)
            written = quant.dequantize(weight, module)
        else:
            weight.copy_(wanted.to(weight.dtype))
            written = weight
        return ops.rounding_error(start, written, intended)


def _write_rows(weight: torch.Tensor, rows: tuple[int, ...], values: torch.Tensor) -> None:
    """`W[rows] <- values`, in place (exact: a copy, not an add)."""
    index = torch.tensor(list(rows), dtype=torch.long, device=weight.device)
    with torch.no_grad():
        weight.index_copy_(0, index, values.detach().to(weight.dtype))


def bias_delta(gm: torch.fx.GraphModule, site: Site, adapter: str, rec: SiteRecord) -> torch.Tensor:
    """`lora_bias`: the float32 `scale * b_B` a merge adds to the base bias."""
    b_bias = _graph.get_attr(gm, lora_paths(site.kind, site.fqn, adapter).b_bias)
    return b_bias.detach().float() * rec.scale


def _fold_bias(
    gm: torch.fx.GraphModule, site: Site, adapter: str, rec: SiteRecord, *, sign: float
) -> None:
    """`lora_bias`: b <- b + sign * scale * b_B."""
    if not rec.lora_bias:
        return
    bias = _graph.get_attr(gm, site.bias)
    with torch.no_grad():
        bias.add_((bias_delta(gm, site, adapter, rec) * sign).to(bias.dtype))


def _current(gm: torch.fx.GraphModule, site: Site) -> torch.Tensor:
    """The base weight's value, dequantized if needed (not a copy for a float weight)."""
    weight = _graph.get_attr(gm, site.weight)
    if quant.is_quantized(weight):
        return quant.dequantize(weight, _module(gm, site))
    return weight.detach()


def _module(gm: torch.fx.GraphModule, site: Site) -> torch.nn.Module | None:
    """The module of a call_module site (a Linear8bitLt keeps int8 scales on it), else None."""
    node = site.nodes[0]
    return gm.get_submodule(node.target) if node.op == "call_module" else None
