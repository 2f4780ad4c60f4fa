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
6. KaSA (`kasa_config`) multiplies the rank-r activations by `lora_diag` (plain layout).
   VeLoRA (`velora_config`) computes A as `velora_linear`, reading the projection the site's
   `lora_velora_embed` holder returns (None outside training: plain; `_velora.py`) (plain).
   Arrow routers (`arrow_config`) mix their experts per token instead (`_arrow.py`).
   BD-LoRA (`use_bdlora`) computes its block-diagonal A or B as `ops.block_diag_linear` (plain).
   aLoRA (`alora_invocation_tokens`) multiplies the rank-r activations (the output with a B
   bias) by `alora_mask` of the site's offsets buffer: 0 before each row's invocation (`_alora.py`).
   QALoRA (`use_qalora`) feeds A the group-averaged input `qalora_pool(x, g)` (`_qalora.py`;
   not the "weight" layout).
   MonteCLoRA (`monteclora_config`) reads A as `perturbed_a(A, s)`, `s` what the site's sampler
   returns after dropout (None outside training: A itself; `_monteclora.py`; not "weight").
   DoRA (`use_dora`) rescales the branch output and the base term (`_dora.py`); `target_parameters`
   and MHA sites get `W -> W + delta` instead of a branch after the op (`_param.py`), in training
   graphs and export copies alike (B, scale and dtype cast as the spec says); trainable-token
   sites get `W -> index_copy(W, rows, delta)` (`_param.py`).
7. Layouts (`LoraState.layout`, chosen with `set_layout`), each exact up to float rounding:
   "fused" (default): B, scale and add are one `addmm` with the base output as accumulator
       on linear and embedding sites (`fused_ops.add_lora` / `add_low_rank`);
   "plain": `add(y, mul(linear(low, B), scale))`, PEFT's order of operations;
   "weight": the base op reads `W + scale * B @ A` (`fused_ops.low_rank_weight`, role "add"),
       computed once per call: cheapest for many tokens; ATen linear / addmm / mm sites only.
   "auto" (the default): both, and each call takes one (`fused_ops.weight_pays`): the base op
       reads `weight_for_tokens(W, x, ...)` and its output goes through
       `add_lora_for_tokens(y, x, ...)` (both role "add"); training calls and calls with few
       tokens run the fused branch, inference calls with many tokens the merged weight.
   A site that cannot take the requested layout (DoRA, lora_bias, dtype casts, conv; for
   "weight" and "auto" also dropout > 0, mixed batches, module calls) takes the next one that
   fits; an export copy takes "fused" for "auto" (one traced path, no guard on the tokens).
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.fx

from lora_fx.core import graph as _graph
from lora_fx.core.keys import LoraPaths
from lora_fx.core.state import SiteRecord
from lora_fx.math.alora import alora_mask
from lora_fx.math.fused_ops import (
    add_lora,
    add_lora_for_tokens,
    add_low_rank,
    add_low_rank_out_of_place,
    low_rank_weight,
    weight_for_tokens,
)
from lora_fx.math.monteclora import perturbed_a
from lora_fx.math.ops import block_diag_linear
from lora_fx.math.qalora import qalora_pool
from lora_fx.math.quant import logical_dtype
from lora_fx.math.velora import velora_linear
from lora_fx.passes._arrow import emit_arrow
from lora_fx.passes._dora import dora_output
from lora_fx.passes._emit import Emitter, chain_end, strip_branches, weighted_rows
from lora_fx.passes._param import insert_param_branch, insert_row_branch
from lora_fx.sites import Site
from lora_fx.sites.kinds import kind_of, lora_paths
from lora_fx.sites.linear import LINEAR_OPS

__all__ = [
    "LAYOUTS",
    "BranchSpec",
    "branch_spec",
    "emit_branch",
    "fitting_layout",
    "insert_branch",
    "remove_branches",
    "weight_arg_index",
    "weight_update_node",
]

_aten = torch.ops.aten
LAYOUTS = ("auto", "fused", "plain", "weight")
# Where a site op reads its weight: linear(x, W[out, in]); addmm(b, x, W'[in, out]); mm(x, W');
# matmul(x, W') (ATen and Python-level forms, `sites/linear.py`).
_WEIGHT_ARG = {
    **dict.fromkeys(LINEAR_OPS, 1),
    **dict.fromkeys((_aten.addmm.default, torch.addmm), 2),
    **dict.fromkeys((_aten.mm.default, _aten.matmul.default, torch.mm, torch.matmul), 1),
    operator.matmul: 1,
}


