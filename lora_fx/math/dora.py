"""DoRA's tensor math (weight-decomposed LoRA): pure functions, tensors in, tensors out.

    delta = scale * B @ A                       (in the base weight's layout, `ops.delta_weight`)
    norm  = ||W + delta||  per output channel   (detached: a constant for autograd, as in the paper)
    g     = m / norm                            (m: the trained magnitude vector)
    y'    = y + (g - 1) * (W x) + g * scale * B(A(x))          = g * (W + delta) x  (+ bias)
    merge:    W' = g * (W + delta)          unmerge:  W = W' / g - delta  (the merge's norm kept)

Channels, as PEFT: linear `W[out, in]` -> one norm per row (`[in, out]` storage: per column),
shape `[out]`; conv `W[out, in, *k]` -> per output channel, shape `[1, out, 1, ...]`; embedding
`W[num, dim]` -> per embedding dimension (column), shape `[dim]`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lora_fx.math import ops

__all__ = [
    "base_output",
    "branch_norm",
    "channel_scale",
    "merged_weight",
    "unmerged_weight",
    "weight_norm",
]


def weight_norm(
    weight: torch.Tensor, delta: torch.Tensor, *, kind: str, transposed: bool = False
) -> torch.Tensor:
    """`||W + delta||` per output channel, in float32, shaped like PEFT's magnitude vector.

    Args:
        weight: The base weight (dense), in its stored layout.
        delta: `scale * B @ A` in the same layout (`ops.delta_weight`).
        kind: `"linear"`, `"conv"` or `"embedding"`.
        transposed: A linear weight stored `[in, out]` (transformers Conv1D, `addmm` sites).

    Returns:
        `[out]` (linear), `[1, out, 1, ...]` (conv) or `[dim]` (embedding).
    """
    w = weight.to(delta.dtype) + delta
    if kind == "linear":
        return torch.linalg.vector_norm(w, dim=0 if transposed else 1)
    if kind == "embedding":
        return torch.linalg.vector_norm(w, dim=0)
    if kind == "conv":
        dims = tuple(range(1, w.dim()))
        return torch.linalg.vector_norm(w, dim=dims, keepdim=True).transpose(0, 1)
    raise ValueError(f"DoRA has no weight norm for site kind {kind!r}")


def channel_scale(
    magnitude: torch.Tensor, norm: torch.Tensor, *, kind: str, transposed: bool = False
) -> torch.Tensor:
    """`g = m / norm`, shaped to broadcast over the base weight's layout."""
    g = magnitude.to(norm.dtype) / norm
    if kind == "linear":
        return g.reshape(1, -1) if transposed else g.reshape(-1, 1)
    if kind == "embedding":
        return g.reshape(1, -1)
    return g.reshape(-1, *([1] * (norm.dim() - 1)))  # conv: [1, out, 1, ..] -> [out, 1, 1, ..]


def merged_weight(
    weight: torch.Tensor,
    delta: torch.Tensor,
    magnitude: torch.Tensor,
    norm: torch.Tensor,
    *,
    kind: str,
    transposed: bool = False,
) -> torch.Tensor:
    """`W' = g * (W + delta)`, in float32 (the caller rounds to the weight's dtype)."""
    g = channel_scale(magnitude, norm, kind=kind, transposed=transposed)
    return g * (weight.to(delta.dtype) + delta)


def unmerged_weight(
    merged: torch.Tensor,
    delta: torch.Tensor,
    magnitude: torch.Tensor,
    norm: torch.Tensor,
    *,
    kind: str,
    transposed: bool = False,
) -> torch.Tensor:
    """`W = W' / g - delta`: the inverse of `merged_weight` given the norm it used."""
    g = channel_scale(magnitude, norm, kind=kind, transposed=transposed)
    return merged.to(delta.dtype) / g - delta


# ---------------------------------------------------------------- called from graph nodes


def branch_norm(
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    kind: str,
    transposed: bool = False,
) -> torch.Tensor:
    """The detached weight norm a DoRA branch divides by, in the adapter's dtype.

    A quantized base weight (bitsandbytes) is dequantized first. Nothing here takes part in
    autograd: DoRA treats the norm as a constant.
    """
    with torch.no_grad():
        a, b = lora_a.detach(), lora_b.detach()
        delta = ops.delta_weight(kind, a, b, scale, transposed=transposed)
        norm = weight_norm(_dense(weight), delta, kind=kind, transposed=transposed)
    return norm.to(lora_a.dtype)


def base_output(x: torch.Tensor, weight: torch.Tensor, transposed: bool = False) -> torch.Tensor:
    """`W x` without bias for a linear site (dequantizing a quantized W).

    DoRA's base term under dropout, where it must see the same dropped-out `x` as the LoRA branch
    (PEFT does the same).
    """
    w = _dense(weight).to(x.dtype)
    return F.linear(x, w.T if transposed else w)


def _dense(weight: torch.Tensor) -> torch.Tensor:
    """The weight itself, or its dequantized value for a bitsandbytes tensor."""
    from lora_fx.math import quant

    return quant.dequantize(weight) if quant.is_quantized(weight) else weight
