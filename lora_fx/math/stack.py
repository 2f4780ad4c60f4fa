"""Adapters stacked into slots, and the per-row gathered delta that reads them.

    stack_adapters([A_0, None, A_2], [B_0, None, B_2], [s_0, 0, s_2], r)
        ->  A [slots, r, in]   B [slots, out, r]      slot k: A_k and s_k * B_k, rank zero-padded
    gathered_linear(y, x, index, a_t, b_t, alora_offsets=None)
        ->  y[i] + x[i] @ a_t[index[i]] @ b_t[index[i]]      a_t [slots, in, r], b_t [slots, r, out]
            (aLoRA: the rank-r activations times `alora_mask(alora_offsets, .)` per row)
    gathered_embedding(y, ids, index, a_t, b_t)
        ->  y[i] + a_t[index[i], ids[i]] @ b_t[index[i]]     a_t [slots, num, r], b_t [slots, r, d]
    gathered_conv(y, x, index, a_t, b_t, stride, padding, dilation)
        ->  y[i] + conv1x1(conv(x[i], A[index[i]]), B[index[i]])
            a_t [slots, in, r, *k], b_t [slots, r, out, *1]   (A, B with in / out and r swapped)

Both the torch graph's mixed batches (`passes/_gather.py`) and the ONNX "stacked" layout
(`exporters/_branches.py`) build their stacks with `stack_adapters`: one function, one layout.
Tensors in, tensors out; the stack is differentiable, so stacking parameters inside a graph
sends each slot's gradient back to its own adapter.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from lora_fx.math import ops
from lora_fx.math.alora import alora_mask

__all__ = [
    "gathered_conv",
    "gathered_embedding",
    "gathered_linear",
    "slot_lookup",
    "slot_rows",
    "stack_adapters",
]

_CONV_FNS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def stack_adapters(
    lora_as: Sequence[torch.Tensor | None],
    lora_bs: Sequence[torch.Tensor | None],
    scales: Sequence[float],
    rank: int,
    *,
    kind: str = "linear",
    a_shape: Sequence[int] | None = None,
    b_shape: Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack adapters' A and scale * B into slots, each zero-padded to `rank` (None: a zero slot).

    Args:
        lora_as: One A per slot, `[r_k, in, ...]`, or None for an empty slot.
        lora_bs: One B per slot, `[out, r_k, ...]`, or None.
        scales: One scale per slot, folded into B (ignored for empty slots).
        rank: The stacks' rank; every `r_k <= rank`.
        kind: The site kind (`ops.pad_rank`: "linear", "conv" or "embedding").
        a_shape: A's shape at `rank`, needed only when every slot is empty.
        b_shape: B's shape at `rank`, likewise.

    Returns:
        `(A [slots, rank, in, ...], B [slots, out, rank, ...])` in the first adapter's dtype.

    Raises:
        ValueError: An adapter's rank exceeds `rank`, or every slot is empty without shapes.

    Example:
        >>> a, b = stack_adapters([torch.ones(1, 2), None], [torch.ones(3, 1), None], [2.0, 0.0], 2)
        >>> a.shape, b.shape, b[0, :, 0].tolist(), b[1].abs().sum().item()
        (torch.Size([2, 2, 2]), torch.Size([2, 3, 2]), [2.0, 2.0, 2.0], 0.0)
    """
    first = next((i for i, a in enumerate(lora_as) if a is not None), None)
    if first is None and (a_shape is None or b_shape is None):
        raise ValueError("every slot is empty; pass a_shape and b_shape for the zero stacks")
    if first is not None:
        ref_a, ref_b = lora_as[first], lora_bs[first]
        a_shape = (rank, *ref_a.shape[1:])
        b_shape = (ref_b.shape[0], rank, *ref_b.shape[2:])
        dtype, device = ref_a.dtype, ref_a.device
    else:
        dtype, device = torch.get_default_dtype(), None
    a_list, b_list = [], []
    for a, b, scale in zip(lora_as, lora_bs, scales, strict=True):
        if a is None or b is None:
            a_list.append(torch.zeros(a_shape, dtype=dtype, device=device))
            b_list.append(torch.zeros(b_shape, dtype=dtype, device=device))
            continue
        a, b = ops.pad_rank(kind, a.to(dtype), (b * scale).to(dtype), rank)
        a_list.append(a)
        b_list.append(b)
    return torch.stack(a_list), torch.stack(b_list)


