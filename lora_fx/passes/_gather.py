"""Mixed-batch branches: each batch row gathers its own adapter's A and B from per-site stacks.

    y = linear(x, W)      ->  y' = gathered_linear(y, x, index, A_t, B_t)
                              y'[i] = y[i] + x[i] @ A_t[index[i]] @ B_t[index[i]]
    y = embedding(W, ids) ->  y' = gathered_embedding(y, ids, index, A_t, B_t, padding_idx)
                              y'[i] = y[i] + A_t[index[i], ids[i]] @ B_t[index[i]]
    y = conv(x, W)        ->  y' = gathered_conv(y, x, index, A_t, B_t, stride, padding, dilation)
                              y'[i] = y[i] + B[index[i]] * conv(x[i], A[index[i]])   (B 1x1)
    A_t [slots + 1, in, r_max]   B_t [slots + 1, r_max, out]   (scale folded into B; last slot 0)
    (an embedding's `in` is its number of rows: A_t holds each slot's A^T, PEFT's lookup table;
    a conv's stacks keep the kernel dims last: A_t [slots + 1, in, r_max, *k], B_t [.., *1])
    index = lora_fx_adapter_index [batch]: a row's slot (`slots`, the zero slot, for "__base__")
    aLoRA: y'[i] = y[i] + ((x[i] @ A_t[index[i]]) * mask_i) @ B_t[index[i]]
           mask_i = alora_mask(lora_fx_alora_offsets [batch], .)[i]   (rule 6)

Why gather and not group rows per adapter (`benchmarks/bench_gather.py`, Intel Xeon, 1 thread;
one site, in 256, out 512, r 16, 4/16/64 adapters), the delta's cost over the base linear:
batch 32 x 32 tokens: gathered +0.39-0.43 ms, flat in the number of adapters; rows grouped per
adapter with one GEMM pair each (segment GEMMs) +0.49-1.00 ms, growing with it (a sort, the
counts on the host, a small GEMM pair and an `index_add_` per adapter); 8 rows x 1 token
(decode): gathered +0.03-0.04 ms, grouped +0.09-0.16 ms; the masked layout this replaces (every
adapter's branch on every row) +3.5 / +9.2 / +32 ms. Grouping also needs per-adapter row counts
on the host, a data-dependent shape that breaks a compiled graph; a gather is shape-static.
`A_t` / `B_t` hold the rank last / first (`[in, r]`, `[r, out]`): the site runs 6 % (batch 32)
to 40 % (decode) faster than with PEFT's `[r, in]` / `[out, r]` factors gathered.

Rules:
1. A site is gathered when its kind has a gathered form (`SiteKind.gathered`: linear,
   embedding, and conv with groups 1) and every adapter on it is plain LoRA in the site's dtype
   (aLoRA too: rule 6; no DoRA, no `lora_bias`, no Arrow router; in training also no dropout).
   Other sites (grouped convs, sites an Arrow router routes, and the rest) keep one masked
   branch per slot, weighted by `index == k` (`math.stack.slot_rows`; a router's branch routes
   every token, then keeps its own rows).
   `bench_gather.py --site embedding / conv`, 1 thread, 4 / 16 / 64 adapters, over the base op:
   embedding (8192 rows, dim 512, r 16; an `[num, r]` table per slot) at batch 32 x 32 tokens
   gathered +0.30 ms, masked +3.3 / +11 / +42 ms; decode 8 x 1 +0.035 ms vs +0.08 / +0.26 /
   +1.2 ms. Conv2d (64 -> 64, 3x3, 16 x 16, r 16; one grouped conv over the batch,
   `math.stack.gathered_conv`) at batch 8 +0.7 ms, masked +2.1 / +12 / +47 ms.
2. Inference (`gm.eval()` when the batch is set): the stacks are buffers
   `lora_fx_stacks.<site>.a_t` / `.b_t`, written from the slots' adapters by `stack_adapters`;
   a new composition, or an adapter loaded into / deleted from a slot, writes buffer values only:
   no recompile, as long as every site gathers.
3. Training (`gm.train()` when the batch is set): each site stacks its slots' A and B inside the
   graph (`stack_and_gather`), so each adapter's gradient is the one it gets trained alone on its
   rows. A change of slot occupant rebuilds the graph.
4. The graph is rebuilt only when its layout key changes (training flag, slots, each site's rank
   and gathered-or-masked; the occupants too where the graph reads adapters' own tensors).
5. Stack buffers are copies: after writing adapter weights by hand, call `set_adapter_batch`
   with `refresh=True` (loading, hot-swapping and deleting refresh them).
6. aLoRA (PEFT's `calculate_alora_offsets(..., adapter_names=)`): when an adapter on the graph
   has `alora_invocation_tokens`, the batch has one `[batch]` offsets buffer
   `lora_fx_alora_offsets`, and every site an aLoRA adapter adapts multiplies its rank-r
   activations by the position mask it gives (gathered sites in `gathered_linear`; masked
   branches read it instead of their adapter's own buffer). A row of a plain adapter holds
   `EVERY_POSITION` (mask all ones), a row of an aLoRA adapter its offset from that adapter's
   invocation tokens (0, unadapted, until `set_alora_offsets`), a `"__base__"` row 0 (it reads the
   zero slot anyway). New offsets or a new composition write values only: no recompile.
"""

