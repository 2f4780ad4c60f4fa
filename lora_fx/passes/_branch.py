"""Insert and remove one adapter's branch at a site.

    y = site(x, W, b)   ->   y' = y + scale * lora_B(lora_A(dropout(x)))

    linear:    lora_A = linear(x, A[r, in]);            lora_B = linear(., B[out, r], b_B)
    conv:      lora_A = conv(x, A, stride, padding, dilation);  lora_B = 1x1 conv(., B, groups)
    embedding: lora_A = embedding(A.T, ids, padding_idx);       lora_B = linear(., B[dim, r])

Rules:
1. Every node created here is tagged `{"adapter", "site", "role"}`; removal finds nodes by tag only.
2. Branches of several adapters on one site chain: y -> add_a -> add_b; a new branch adds to the end
   of the chain, so adapters are summed in the order they were activated, as in PEFT.
3. Dropout with p == 0 is no node at all (PEFT's nn.Identity).
4. Each call of a site (a module called twice) gets its own branch reading the same parameters.
5. When the adapter's dtype differs from the base weight's (float32 adapter on a bf16 base,
   `autocast_adapter_dtype`), the branch casts its input to A's dtype and its output to the base
   output's dtype before the add (role "cast"), as PEFT's `_cast_input_dtype` / `result.to(...)`.
   PEFT adds in float32 and rounds the sum once; here the (small) delta is rounded before the add,
   so a result can differ from PEFT's in its last bit.
   `type_as` reads the dtypes at run time, so a later `gm.to(dtype)` keeps the graph right.
6. DoRA (`use_dora`) rescales the branch output and the base term (`_dora.py`); `target_parameters`
   sites get `W -> W + delta` instead of a branch after the op (`_param.py`).
7. Layouts (`LoraState.layout`, chosen with `set_layout`), each exact up to float rounding:
   "fused" (default): B, scale and add are one `addmm` with the base output as accumulator
       on linear and embedding sites (`fused_ops.add_lora` / `add_low_rank`);
   "plain": `add(y, mul(linear(low, B), scale))`, PEFT's order of operations;
   "weight": the base op reads `W + scale * B @ A` (`fused_ops.low_rank_weight`, role "add"),
       computed once per call: cheapest for many tokens; ATen linear / addmm / mm sites only.
   A site that cannot take the requested layout (DoRA, lora_bias, dtype casts, conv; for
   "weight" also dropout > 0, mixed batches, module calls) takes the next one that fits.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.fx

from lora_fx.core import graph as _graph
from lora_fx.core.state import SiteRecord
from lora_fx.math.fused_ops import add_lora, add_low_rank, low_rank_weight
from lora_fx.math.quant import logical_dtype
from lora_fx.passes._dora import dora_output
from lora_fx.passes._emit import Emitter, chain_end, strip_branches
from lora_fx.passes._param import insert_param_branch
from lora_fx.sites import Site
from lora_fx.sites.kinds import kind_of, lora_paths

__all__ = [
    "LAYOUTS",
    "fitting_layout",
    "insert_branch",
    "remove_branches",
    "row_weights",
    "weight_arg_index",
    "weight_update_node",
]

_aten = torch.ops.aten
LAYOUTS = ("fused", "plain", "weight")
# Where an ATen site op reads its weight: linear(x, W[out, in]); addmm(b, x, W'[in, out]);
# mm(x, W').
_WEIGHT_ARG = {_aten.linear.default: 1, _aten.addmm.default: 2, _aten.mm.default: 1}


def insert_branch(
    gm: torch.fx.GraphModule,
    site: Site,
    adapter: str,
    record: SiteRecord,
    *,
    row_mask: tuple[str, int] | None = None,
    layout: str = "fused",
) -> None:
    """Add `adapter`'s branch after every node of `site` (parameters must already be registered).

    With `row_mask=(buffer_path, k)` the branch output is multiplied per batch row by row `k` of the
    `[n_adapters, batch]` mask buffer (mixed-batch inference). `layout`: see rule 7.
    """
    kind = kind_of(site)
    if kind.can.branch_at == "weight_read":  # target_parameters: W -> W + delta wherever W is read
        insert_param_branch(gm, site, adapter, record, row_mask=row_mask)
        return
    paths = lora_paths(site.kind, site.fqn, adapter)
    cast = _graph.get_attr(gm, paths.a).dtype != logical_dtype(_graph.get_attr(gm, site.weight))
    layout = fitting_layout(
        site,
        layout,
        needs_plain=record.lora_bias or record.use_dora or cast,
        can_weight=row_mask is None and record.dropout == 0,
    )
    if layout == "weight":
        _insert_weight_update(gm, site, adapter, record, paths)
        return
    for base, x in zip(site.nodes, site.inputs, strict=True):
        end = chain_end(base)
        # If x is another site's output, read it after that site's branches (they were inserted
        # after `site` was matched), not the bare base value.
        x = chain_end(x)
        emit = Emitter(gm.graph, end, {"adapter": adapter, "site": site.fqn})
        a = emit("weight", "get_attr", paths.a)
        b = emit("weight", "get_attr", paths.b)
        b_bias = emit("weight", "get_attr", paths.b_bias) if record.lora_bias else None
        if cast and not kind.can.input_is_ids:
            x = emit("cast", "call_function", _aten.type_as.default, (x, a))
        if record.dropout > 0 and not kind.can.input_is_ids:
            x = emit("dropout", "call_module", paths.dropout, (x,))
        if layout == "fused" and kind.can.fused_branch and row_mask is None:
            add = emit("add", "call_function", add_lora, (end, x, a, b, record.scale))
            emit.attach(end, add)
            continue
        low = kind.emit_down(emit, site, x, a)
        # Mixed batch: weight the rank-r activations per row, scale folded in, rather than the
        # full-size output (two fewer full-size passes per adapter and site). B's bias and DoRA
        # act on the output, so those weight the output instead.
        mask_low = row_mask is not None and not record.lora_bias and not record.use_dora
        if mask_low:
            mask = emit("mask", "get_attr", row_mask[0])
            rows = emit(
                "mask", "call_function", row_weights, (mask, row_mask[1], low, record.scale)
            )
            low = emit("mask", "call_function", _aten.mul.Tensor, (low, rows))
        if layout == "fused":
            scale = 1.0 if mask_low else record.scale  # a row mask already carries the scale
            add = emit("add", "call_function", add_low_rank, (end, low, b, scale))
            emit.attach(end, add)
            continue
        up = kind.emit_up(emit, site, low, b, b_bias)
        scaled = up
        if not mask_low:
            scaled = emit("scale", "call_function", _aten.mul.Tensor, (up, record.scale))
        if record.use_dora:
            scaled = dora_output(emit, site, paths, record, base=base, x=x, a=a, b=b, lora=scaled)
        if row_mask is not None and not mask_low:
            mask = emit("mask", "get_attr", row_mask[0])
            rows = emit("mask", "call_function", row_weights, (mask, row_mask[1], scaled))
            scaled = emit("mask", "call_function", _aten.mul.Tensor, (scaled, rows))
        if cast:
            scaled = emit("cast", "call_function", _aten.type_as.default, (scaled, end))
        add = emit("add", "call_function", _aten.add.Tensor, (end, scaled))
        emit.attach(end, add)


def weight_arg_index(node: torch.fx.Node) -> int | None:
    """The position of the weight in an ATen linear / addmm / mm site node's args, else None."""
    if node.op != "call_function":
        return None
    index = _WEIGHT_ARG.get(node.target)
    return index if index is not None and len(node.args) > index else None


