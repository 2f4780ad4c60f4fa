"""Pure math for weighted adapters: several LoRA adapters in, one adapter's factors out.

Adapter i has factors `A_i [r_i, in]`, `B_i [out, r_i]`, scale `s_i` and user weight `w_i`; its
delta is `Δ_i = s_i · B_i @ A_i`. The new adapter has scale 1, so its delta is `B' @ A'`. PEFT's
`add_weighted_adapter` has three families, reproduced here op for op:

    factor types (equal ranks)   c_i = w_i · s_i
        A' = merge(sign(c_i) · sqrt|c_i| · A_i)      B' = merge(sqrt|c_i| · B_i)
        (the sign goes on one side only, so a negative weight subtracts)
    cat (exact)
        A' = [w_1 s_1 A_1; w_2 s_2 A_2; ...]          B' = [B_1, B_2, ...]       B'A' = Σ w_i Δ_i
    svd types (any ranks)
        Δ = merge(w_i · Δ_i);   U S Vh = svd(Δ);   B' = U[:, :r] · diag(S[:r]),  A' = Vh[:r]

where `merge` is one of the task-arithmetic merges of PEFT's `utils/merge_utils.py`:

    linear            Σ w_i t_i
    magnitude_prune   Σ w_i topk_density(|t_i|)                   (keep the largest entries)
    ties              mean of the entries of w_i topk(t_i) whose sign agrees with the majority
    dare_linear       Σ w_i (t_i ⊙ bernoulli(density)) / density  (random drop, rescaled)
    dare_ties         ties with DARE's random drop instead of topk

Rules:
1. The random masks of the DARE merges come from torch's global RNG (as in PEFT), one
   `bernoulli(full_like(t_i, density))` per task tensor, in order; `density >= 1` draws nothing.
2. Weights become a tensor of the default dtype before they multiply the task tensors (as in PEFT):
   factor types compute in the promoted dtype and return the factors' dtype.
3. `svd_factors` pads with zero rows/columns when the matrix has fewer singular values than `rank`
   (PEFT produces factors of the wrong shape there).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = [
    "MERGES",
    "SIGN_METHODS",
    "combine_factors",
    "concat_factors",
    "dare_linear",
    "dare_ties",
    "disjoint_merge",
    "magnitude_prune",
    "majority_sign_mask",
    "merge_tensors",
    "prune_magnitude",
    "prune_random",
    "svd_factors",
    "task_arithmetic",
    "ties",
    "to_matrix",
]

MERGES = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SIGN_METHODS = ("total", "frequency")


# ---------------------------------------------------------------- pruning and sign election


def prune_magnitude(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the `int(density * numel)` entries of largest magnitude, zero the rest.

    Args:
        tensor: Any shape.
        density: Fraction of entries to keep, in [0, 1]; `>= 1` returns `tensor` itself.

    Returns:
        The pruned tensor (same shape and dtype).
    """
    if density >= 1:
        return tensor
    mask = torch.zeros_like(tensor).reshape(-1)
    k = int(density * tensor.numel())
    mask[torch.topk(tensor.abs().reshape(-1), k=k, largest=True).indices] = 1
    return tensor * mask.reshape(tensor.shape)


