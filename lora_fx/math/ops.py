"""Pure LoRA tensor math: tensors in, tensors out; no graph, no modules.

`add_low_rank_` is the one in-place function: merge's kernel, `W += alpha * left @ right`, which
streams over W in row chunks so that no full-size delta or copy of W is ever made.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "MERGE_CHUNK_BYTES",
    "add_low_rank_",
    "alpha_for_scale",
    "block_diag_linear",
    "block_diag_matrix",
    "delta_weight",
    "pad_rank",
    "param_delta",
    "replace_rows",
    "rounding_error",
]

_CONV_FNS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}

# Scratch `add_low_rank_` may use for a low-precision weight (two float32 chunks of W's rows, and
# never more than W's own bytes). On the benchmark CPU (1 MiB L2, 32 MiB L3) 2-4 MiB time alike;
# 512 KiB is ~1.4x and 256 KiB ~2x slower (more, smaller addmm_ calls).
MERGE_CHUNK_BYTES = 4 << 20


def block_diag_linear(x: torch.Tensor, weight: torch.Tensor, nblocks: int) -> torch.Tensor:
    """`x @ block_diag(W_1..W_n).T` without the zeros (BD-LoRA's factor; PEFT's einsum).

    Args:
        x: `[.., nblocks * m]`; block i reads features `i*m:(i+1)*m`.
        weight: `[nblocks * n, m]`: the blocks stacked by rows (PEFT's `BlockDiagonalLinear`).
        nblocks: The number of blocks.

    Returns:
        `[.., nblocks * n]`; block i of the output is `x_i @ W_i.T`.
    """
    # x: [.., nb, m];  W: [nb, n, m]  ->  [.., nb, n]
    blocks = x.reshape(*x.shape[:-1], nblocks, x.shape[-1] // nblocks)
    w = weight.reshape(nblocks, weight.shape[0] // nblocks, weight.shape[1])
    return torch.einsum("...im,inm->...in", blocks, w).flatten(-2)


def block_diag_matrix(weight: torch.Tensor, nblocks: int) -> torch.Tensor:
    """The full `[nblocks * n, nblocks * m]` matrix of stacked blocks `[nblocks * n, m]`."""
    return torch.block_diag(*weight.chunk(nblocks, dim=0))


def delta_weight(
    kind: str,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    *,
    transposed: bool = False,
    groups: int = 1,
) -> torch.Tensor:
    """`scale * B @ A` laid out like the base weight, computed in float32 (or float64 if given).

    Args:
        kind: `"linear"`, `"conv"` or `"embedding"`.
        lora_a: linear `[r, in]`; conv `[r, in, *k]`; embedding `[r, num_embeddings]`.
        lora_b: linear `[out, r]`; conv `[out, r // groups, 1, ...]`; embedding `[dim, r]`.
        scale: The branch scale (`alpha / r` or `alpha / sqrt(r)`).
        transposed: The base weight is stored `[in, out]` (transformers Conv1D, `addmm` sites).
        groups: Conv groups; grouped convs cannot be folded into one weight.

    Returns:
        The delta in the base weight's layout, float32 unless the inputs are float64.

    Raises:
        ValueError: A grouped conv (PEFT cannot merge these either) or an unknown kind.
    """
    dtype = torch.float64 if lora_a.dtype == torch.float64 else torch.float32
    a, b = lora_a.to(dtype), lora_b.to(dtype)
    if kind == "linear":
        delta = b @ a  # [out, r] @ [r, in] -> [out, in]
        return (delta.T if transposed else delta) * scale
    if kind == "embedding":
        return (b @ a).T * scale  # ([dim, r] @ [r, num]).T -> [num, dim]
    if kind == "conv":
        if groups > 1:
            raise ValueError(
                f"a conv with groups={groups} cannot be merged (its delta is not one weight)"
            )
        if all(k == 1 for k in a.shape[2:]):
            flat = b.flatten(1) @ a.flatten(1)  # [out, r] @ [r, in] -> [out, in]
            return flat.reshape(flat.shape + (1,) * (a.dim() - 2)) * scale
        # Compose the two convs: the 1x1 B mixes A's r output channels.
        conv = _CONV_FNS[a.dim() - 2]
        return conv(a.transpose(0, 1), b).transpose(0, 1) * scale
    raise ValueError(f"unknown site kind {kind!r}; expected 'linear', 'conv' or 'embedding'")


def param_delta(
    lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float, shape: tuple[int, ...]
) -> torch.Tensor:
    """PEFT's `ParamWrapper` delta for a parameter read directly by ops (`target_parameters`).

    Args:
        lora_a: `[r * E, in]`; rows are grouped by expert (`A.view(E, r, in)[e]` is expert e's A).
        lora_b: `[out, r * E]`; columns interleave experts (`B.view(out, r, E)[..., e]` is e's B).
        scale: The branch scale.
        shape: The parameter's shape: `[out, in]`, or `[E, out, in]` for E stacked experts
            (`[E, d1, d2]` storage reads as out = d1, in = d2, as PEFT's default).

    Returns:
        `scale * B @ A` (2-D) or `scale * B_e @ A_e` per expert (3-D), float32 unless inputs are
        float64, shaped like the parameter.
    """
    dtype = torch.float64 if lora_a.dtype == torch.float64 else torch.float32
    a, b = lora_a.to(dtype), lora_b.to(dtype)
    if len(shape) == 2:
        return (b @ a) * scale
    if len(shape) != 3:
        raise ValueError(f"target_parameters supports 2-D and 3-D parameters, got shape {shape}")
    experts = shape[0]
    a = a.reshape(experts, -1, a.shape[-1])  # [E, r, in]
    b = b.reshape(b.shape[0], -1, experts)  # [out, r, E]
    return torch.einsum("ore,eri->eoi", b, a) * scale


def replace_rows(
    weight: torch.Tensor, values: torch.Tensor, rows: tuple[int, ...] | list[int]
) -> torch.Tensor:
    """`weight` with `rows` replaced by `values` (PEFT's trainable tokens, `index_copy`).

    Args:
        weight: `[num, dim]` (an embedding table, or a tied output layer's weight).
        values: `[len(rows), dim]`; cast to `weight`'s dtype. Gradients reach `values` only at
            the rows; `weight` gets none there.
        rows: Distinct row indices.

    Returns:
        A new `[num, dim]` tensor; `weight` is not written.

    Example:
        >>> replace_rows(torch.zeros(3, 2), torch.ones(1, 2), [1])
        tensor([[0., 0.], [1., 1.], [0., 0.]])
    """
    index = torch.tensor(list(rows), dtype=torch.long, device=weight.device)
    return weight.index_copy(0, index, values.to(weight.dtype))


def rounding_error(before: torch.Tensor, after: torch.Tensor, delta: torch.Tensor) -> float:
    """Relative error of a folded delta: `||(after - before) - delta|| / ||delta||` (0 if none)."""
    applied = after.to(delta.dtype) - before.to(delta.dtype)
    norm = torch.linalg.vector_norm(delta)
    if norm == 0:
        return 0.0
    return float(torch.linalg.vector_norm(applied - delta) / norm)


def add_low_rank_(
    weight: torch.Tensor,
    left: torch.Tensor,
    right: torch.Tensor,
    alpha: float,
    *,
    chunk_bytes: int | None = None,
) -> float:
    """`weight += alpha * left @ right` in place, without a full-size temporary.

    The product is accumulated in float32 (float64 if any input is float64). A weight of that
    dtype is updated by one `addmm_` (no temporary at all). A lower-precision weight (bf16, fp16)
    is streamed in row chunks: chunk -> float32, `addmm_` in float32, rounded back once; so the
    delta is rounded once, not in B @ A and again in the add (as PEFT does with bf16 adapters).
    Scratch memory: `min(chunk_bytes, W's bytes)`.

    Args:
        weight: `[m, n]`, or `[E, m, n]` for E stacked weights (each gets its own factors).
        left: `[m, r]` (or `[E, m, r]`); any strides, e.g. `A.T`.
        right: `[r, n]` (or `[E, r, n]`).
        alpha: The scale; `-scale` takes a folded delta back out.
        chunk_bytes: Scratch memory for a low-precision weight (two float32 chunks of rows);
            default `MERGE_CHUNK_BYTES`.

    Returns:
        The rounding loss `||written - exact|| / ||alpha * left @ right||` (Frobenius norms),
        0.0 when the weight has the accumulation dtype or the delta is zero, and NaN when the
        delta is not finite (NaN or Inf in the factors: the weight was written with them).

    Example:
        >>> loss = add_low_rank_(linear.weight.data, lora_b, lora_a, scale)   # merge one linear
    """
    wide = torch.float64 in (weight.dtype, left.dtype, right.dtype)
    dtype = torch.float64 if wide else torch.float32
    left, right = left.to(dtype), right.to(dtype)
    add = torch.Tensor.baddbmm_ if weight.dim() == 3 else torch.Tensor.addmm_
    with torch.no_grad():
        if weight.dtype == dtype:
            add(weight, left, right, alpha=alpha)  # BLAS writes W in place: C <- C + alpha A @ B
            # Non-finite factors made a non-finite delta (two small reductions, no product).
            finite = bool(torch.isfinite(left).all()) and bool(torch.isfinite(right).all())
            return 0.0 if finite and math.isfinite(alpha) else math.nan
        # Chunk rows (dim -2): a chunk is [E, rows, n]. Two flat buffers in `dtype` serve all
        # chunks: the exact sum, and the written values read back (a same-dtype sub_ is ~1.5x
        # faster than subtracting the bf16 chunk directly, which casts it to a hidden temporary).
        limit = MERGE_CHUNK_BYTES if chunk_bytes is None else chunk_bytes
        limit = min(limit, weight.numel() * weight.element_size())  # never more than W itself
        row_numel = math.prod((*weight.shape[:-2], weight.shape[-1]))
        rows = max(1, min(weight.shape[-2], limit // (2 * row_numel * dtype.itemsize)))
        exact_buf, written_buf = weight.new_empty((2, row_numel * rows), dtype=dtype)
        err_sq = 0.0
        for start in range(0, weight.shape[-2], rows):
            part = weight[..., start : start + rows, :]
            exact = exact_buf[: part.numel()].view(part.shape)
            written = written_buf[: part.numel()].view(part.shape)
            exact.copy_(part)
            add(exact, left[..., start : start + rows, :], right, alpha=alpha)
            part.copy_(exact)  # round once, into W
            written.copy_(part)
            err_sq += float(torch.linalg.vector_norm(exact.sub_(written))) ** 2
    delta_sq = _low_rank_norm_sq(left, right) * alpha**2
    if not math.isfinite(delta_sq):
        return math.nan
    return (err_sq / delta_sq) ** 0.5 if delta_sq > 0 else 0.0


def _low_rank_norm_sq(left: torch.Tensor, right: torch.Tensor) -> float:
    """`||left @ right||^2` as trace((L^T L)(R R^T)): two r x r Grams, no [m, n] product."""
    left, right = left.double(), right.double()
    return float(((left.mT @ left) * (right @ right.mT)).sum())  # both Grams are symmetric


def pad_rank(
    kind: str, lora_a: torch.Tensor, lora_b: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad A's rows and B's columns up to `rank`; `B @ A` is unchanged.

    Args:
        kind: `"linear"`, `"conv"` or `"embedding"` (A's rank is dim 0, B's is dim 1 for all three).
        lora_a: A with rank `r <= rank` in dim 0.
        lora_b: B with rank `r` in dim 1.
        rank: The target rank.

    Returns:
        The padded `(A, B)`.
    """
    if kind not in ("linear", "conv", "embedding"):
        raise ValueError(f"unknown site kind {kind!r}; expected 'linear', 'conv' or 'embedding'")
    r = lora_a.shape[0]
    if r > rank:
        raise ValueError(f"cannot pad rank {r} down to {rank}")
    a = torch.cat([lora_a, lora_a.new_zeros((rank - r, *lora_a.shape[1:]))], dim=0)
    b_pad = lora_b.new_zeros((lora_b.shape[0], rank - r, *lora_b.shape[2:]))
    return a, torch.cat([lora_b, b_pad], dim=1)


def alpha_for_scale(scale: float, r: int, use_rslora: bool) -> float:
    """The `lora_alpha` that gives `scale` at rank `r` (`alpha / r`, or `alpha / sqrt(r)`)."""
    return scale * (r**0.5 if use_rslora else r)
