"""Adapter initialisations computed from the base weight: PiSSA, OLoRA, LoftQ, MiCA, orthogonal.

All work on linear sites, in the `[out, in]` layout (a weight stored `[in, out]` is transposed and
written back transposed), in float32, and follow PEFT's `LoraLayer.*_init` step by step:

    pissa          W = U S Vh;  S_r /= scale;  B = U_r sqrt(S_r),  A = sqrt(S_r) Vh_r;
                   W <- W - scale B A
    pissa_niter_K  the same from `torch.svd_lowrank(W, r, niter=K)` (randomised)
    olora          W = Q R;  B = Q[:, :r],  A = R[:r];  W <- W - scale B A
    loftq          K times: W_q = deQ(Q(W - B A)) and B, A = rank-r SVD of W - W_q;  W <- W_q
    mica           W = U S Vh;  B = U[:, -r:] (the r smallest directions),  A = 0;  B stays frozen
    orthogonal     one random orthogonal Q [r, r]: A uses its even rows, B its odd ones: B A = 0

**PiSSA, OLoRA and LoftQ change the base weight** (in place, so the captured model sees it too, as
with PEFT). PiSSA and OLoRA keep `W_new + scale * B @ A == W` up to float32 rounding. LoftQ
approximates `W` by a quantized `W_q` plus `B @ A`; like PEFT it ignores the scale, so
`W_q + scale * B @ A ≈ W` only with `lora_alpha == r` (a warning says so otherwise). LoftQ quantizes
with bitsandbytes (NF4: block 64, no double quant; int8: row-wise absmax), so `quantize(gm, "nf4",
compress_statistics=False)` afterwards stores exactly the codes LoftQ planned for. Orthogonal leaves
the base weight as it is, and so does MiCA (`A = 0`), whose B is frozen in training (PEFT's
`MiCALinearVariant`: only A trains).

Differences from PEFT: on transformers `Conv1D` (GPT-2) sites PEFT's OLoRA and LoftQ decompose the
stored `[in, out]` matrix and produce factors of the wrong shape; here they use `[out, in]`. PEFT's
LoftQ needs a CUDA / XPU device; here it runs on the weight's device.
"""

from __future__ import annotations

import torch

from lora_fx.math import quant

__all__ = [
    "BASE_CHANGING_INITS",
    "FROZEN_B_INITS",
    "changes_base",
    "kasa_truncate",
    "loftq",
    "mica",
    "olora",
    "orthogonal",
    "pissa",
]

BASE_CHANGING_INITS = ("pissa", "olora", "loftq", "corda", "lora_ga")  # and "pissa_niter_<K>"
FROZEN_B_INITS = ("mica",)  # B is fixed by the init; only A trains


def changes_base(init: bool | str) -> bool:
    """Whether an `init_lora_weights` value rewrites the base weight."""
    return isinstance(init, str) and (init in BASE_CHANGING_INITS or init.startswith("pissa"))


def pissa(
    weight: torch.Tensor, r: int, scale: float, *, niter: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PiSSA: the top-r singular triplets become the adapter, the rest stays in the base.

    Args:
        weight: `[out, in]`, float32.
        r: Rank.
        scale: The branch scale (`alpha / r`); the singular values are divided by it.
        niter: Use `torch.svd_lowrank` with this many subspace iterations (`pissa_niter_K`).

    Returns:
        `(residual W - scale B A, A [r, in], B [out, r])`.
    """
    if niter is None:
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)
        u_r, s_r, vh_r = u[:, :r], s[:r] / scale, vh[:r]
    else:
        u_r, s_r, v_r = torch.svd_lowrank(weight, r, niter=niter)
        s_r, vh_r = s_r / scale, v_r.t()
    a = torch.diag(torch.sqrt(s_r)) @ vh_r
    b = u_r @ torch.diag(torch.sqrt(s_r))
    return weight - scale * b @ a, a, b


def olora(
    weight: torch.Tensor, r: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """OLoRA: `W = Q R`; the adapter takes Q's first r columns and R's first r rows.

    Returns:
        `(residual W - scale B A, A = R[:r] [r, in], B = Q[:, :r] [out, r])`.
    """
    q, rr = torch.linalg.qr(weight)
    a, b = rr[:r].contiguous(), q[:, :r].contiguous()
    return weight - scale * b @ a, a, b


def loftq(
    weight: torch.Tensor, r: int, *, bits: int = 4, steps: int = 1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LoftQ: alternate quantizing the residual and a rank-r SVD of the quantization error.

    Args:
        weight: `[out, in]`, float32.
        r: Rank.
        bits: 4 (NF4, bitsandbytes, block 64, no double quant) or 8 (int8, row-wise absmax).
        steps: Alternating steps (`loftq_iter`).

    Returns:
        `(dequantized W_q, A [r, in], B [out, r])` with `W_q + B @ A ≈ W`.
    """
    bnbf = quant.requires_bitsandbytes().functional
    res = weight.clone()
    for i in range(steps):
        if bits == 4:
            packed, state = bnbf.quantize_4bit(
                res.contiguous(), blocksize=64, compress_statistics=False, quant_type="nf4"
            )
            dequantized = bnbf.dequantize_4bit(packed, state)
        else:
            rows, scales, _ = bnbf.int8_vectorwise_quant(res.contiguous().to(torch.float16))
            dequantized = bnbf.int8_vectorwise_dequant(rows, scales)
        res = weight - dequantized
        # PEFT's _low_rank_decomposition, step by step
        u, s, vh = torch.linalg.svd(res, full_matrices=False)
        left = u @ torch.sqrt(torch.diag(s)[:, 0:r])
        right = torch.sqrt(torch.diag(s)[0:r, :]) @ vh
        if i + 1 == steps:
            break
        res = weight - torch.mm(left, right)
    return dequantized, right, left


def mica(weight: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """MiCA: B spans the r minor left singular directions of W, A is zero (so `B @ A == 0`).

    Args:
        weight: `[out, in]`, float32.
        r: Rank.

    Returns:
        `(A = 0 [r, in], B = U[:, -r:] [out, r])`.
    """
    u, _, _ = torch.linalg.svd(weight, full_matrices=False)
    return torch.zeros(r, weight.shape[1], device=weight.device), u[:, -r:].contiguous()


def kasa_truncate(weight: torch.Tensor, r: int) -> torch.Tensor:
    """KaSA's base weight: W's rank-(k - r) SVD approximation, `k = min(out, in)` (PEFT's steps).

    Args:
        weight: `[out, in]`, float32.
        r: Rank of the adapter: this many of the smallest singular directions are dropped.

    Returns:
        `U[:, :k-r] diag(S[:k-r]) Vh[:k-r]`, float32 `[out, in]`.
    """
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    keep = min(weight.shape) - r
    return (u[:, :keep] * s[:keep]) @ vh[:keep]


def orthogonal(r: int, in_features: int, out_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's orthogonal init (same random draws in the same order): `B @ A == 0`.

    Returns:
        `(A [r, in], B [out, r])`.
    """
    q, _ = torch.linalg.qr(torch.randn(r, r))
    q_odd, q_even = q[0::2, :], q[1::2, :]  # orthogonal row sets: q_even @ q_odd.T == 0
    a = torch.randn(in_features, r // 2).mm(q_odd).T / 10.0
    b = torch.randn(r // 2, out_features).T.mm(q_even) / 10.0
    return a.contiguous(), b.contiguous()