def prune_random(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """DARE's drop: keep each entry with probability `density` (global RNG), rescale by 1/density.

    Args:
        tensor: Any shape.
        density: Keep probability, in (0, 1]; `>= 1` returns `tensor` itself and draws nothing.

    Returns:
        `tensor * mask / density`, so the expected value is `tensor`.
    """
    if density >= 1:
        return tensor
    mask = torch.bernoulli(torch.full_like(tensor, fill_value=density))
    return tensor * mask / density


def majority_sign_mask(stacked: torch.Tensor, method: str = "total") -> torch.Tensor:
    """Which entries of `stacked[i]` have the elected sign of their position (TIES' sign election).

    Args:
        stacked: Task tensors stacked on dim 0.
        method: `"total"` elects the sign of the sum, `"frequency"` the more frequent sign; a tie
            elects `+`.

    Returns:
        A bool tensor shaped like `stacked`.
    """
    sign = stacked.sign()
    if method == "total":
        votes = stacked.sum(dim=0)
    elif method == "frequency":
        votes = sign.sum(dim=0)
    else:
        raise ValueError(
            f"majority_sign_method={method!r} is invalid; expected one of {SIGN_METHODS}"
        )
    return sign == torch.where(votes >= 0, 1, -1)


def disjoint_merge(stacked: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over dim 0 of the entries `mask` keeps (positions nobody keeps give 0)."""
    kept = (stacked * mask).sum(dim=0)
    return kept / torch.clamp(mask.sum(dim=0), min=1.0)


# ---------------------------------------------------------------- task-arithmetic merges


def _weighted(stacked: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """`weights[i] * stacked[i]`, broadcasting the weights over the trailing dims."""
    return stacked * weights.view(weights.shape + (1,) * (stacked.dim() - weights.dim()))


def task_arithmetic(tensors: Sequence[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """`Σ w_i t_i`."""
    return _weighted(torch.stack(list(tensors)), weights).sum(dim=0)


def magnitude_prune(
    tensors: Sequence[torch.Tensor], weights: torch.Tensor, density: float
) -> torch.Tensor:
    """`Σ w_i prune_magnitude(t_i)`."""
    return task_arithmetic([prune_magnitude(t, density) for t in tensors], weights)


def ties(
    tensors: Sequence[torch.Tensor],
    weights: torch.Tensor,
    density: float,
    majority_sign_method: str = "total",
) -> torch.Tensor:
    """TIES: magnitude-prune each task, elect a sign per entry, average the agreeing entries."""
    stacked = torch.stack([prune_magnitude(t, density) for t in tensors])
    mask = majority_sign_mask(stacked, majority_sign_method)  # elected on the unweighted tensors
    return disjoint_merge(_weighted(stacked, weights), mask)


def dare_linear(
    tensors: Sequence[torch.Tensor], weights: torch.Tensor, density: float
) -> torch.Tensor:
    """`Σ w_i prune_random(t_i)`."""
    return task_arithmetic([prune_random(t, density) for t in tensors], weights)


def dare_ties(
    tensors: Sequence[torch.Tensor],
    weights: torch.Tensor,
    density: float,
    majority_sign_method: str = "total",
) -> torch.Tensor:
    """TIES with DARE's random drop (rescaled) instead of magnitude pruning."""
    stacked = torch.stack([prune_random(t, density) for t in tensors])
    mask = majority_sign_mask(stacked, majority_sign_method)
    return disjoint_merge(_weighted(stacked, weights), mask)


def merge_tensors(
    method: str,
    tensors: Sequence[torch.Tensor],
    weights: torch.Tensor,
    *,
    density: float | None = None,
    majority_sign_method: str = "total",
) -> torch.Tensor:
    """One task-arithmetic merge by name.

    Args:
        method: One of `MERGES`: linear, ties, dare_linear, dare_ties, magnitude_prune.
        tensors: Task tensors of one shape.
        weights: One weight per task tensor, `[n]`.
        density: Fraction kept by the pruning merges (all but `linear`).
        majority_sign_method: `"total"` or `"frequency"` (ties, dare_ties).

    Returns:
        The merged tensor, shaped like one task tensor, in the promoted dtype.

    Raises:
        ValueError: An unknown method, or a pruning merge without a density.
    """
    if method == "linear":
        return task_arithmetic(tensors, weights)
    if method not in MERGES:
        raise ValueError(f"unknown merge {method!r}; expected one of {MERGES}")
    if density is None:
        raise ValueError(f"merge {method!r} needs a density in [0, 1]")
    if method == "ties":
        return ties(tensors, weights, density, majority_sign_method)
    if method == "dare_linear":
        return dare_linear(tensors, weights, density)
    if method == "dare_ties":
        return dare_ties(tensors, weights, density, majority_sign_method)
    return magnitude_prune(tensors, weights, density)


# ---------------------------------------------------------------- adapters -> factors


def combine_factors(
    method: str,
    lora_as: Sequence[torch.Tensor],
    lora_bs: Sequence[torch.Tensor],
    weights: Sequence[float],
    scales: Sequence[float],
    *,
    density: float | None = None,
    majority_sign_method: str = "total",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge equal-rank factors: A' = merge(sign·sqrt|w s| · A_i), B' = merge(sqrt|w s| · B_i).

    For `linear` this makes `B'A' = Σ_ij sqrt|c_i c_j| sign(c_i) B_j A_i`: exact only for one
    adapter (or orthogonal factors); PEFT calls it a rough approximation.

    Args:
        method: One of `MERGES`.
        lora_as: `A_i`, one shape (linear `[r, in]`, conv `[r, in, *k]`, embedding `[r, num]`).
        lora_bs: `B_i`, one shape.
        weights: User weights `w_i` (may be negative).
        scales: Branch scales `s_i`.
        density: See `merge_tensors`.
        majority_sign_method: See `merge_tensors`.

    Returns:
        `(A', B')` in the dtype of the first A and B; the new adapter's scale is 1.
    """
    coefs = [w * s for w, s in zip(weights, scales, strict=True)]
    # sqrt on both sides so that B'A' carries c_i once; the sign on A only.
    weights_a = torch.tensor([math.sqrt(abs(c)) * (1 if c >= 0 else -1) for c in coefs])
    weights_b = torch.tensor([math.sqrt(abs(c)) for c in coefs])
    kw = {"density": density, "majority_sign_method": majority_sign_method}
    a = merge_tensors(method, lora_as, weights_a.to(lora_as[0].device), **kw)
    b = merge_tensors(method, lora_bs, weights_b.to(lora_bs[0].device), **kw)
    return a.to(lora_as[0].dtype), b.to(lora_as[0].dtype)


def concat_factors(
    lora_as: Sequence[torch.Tensor],
    lora_bs: Sequence[torch.Tensor],
    weights: Sequence[float],
    scales: Sequence[float],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack the ranks: A' = [w_i s_i A_i] on dim 0, B' = [B_i] on dim 1: B'A' = Σ w_i s_i B_i A_i.

    Args:
        lora_as: `A_i [r_i, in, ...]` (ranks may differ).
        lora_bs: `B_i [out, r_i, ...]`.
        weights: User weights `w_i`.
        scales: Branch scales `s_i`.

    Returns:
        `(A' [Σr_i, in, ...], B' [out, Σr_i, ...])`; the new adapter's scale is 1.
    """
    pairs = zip(lora_as, weights, scales, strict=True)
    return torch.cat([a * w * s for a, w, s in pairs], dim=0), torch.cat(list(lora_bs), dim=1)


def to_matrix(kind: str, delta: torch.Tensor, *, transposed: bool = False) -> torch.Tensor:
    """A delta in its base weight's layout -> the `[out, in]` matrix `B @ A` whose SVD gives B, A.

    Args:
        kind: `"linear"`, `"conv"` or `"embedding"`.
        delta: linear `[out, in]` (`[in, out]` if `transposed`); conv `[out, in, *k]`;
            embedding `[num, dim]`.
        transposed: A linear site stored `[in, out]` (Conv1D).

    Returns:
        linear `[out, in]`; conv `[out, in·prod(k)]`; embedding `[dim, num]`.
    """
    if kind == "conv":
        return delta.flatten(1)
    if kind == "embedding" or transposed:
        return delta.T
    return delta


def svd_factors(
    matrix: torch.Tensor,
    rank: int,
    *,
    clamp: float | None = None,
    full_matrices: bool = True,
    driver: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-`rank` factors of `matrix [out, in]`: B' = U_r·diag(S_r), A' = Vh_r.

    Args:
        matrix: `[out, in]`, float32 or float64 (torch has no half-precision SVD).
        rank: Rank of the factors.
        clamp: Quantile in [0, 1] of the (signed) entries of U_r·S_r and Vh_r; entries are clamped
            to `±quantile` (kohya's `svd_merge_lora`, e.g. 0.99). None: no clamping.
        full_matrices: Passed to `torch.linalg.svd` (the result does not depend on it).
        driver: cuSOLVER driver for CUDA tensors, passed to `torch.linalg.svd`.

    Returns:
        `(A' [rank, in], B' [out, rank])`; rows of A' and columns of B' beyond `min(out, in)` are 0.

    Raises:
        ValueError: `clamp` gives a negative bound (PEFT then sets every entry to that bound).
    """
    u, s, vh = torch.linalg.svd(matrix, full_matrices=full_matrices, driver=driver)
    k = min(rank, s.numel())
    b = u[:, :k] @ torch.diag(s[:k])  # [out, k]
    a = vh[:k, :]  # [k, in]
    if clamp is not None:
        hi = torch.quantile(torch.cat([b.flatten(), a.flatten()]), clamp)
        if hi < 0:  # clamp(-hi, hi) would then set every entry to hi (PEFT does, silently)
            raise ValueError(
                f"svd_clamp={clamp} is the quantile of the signed factor entries and gives a "
                f"negative bound {float(hi):.4g}; use a quantile near 1, e.g. 0.99"
            )
        b, a = b.clamp(-hi, hi), a.clamp(-hi, hi)
    if k < rank:  # pad: a rank-k matrix is also a rank-`rank` adapter with zero directions
        a = torch.cat([a, a.new_zeros(rank - k, a.shape[1])], dim=0)
        b = torch.cat([b, b.new_zeros(b.shape[0], rank - k)], dim=1)
    return a, b