def fitting_layout(site: Site, layout: str, *, needs_plain: bool, can_weight: bool) -> str:
    """The requested layout if the site can take it, else the next that fits (rule 7).

    `needs_plain`: the branch has DoRA, a lora_B bias or dtype casts; `can_weight`: no dropout
    and no per-row mask stand between x and the delta.
    """
    layouts = kind_of(site).can.layouts
    if needs_plain or "fused" not in layouts:
        return "plain"
    if layout == "weight" and not (
        can_weight
        and "weight" in layouts
        and all(weight_arg_index(n) is not None for n in site.nodes)
    ):
        return "fused"
    return layout


def weight_update_node(
    emit: Callable[..., torch.fx.Node], base: torch.fx.Node, a_path: str, b_path: str, scale: float
) -> torch.fx.Node:
    """`W + scale * B @ A` in the layout `base` reads its weight, plugged into `base` (role add).

    `emit` must insert before `base`; A and B are read from `a_path` / `b_path`.
    """
    a = emit("weight", "get_attr", a_path)
    b = emit("weight", "get_attr", b_path)
    index = weight_arg_index(base)
    # linear reads W as [out, in]; addmm / mm read [in, out] (t(W), or Conv1D's own layout).
    transposed = base.target != _aten.linear.default
    args = (base.args[index], a, b, scale, transposed)
    node = emit("add", "call_function", low_rank_weight, args)
    base.update_arg(index, node)
    return node


def _insert_weight_update(
    gm: torch.fx.GraphModule, site: Site, adapter: str, record: SiteRecord, paths
) -> None:
    """Each site node reads `W + scale * B @ A` instead of `W` (adapters chain: W -> add -> add)."""
    for base in site.nodes:
        emit = Emitter(gm.graph, base.prev, {"adapter": adapter, "site": site.fqn})
        weight_update_node(emit, base, paths.a, paths.b, record.scale)


def remove_branches(gm: torch.fx.GraphModule) -> int:
    """Erase every lora_fx branch node of `gm` (`_emit.strip_branches`); returns how many."""
    return strip_branches(gm.graph)


def row_weights(mask: torch.Tensor, k: int, out: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Row `k` of a `[n_adapters, batch]` mask, shaped to broadcast over `out`'s rows.

    Sites that flatten the batch (GPT-2's `addmm` on `[batch * seq, in]`) see `batch * seq` rows, so
    each sample's weight is repeated over its rows. Plain tensor ops: dynamo and export trace it.
    """
    weights = mask[k].to(out.dtype) * scale
    weights = weights.repeat_interleave(out.shape[0] // weights.shape[0])
    return weights.view((out.shape[0],) + (1,) * (out.dim() - 1))