@dataclass(frozen=True)
class BranchSpec:
    """One adapter's branch on one site, as `emit_branch` builds it (training graph or export copy).

    Attributes:
        adapter: The tag of every node (an adapter name, or the exporter's own).
        a, b, b_bias: Module-tree paths of A, B and B's bias (`b_bias` None: no bias).
        scale: The branch scale; None when B already carries it (ONNX "inputs" tensors).
        cast: A float32 adapter on a half-precision site (rule 5).
        dropout: Path of the dropout module (None: p == 0, or an export, which runs in eval).
        row_mask: `(index buffer path, k)` for mixed batches: only rows whose slot is k.
        dora: DoRA's paths and record (None: plain LoRA).
        diag: Path of KaSA's `lora_diag` (None: no KaSA): `B(diag * A(x))`.
        velora: VeLoRA's `(holder path, num_groups, scale)`: A is `velora_linear` reading the
            holder's projection for `adapter` (`_velora.py`; None: a plain A).
        blocks: BD-LoRA's `("a" or "b", nblocks)`: that factor is block-diagonal (`_bdlora.py`).
        alora: Path of aLoRA's `[batch]` offsets buffer (None: no aLoRA): the branch is masked
            by position (`_alora.py`).
        qalora: QALoRA's group size: A reads `qalora_pool(x, qalora)` (0: x itself).
        monteclora: Path of MonteCLoRA's sampler for `adapter`: A is `perturbed_a(A, sampler())`.
        layout: The requested layout (rule 7); a site that cannot take it takes the next one.
        export: Build for an export copy: fused accumulates out of place (torch.export rejects
            in-place writes with dynamic shapes).
        rows: Trainable tokens: the weight rows `a` replaces.
    """

    adapter: str
    a: str
    b: str
    b_bias: str | None = None
    scale: float | None = 1.0
    cast: bool = False
    dropout: str | None = None
    row_mask: tuple[str, int] | None = None
    dora: tuple[LoraPaths, SiteRecord] | None = None
    diag: str | None = None
    velora: tuple[str, int, float] | None = None
    blocks: tuple[str, int] | None = None
    alora: str | None = None
    qalora: int = 0
    monteclora: str | None = None
    layout: str = "fused"
    export: bool = False
    rows: tuple[int, ...] = ()


def insert_branch(
    gm: torch.fx.GraphModule,
    site: Site,
    adapter: str,
    record: SiteRecord,
    *,
    row_mask: tuple[str, int] | None = None,
    layout: str = "fused",
    alora: str | None = None,
) -> None:
    """Add `adapter`'s branch after every node of `site` (parameters must already be registered).

    With `row_mask=(index_path, k)` the branch output is kept only on the batch rows whose slot in
    the `[batch]` index buffer is `k` (mixed batches that cannot gather). `layout`: see rule 7.
    `alora`: the offsets buffer an aLoRA branch reads instead of its own (a mixed batch's).
    """
    paths = lora_paths(site.kind, site.fqn, adapter)
    cast = _graph.get_attr(gm, paths.a).dtype != logical_dtype(_graph.get_attr(gm, site.weight))
    if record.arrow is not None:  # an Arrow router: routed among its experts (`_arrow.py`)
        emit_arrow(gm.graph, site, adapter, record, cast=cast, row_mask=row_mask)
        return
    spec = branch_spec(
        site, adapter, record, cast=cast, layout=layout, row_mask=row_mask, alora=alora
    )
    emit_branch(gm.graph, site, spec)


def branch_spec(
    site: Site,
    adapter: str,
    record: SiteRecord,
    *,
    cast: bool,
    layout: str,
    row_mask: tuple[str, int] | None = None,
    export: bool = False,
    alora: str | None = None,
) -> BranchSpec:
    """The spec of `adapter`'s branch on `site` from its record: training graphs and exports alike.

    An export copy runs in eval, where dropout is the identity and VeLoRA's and MonteCLoRA's A is
    plain A, so those parts are left out of it (their holder modules are not in the copy).
    `alora` replaces the adapter's own offsets buffer path (an aLoRA record only).
    """
    paths = lora_paths(site.kind, site.fqn, adapter)
    train = not export
    return BranchSpec(
        adapter,
        paths.a,
        paths.b,
        paths.b_bias if record.lora_bias else None,
        record.scale,
        cast=cast,
        dropout=paths.dropout if record.dropout > 0 and train else None,
        row_mask=row_mask,
        dora=(paths, record) if record.use_dora else None,
        diag=paths.diag if record.use_kasa else None,
        velora=(f"{site.fqn}.lora_velora_embed", *record.velora[:2])
        if record.velora and train
        else None,
        blocks=(record.block_diagonal, record.nblocks) if record.block_diagonal else None,
        alora=(alora or paths.alora) if record.alora else None,
        qalora=record.qalora_group_size,
        monteclora=f"{site.fqn}.lora_monteclora_sampler.{adapter}"
        if record.monteclora and train
        else None,
        layout=layout,
        export=export,
        rows=record.rows,
    )