def gathered_linear(
    y: torch.Tensor,
    x: torch.Tensor,
    index: torch.Tensor,
    a_t: torch.Tensor,
    b_t: torch.Tensor,
    alora_offsets: torch.Tensor | None = None,
) -> torch.Tensor:
    """`y + delta`, row i's delta from its own slot: `x[i] @ a_t[index[i]] @ b_t[index[i]]`.

    Sites that flatten the batch (GPT-2's `addmm` on `[batch * seq, in]`) keep rows batch-major,
    so `x` and `y` are viewed as `[batch, m, in]` / `[batch, m, out]`. Each row gathers its
    `[in, r]` and `[r, out]` factors (a copy of `batch * r * (in + out)` numbers, whatever the
    number of slots) and runs two batched GEMMs; the second accumulates into `y`. In place when
    autograd does not record (the site output is fresh and read by nothing else), else out of
    place.

    Args:
        y: The site output `[..., out]` (batch-major rows).
        x: The site input `[..., in]`.
        index: `[batch]` slot per batch row (long).
        a_t: `[slots, in, r]` (A transposed; a view is fine).
        b_t: `[slots, r, out]` (scale * B transposed).
        alora_offsets: `[batch]` aLoRA offsets per row (`math.alora`), or None: every position.
            Row i's rank-r activations are multiplied by its position mask, so positions before
            its invocation add exactly 0 (a plain LoRA row holds an offset >= its length).

    Returns:
        `y` plus the per-row delta, shaped like `y`.
    """
    batch = index.shape[0]
    rows = x.reshape(batch, -1, x.shape[-1])  # [batch, m, in]
    low = torch.bmm(rows, a_t.index_select(0, index).to(x.dtype))  # [batch, m, r]
    if alora_offsets is not None:  # [batch, m, r] * [batch, m, 1]
        low = low * alora_mask(alora_offsets, low)
    return _add_up(y, low, index, b_t)


def gathered_embedding(
    y: torch.Tensor,
    ids: torch.Tensor,
    index: torch.Tensor,
    a_t: torch.Tensor,
    b_t: torch.Tensor,
    padding_idx: int | None = None,
) -> torch.Tensor:
    """`y + delta` at an embedding site; row i: `a_t[index[i], ids[i]] @ b_t[index[i]]`.

    PEFT's per-adapter branch is `F.embedding(ids, A.T) @ (scale * B).T`; here every row looks up
    its ids in its own slot of the stacked `A^T` (`slot_lookup`: one `embedding` over the
    flattened stack, ids offset by `slot * num`), then one batched GEMM with the gathered
    `[r, dim]` factors. Shape-static: a new composition changes `index`'s values only. The
    padding row's lookup gets no gradient (as `F.embedding(..., padding_idx)`); its value is read.

    Args:
        y: The site output `[batch, ..., dim]`.
        ids: The token ids `[batch, ...]` (long).
        index: `[batch]` slot per batch row (long).
        a_t: `[slots, num, r]` (A transposed; a view is fine).
        b_t: `[slots, r, dim]` (scale * B transposed).
        padding_idx: The site's padding index, or None.

    Returns:
        `y` plus the per-row delta, shaped like `y`.
    """
    num, rank = a_t.shape[1], a_t.shape[2]
    low = slot_lookup(ids, index, a_t.reshape(-1, rank), num)  # [batch, ..., r]
    if padding_idx is not None and low.requires_grad:
        low = torch.where((ids == padding_idx).unsqueeze(-1), low.detach(), low)
    return _add_up(y, low.reshape(index.shape[0], -1, rank).to(y.dtype), index, b_t)


def slot_lookup(
    ids: torch.Tensor, index: torch.Tensor, table: torch.Tensor, num: int
) -> torch.Tensor:
    """Row i's ids looked up in slot `index[i]` of `table` `[slots * num, r]`: `[batch, ..., r]`.

    Shared by the torch graph's gathered embedding sites and the ONNX "stacked" layout.
    """
    offset = (index * num).reshape(index.shape[0], *([1] * (ids.dim() - 1)))
    return F.embedding(ids + offset, table)