from __future__ import annotations

import operator

import torch
import torch.fx
from torch import nn

from lora_fx.core import graph as _graph
from lora_fx.core.state import LoraState
from lora_fx.math.quant import logical_dtype
from lora_fx.math.stack import stack_adapters
from lora_fx.passes._branch import insert_branch
from lora_fx.passes._emit import Emitter, chain_end
from lora_fx.sites import Site, all_sites
from lora_fx.sites.kinds import kind_of, lora_paths

__all__ = [
    "ALORA_BUFFER",
    "EVERY_POSITION",
    "INDEX_BUFFER",
    "STACKS",
    "alora_sites",
    "emit_batch",
    "layout_key",
    "refresh_adapter",
    "site_ranks",
    "stack_slots",
    "write_batch_offsets",
    "write_slots",
]

INDEX_BUFFER = "lora_fx_adapter_index"
ALORA_BUFFER = "lora_fx_alora_offsets"
EVERY_POSITION = torch.iinfo(torch.long).max  # an offset past any row's end: mask all ones
STACKS = "lora_fx_stacks"
_TAG = "__batch__"


def site_ranks(state: LoraState, sites: dict[str, Site], gm: torch.fx.GraphModule) -> dict:
    """`{fqn: (rank, gathered)}` for every site an unmerged adapter of the graph adapts."""
    out: dict[str, tuple[int, bool]] = {}
    for fqn in sorted({f for rec in state.adapters.values() for f in rec.sites}):
        recs = [a.sites[fqn] for a in state.adapters.values() if fqn in a.sites]
        rank = max([state.batch_rank or 0, *(r.r for r in recs)])
        out[fqn] = (rank, _can_gather(gm, state, sites[fqn], fqn))
    return out


def _can_gather(gm: torch.fx.GraphModule, state: LoraState, site: Site, fqn: str) -> bool:
    """Rule 1: a gathered kind, plain LoRA, adapter dtype == site dtype (no dropout in training)."""
    if kind_of(site).gathered(site) is None or kind_of(site).can.branch_at == "weight_read":
        return False
    dtype = logical_dtype(_graph.get_attr(gm, site.weight))
    for name, adapter in state.adapters.items():
        rec = adapter.sites.get(fqn)
        if rec is None:
            continue
        if (
            rec.use_dora
            or rec.use_kasa
            or rec.velora is not None
            or rec.qalora_group_size
            or rec.monteclora
            or rec.block_diagonal
            or rec.arrow is not None
            or rec.lora_bias
            or (state.batch_training and rec.dropout > 0)
        ):
            return False
        if _graph.get_attr(gm, lora_paths(site.kind, fqn, name).a).dtype != dtype:
            return False
    return True


def layout_key(state: LoraState, ranks: dict) -> tuple:
    """What the mixed-batch graph depends on (rule 4); equal keys: the graph stays as it is."""
    reads_adapters = state.batch_training or not all(g for _, g in ranks.values())
    slots = tuple(state.batch_adapters) if reads_adapters else len(state.batch_adapters)
    return (state.batch_training, slots, tuple(sorted(ranks.items())), alora_sites(state))