def emit_branch(graph: torch.fx.Graph, site: Site, spec: BranchSpec) -> None:
    """`y + scale * B(A(dropout(x)))` after every node of `site`, laid out as rule 7 says."""
    kind, tag = kind_of(site), {"adapter": spec.adapter, "site": site.fqn}
    if kind.can.branch_at == "weight_read":  # target_parameters, MHA: W -> W + delta where read
        scale = 1.0 if spec.scale is None else spec.scale
        args = {"adapter": spec.adapter, "a": spec.a, "b": spec.b, "scale": scale}
        insert_param_branch(graph, site, **args, row_mask=spec.row_mask)
        return
    if kind.can.branch_at == "rows":  # trainable tokens: rows of W replaced where read
        args = {"adapter": spec.adapter, "values": spec.a, "rows": spec.rows}
        insert_row_branch(graph, site, **args, row_mask=spec.row_mask)
        return
    layout = fitting_layout(
        site,
        spec.layout,
        needs_plain=spec.b_bias is not None
        or spec.dora is not None
        or spec.diag is not None
        or spec.velora is not None
        or spec.blocks is not None
        or spec.cast,
        can_weight=spec.row_mask is None
        and spec.dropout is None
        and spec.alora is None
        and not spec.qalora
        and spec.monteclora is None,
    )
    if layout == "auto" and spec.export:
        layout = "fused"
    factor = 1.0 if spec.scale is None else spec.scale
    if layout == "weight":  # each site node reads W + scale * B @ A (adapters chain on W)
        for base in site.nodes:
            weight_update_node(Emitter(graph, base.prev, tag), base, spec.a, spec.b, factor)
        return
    if layout == "auto":
        for base, x in zip(site.nodes, site.inputs, strict=True):
            _auto_branch(graph, tag, base, chain_end(x), spec, factor)
        return
    for base, x in zip(site.nodes, site.inputs, strict=True):
        end = chain_end(base)
        # If x is another site's output, read it after that site's branches (they were inserted
        # after `site` was matched), not the bare base value.
        x = chain_end(x)
        emit = Emitter(graph, end, tag)
        a = emit("weight", "get_attr", spec.a)
        b = emit("weight", "get_attr", spec.b)
        b_bias = emit("weight", "get_attr", spec.b_bias) if spec.b_bias else None
        if spec.cast and not kind.can.input_is_ids:
            x = emit("cast", "call_function", _aten.type_as.default, (x, a))
        if spec.dropout is not None and not kind.can.input_is_ids:
            x = emit("dropout", "call_module", spec.dropout, (x,))
        if spec.qalora:  # QALoRA: [.., in] -> [.., in / g], PEFT's scaled group means
            x = emit("lora_a", "call_function", qalora_pool, (x, spec.qalora))
        if spec.monteclora is not None:  # MonteCLoRA: sampled after dropout, as in PEFT
            sample = emit("lora_a", "call_module", spec.monteclora, ())
            a = emit("lora_a", "call_function", perturbed_a, (a, sample))
        fused = layout == "fused"
        whole = spec.row_mask is None and spec.alora is None and not spec.export
        if fused and kind.can.fused_branch and whole:
            emit.attach(end, emit("add", "call_function", add_lora, (end, x, a, b, factor)))
            continue
        if spec.blocks is not None and spec.blocks[0] == "a":  # BD-LoRA: [.., r] from x's blocks
            low = emit("lora_a", "call_function", block_diag_linear, (x, a, spec.blocks[1]))
        elif spec.velora is not None:  # VeLoRA: the holder updates and hands over its projection
            holder, groups, v_scale = spec.velora
            embed = emit("lora_a", "call_module", holder, (x, spec.adapter))
            low = emit("lora_a", "call_function", velora_linear, (x, a, embed, groups, v_scale))
        else:
            low = kind.emit_down(emit, site, x, a)
        if spec.diag is not None:  # KaSA: [.., r] * lora_diag[r]
            diag = emit("weight", "get_attr", spec.diag)
            low = emit("lora_a", "call_function", _aten.mul.Tensor, (low, diag))
        # Mixed batch: weight the rank-r activations per row, scale folded in, rather than the
        # full-size output (two fewer full-size passes per adapter and site). B's bias and DoRA
        # act on the output, so those weight the output instead.
        mask_low = spec.row_mask is not None and spec.b_bias is None and spec.dora is None
        if mask_low:
            low = weighted_rows(emit, spec.row_mask, low, factor)
        if spec.alora is not None and spec.b_bias is None:  # aLoRA: [.., r] zero before invocation
            low = _alora_masked(emit, spec.alora, low)
        if fused:
            accumulate = add_low_rank_out_of_place if spec.export else add_low_rank
            scale = 1.0 if mask_low else factor  # a row mask already carries the scale
            emit.attach(end, emit("add", "call_function", accumulate, (end, low, b, scale)))
            continue
        if spec.blocks is not None and spec.blocks[0] == "b":  # BD-LoRA: [.., out] from blocks
            scaled = emit("lora_b", "call_function", block_diag_linear, (low, b, spec.blocks[1]))
        else:
            scaled = kind.emit_up(emit, site, low, b, b_bias)
        if not mask_low and spec.scale is not None:
            scaled = emit("scale", "call_function", _aten.mul.Tensor, (scaled, spec.scale))
        if spec.dora is not None:
            paths, record = spec.dora
            scaled = dora_output(emit, site, paths, record, base=base, x=x, a=a, b=b, lora=scaled)
        if spec.row_mask is not None and not mask_low:
            scaled = weighted_rows(emit, spec.row_mask, scaled, 1.0)
        if spec.alora is not None and spec.b_bias is not None:  # B's bias is masked too (PEFT)
            scaled = _alora_masked(emit, spec.alora, scaled)
        if spec.cast:
            scaled = emit("cast", "call_function", _aten.type_as.default, (scaled, end))
        emit.attach(end, emit("add", "call_function", _aten.add.Tensor, (end, scaled)))