def gathered_conv(
    y: torch.Tensor,
    x: torch.Tensor,
    index: torch.Tensor,
    a_t: torch.Tensor,
    b_t: torch.Tensor,
    stride: list[int],
    padding: list[int] | str,
    dilation: list[int],
) -> torch.Tensor:
    """`y + delta` at a conv site (groups 1); row i convolves with its slot's A, then its 1x1 B.

    The per-row A convolution is one grouped conv over the batch: rows become channel groups
    (`x` viewed as `[1, batch * in, *spatial]`, the gathered kernels as `[batch * r, in, *k]`,
    `groups=batch`); then `B` is a batched GEMM over the flattened positions. Why not unfold +
    bmm (same result): `benchmarks/bench_gather.py --site conv` (Conv2d 64 -> 64, 3x3, 16 x 16,
    r 16, 1 thread) puts the grouped conv at +0.7 ms over the base conv at batch 8 and +3.4-5.1 ms
    at batch 32, unfold + bmm at +2.3 / +16-18 ms: im2col copies the input 9 times over (one column
    per kernel tap) before two thin rank-16 GEMMs, where the grouped conv runs the direct conv
    kernel on the input as it is. Both stay flat in the number of adapters.

    Args:
        y: The site output `[batch, out, *spatial]`.
        x: The site input `[batch, in, *spatial_in]`.
        index: `[batch]` slot per batch row (long).
        a_t: `[slots, in, r, *k]` (stack_adapters' A with in and r swapped).
        b_t: `[slots, r, out, *1]` (scale * B, likewise).
        stride: The site's stride.
        padding: The site's padding (ints or "same" / "valid").
        dilation: The site's dilation.

    Returns:
        `y` plus the per-row delta, shaped like `y`.
    """
    batch, rank, dims = index.shape[0], a_t.shape[2], x.dim() - 2
    kernels = a_t.index_select(0, index).transpose(1, 2)  # [batch, r, in, *k]
    kernels = kernels.reshape(batch * rank, *kernels.shape[2:])
    rows = x.reshape(1, -1, *x.shape[2:])  # [1, batch * in, *spatial]
    conv = _CONV_FNS[dims]
    low = conv(rows, kernels.to(x.dtype), None, stride, padding, dilation, batch)
    low = low.view(batch, rank, -1).to(y.dtype)  # [batch, r, positions]
    up = b_t.index_select(0, index).flatten(2).transpose(1, 2).to(y.dtype)  # [batch, out, r]
    # reshape: a view when y's strides allow it (contiguous and channels-last do), else a copy
    return _accumulate(y, y.reshape(batch, y.shape[1], -1), up, low)


def _add_up(y: torch.Tensor, low: torch.Tensor, index: torch.Tensor, b_t: torch.Tensor):
    """`y + low @ b_t[index]` per batch row; low `[batch, m, r]`, b_t `[slots, r, out]`."""
    batch = index.shape[0]
    up = b_t.index_select(0, index).to(y.dtype)  # [batch, r, out]
    return _accumulate(y, y.view(batch, -1, y.shape[-1]), low.to(y.dtype), up)


def _accumulate(y: torch.Tensor, out: torch.Tensor, left: torch.Tensor, right: torch.Tensor):
    """`out + left @ right` (out a batched view of y), shaped like y.

    In place when autograd does not record (the site output is fresh and read by nothing
    else), else out of place.
    """
    if torch.is_grad_enabled() and (y.requires_grad or left.requires_grad or right.requires_grad):
        return torch.baddbmm(out, left, right).view(y.shape)
    return out.baddbmm_(left, right).view(y.shape)


def slot_rows(index: torch.Tensor, k: int, out: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """`scale` on the rows of `out` whose batch row uses slot `k`, 0 elsewhere, shaped to broadcast.

    The masked branch of a site that cannot gather (conv, embedding, DoRA, ...) weights its
    output with this. Sites that flatten the batch see `batch * m` rows; each sample's weight is
    repeated over its rows.
    """
    weights = (index == k).to(out.dtype) * scale
    weights = weights.repeat_interleave(out.shape[0] // weights.shape[0])
    return weights.view((out.shape[0],) + (1,) * (out.dim() - 1))