def alora_sites(state: LoraState) -> tuple[str, ...]:
    """The sites some aLoRA adapter on the graph adapts (rule 6): their branches read the mask."""
    adapters = state.adapters.values()
    return tuple(sorted({fqn for a in adapters for fqn, rec in a.sites.items() if rec.alora}))


def write_batch_offsets(
    gm: torch.fx.GraphModule, state: LoraState, offsets: dict[str, torch.Tensor] | None = None
) -> bool:
    """Write the batch's `[batch]` aLoRA offsets from the index buffer (rule 6); False: no aLoRA.

    `offsets[name]`: `[batch]` offsets from `name`'s invocation tokens for every row; a row takes
    those of its own adapter (absent: 0). On the device, without reading the index on the host.
    """
    if not any(a.config.alora_invocation_tokens for a in state.adapters.values()):
        _graph.delete_attr(gm, ALORA_BUFFER)
        return False
    index = gm.get_buffer(INDEX_BUFFER)
    table = torch.zeros(len(state.batch_adapters) + 1, index.shape[0], dtype=torch.long)
    table = table.to(index.device)  # [slots + 1, batch]: every slot's offsets for every row
    for k, name in enumerate(state.batch_adapters):
        if name is None:
            continue
        if not state.adapters[name].config.alora_invocation_tokens:
            table[k] = EVERY_POSITION
        elif offsets is not None and name in offsets:
            table[k] = offsets[name].to(index.device)
    rows = torch.arange(index.shape[0], device=index.device)
    _graph.write_buffer(gm, ALORA_BUFFER, table[index, rows])  # same batch size: in place
    return True


def emit_batch(
    gm: torch.fx.GraphModule, state: LoraState, sites: dict[str, Site], ranks: dict
) -> None:
    """Insert the mixed-batch branches of every site (rules 1-3); stacks are registered here."""
    _graph.delete_attr(gm, STACKS)
    slots, alora = state.batch_adapters, alora_sites(state)
    if alora and ALORA_BUFFER not in gm._buffers:
        write_batch_offsets(gm, state)  # an aLoRA adapter loaded while the batch is set
    for fqn, (rank, gathered) in ranks.items():
        site = sites[fqn]
        if not gathered:
            for k, name in enumerate(slots):
                rec = state.adapters[name].sites.get(fqn) if name is not None else None
                if rec is not None:
                    row_mask = (INDEX_BUFFER, k)
                    insert_branch(gm, site, name, rec, row_mask=row_mask, alora=ALORA_BUFFER)
            continue
        if state.batch_training:
            _emit_stacking(gm, state, site, rank, alora=fqn in alora)
            continue
        a_shape, b_shape = kind_of(site).factor_shapes(site, rank)  # [r, in, ...], [out, r, ...]
        a_t = torch.zeros(len(slots) + 1, *_swap(a_shape), **_like(gm, site))
        b_t = torch.zeros(len(slots) + 1, *_swap(b_shape), **_like(gm, site))
        holder = _stack_holder(gm, fqn)
        holder.register_buffer("a_t", a_t, persistent=False)
        holder.register_buffer("b_t", b_t, persistent=False)
        gather, extra = kind_of(site).gathered(site)
        for base, x in zip(site.nodes, site.inputs, strict=True):
            end, x = chain_end(base), chain_end(x)
            emit = Emitter(gm.graph, end, {"adapter": _TAG, "site": fqn})
            index = emit("mask", "get_attr", INDEX_BUFFER)
            a = emit("weight", "get_attr", f"{STACKS}.{fqn}.a_t")
            b = emit("weight", "get_attr", f"{STACKS}.{fqn}.b_t")
            args = (end, x, index, a, b, *extra, *_offsets(emit, fqn in alora))
            emit.attach(end, emit("add", "call_function", gather, args))


def _offsets(emit: Emitter, alora: bool) -> tuple[torch.fx.Node, ...]:
    """The gather's trailing `alora_offsets` argument (rule 6; linear sites), or nothing."""
    return (emit("mask", "get_attr", ALORA_BUFFER),) if alora else ()