def _auto_branch(
    graph: torch.fx.Graph,
    tag: dict[str, str],
    base: torch.fx.Node,
    x: torch.fx.Node,
    spec: BranchSpec,
    factor: float,
) -> None:
    """Rule 7's "auto" on one site call: the weight half before `base`, the branch half after.

    `base` reads `weight_for_tokens(W, x, ..)`, its output goes through
    `add_lora_for_tokens(y, x, ..)`; both read the same A and B nodes, so they agree per call.
    """
    emit = Emitter(graph, base.prev, tag)
    a = emit("weight", "get_attr", spec.a)
    b = emit("weight", "get_attr", spec.b)
    index, transposed = _weight_slot(base)
    args = (base.args[index], x, a, b, factor, transposed)
    base.update_arg(index, emit("add", "call_function", weight_for_tokens, args))
    end = chain_end(base)
    after = Emitter(graph, end, tag)
    after.attach(end, after("add", "call_function", add_lora_for_tokens, (end, x, a, b, factor)))


def _alora_masked(
    emit: Callable[..., torch.fx.Node], offsets_path: str, out: torch.fx.Node
) -> torch.fx.Node:
    """`out` times aLoRA's position mask [batch, T, 1] read from the offsets buffer."""
    offsets = emit("mask", "get_attr", offsets_path)
    mask = emit("mask", "call_function", alora_mask, (offsets, out))
    return emit("mask", "call_function", _aten.mul.Tensor, (out, mask))


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
    if layout in ("weight", "auto") and not (
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
    index, transposed = _weight_slot(base)
    args = (base.args[index], a, b, scale, transposed)
    node = emit("add", "call_function", low_rank_weight, args)
    base.update_arg(index, node)
    return node


def _weight_slot(base: torch.fx.Node) -> tuple[int, bool]:
    """Where `base` reads its weight, and whether as `[in, out]` (the "weight" / "auto" nodes).

    linear reads W as [out, in]; addmm / mm / matmul read [in, out] (t(W), or Conv1D's own).
    """
    return weight_arg_index(base), base.target not in LINEAR_OPS


def remove_branches(gm: torch.fx.GraphModule) -> int:
    """Erase every lora_fx branch node of `gm` (`_emit.strip_branches`); returns how many."""
    return strip_branches(gm.graph)