def _emit_stacking(
    gm: torch.fx.GraphModule, state: LoraState, site: Site, rank: int, *, alora: bool
) -> None:
    """Rule 3: the site stacks its slots' own A and B in the graph, then gathers as in eval."""
    gather, extra = kind_of(site).gathered(site)
    for base, x in zip(site.nodes, site.inputs, strict=True):
        end, x = chain_end(base), chain_end(x)
        emit = Emitter(gm.graph, end, {"adapter": _TAG, "site": site.fqn})
        index = emit("mask", "get_attr", INDEX_BUFFER)
        lora_as, lora_bs, scales = [], [], []
        for name in (*state.batch_adapters, None):
            rec = state.adapters[name].sites.get(site.fqn) if name is not None else None
            if rec is None:
                lora_as.append(None)
                lora_bs.append(None)
                scales.append(0.0)
                continue
            paths = lora_paths(site.kind, site.fqn, name)
            lora_as.append(emit("weight", "get_attr", paths.a))
            lora_bs.append(emit("weight", "get_attr", paths.b))
            scales.append(rec.scale)
        args = (lora_as, lora_bs, scales, rank, kind_of(site).factor_shapes(site, rank))
        stacks = emit("weight", "call_function", stack_slots, args)
        a = emit("weight", "call_function", operator.getitem, (stacks, 0))
        b = emit("weight", "call_function", operator.getitem, (stacks, 1))
        args = (end, x, index, a, b, *extra, *_offsets(emit, alora))
        emit.attach(end, emit("add", "call_function", gather, args))


def stack_slots(
    lora_as: list[torch.Tensor | None],
    lora_bs: list[torch.Tensor | None],
    scales: list[float],
    rank: int,
    shapes: tuple[tuple[int, ...], tuple[int, ...]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """`stack_adapters` with in / out and r swapped: the gathers' `A_t`, `B_t` (rule 3)."""
    a, b = stack_adapters(lora_as, lora_bs, scales, rank, a_shape=shapes[0], b_shape=shapes[1])
    return a.transpose(1, 2), b.transpose(1, 2)


def write_slots(
    gm: torch.fx.GraphModule, state: LoraState, ranks: dict, slots: list[int] | None = None
) -> int:
    """Write the slots' adapters (all slots when None) into the stack buffers; returns how many."""
    holders = getattr(gm, STACKS, None)
    if holders is None:
        return 0
    chosen = range(len(state.batch_adapters)) if slots is None else slots
    written = 0
    with torch.no_grad():
        for fqn, (rank, gathered) in ranks.items():
            if not gathered:
                continue
            holder = holders.get_submodule(fqn)
            for k in chosen:
                name = state.batch_adapters[k]
                rec = state.adapters[name].sites.get(fqn) if name is not None else None
                if rec is None:
                    holder.a_t[k].zero_()
                    holder.b_t[k].zero_()
                    continue
                paths = lora_paths(rec.kind, fqn, name)
                lora_a, lora_b = _graph.get_attr(gm, paths.a), _graph.get_attr(gm, paths.b)
                a, b = stack_adapters([lora_a], [lora_b], [rec.scale], rank, kind=rec.kind)
                holder.a_t[k].copy_(a[0].transpose(0, 1))
                holder.b_t[k].copy_(b[0].transpose(0, 1))
                written += 1
    return written


def refresh_adapter(gm: torch.fx.GraphModule, state: LoraState, name: str) -> int:
    """Rewrite the stack slots that hold `name` from its tensors (after an in-place write)."""
    if state.batch_adapters is None or name not in state.batch_adapters:
        return 0
    ranks = site_ranks(state, all_sites(gm), gm)
    slots = [k for k, n in enumerate(state.batch_adapters) if n == name]
    return write_slots(gm, state, ranks, slots)


def _swap(shape: tuple[int, ...]) -> tuple[int, ...]:
    """A factor's shape with its first two dims swapped (the stacks' rank-inner orientation)."""
    return (shape[1], shape[0], *shape[2:])


def _like(gm: torch.fx.GraphModule, site: Site) -> dict:
    """The dtype and device of the site's weight (stacks take the site's dtype)."""
    weight = _graph.get_attr(gm, site.weight)
    return {"dtype": logical_dtype(weight), "device": weight.device}


def _stack_holder(gm: torch.fx.GraphModule, fqn: str) -> nn.Module:
    """The (new) module at `lora_fx_stacks.<fqn>` that holds a site's stacks."""
    owner = gm
    for part in (STACKS, *fqn.split(".")):
        child = owner._modules.get(part)
        if child is None:
            child = nn.Module()
            owner.add_module(part, child)
        owner = child
    return owner
