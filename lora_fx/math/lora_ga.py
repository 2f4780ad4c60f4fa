"""LoRA-GA's math: A, B and the residual weight from the SVD of a weight's averaged gradient.

    G = U S V^T  (torch.svd_lowrank, q = min(4r, min(out, in)), niter 4: randomized, global RNG)
    ArB2r: A = V^T[:r]        B = U[:, r:2r] S[r:2r]
    A2rBr: A = V^T[r:2r]      B = U[:, :r] S[:r]
    ArBr:  A = V^T[1:2r:2]    B = U[:, 0:2r:2] S[0:2r:2]
    random: r of the 2r indices (torch.randperm) for both
    stable: B *= out^0.25 / sqrt(gamma);  weight_svd: B *= s1(W) / S_B[0];
    gd_scale: A /= scale, B /= scale;  unit: as is
    W <- W - scale * B @ A   (A and B cast to the weight's dtype first)

The steps follow PEFT 0.21.2 (`LoraLayer.lora_ga_init`) operation by operation in float32, so A,
B and the residual equal PEFT's given the same random state.
"""

from __future__ import annotations

import torch

__all__ = ["lora_ga"]


def lora_ga(
    grad: torch.Tensor,
    weight: torch.Tensor,
    r: int,
    scale: float,
    *,
    direction: str = "ArB2r",
    scaling: str = "stable",
    stable_gamma: int = 16,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LoRA-GA from a weight `[out, in]` and its averaged loss gradient `[out, in]`.

    Args:
        grad: The gradient of the loss with respect to the weight, averaged over the calls.
        weight: The base weight, `[out, in]`, in its own dtype.
        r: Rank; the gradient's top `2 r` singular directions are used (`2 r <= min(out, in)`).
        scale: The branch's scale (`lora_alpha / r`).
        direction: `"ArB2r"`, `"A2rBr"`, `"ArBr"` or `"random"` (`LoraGAConfig.direction`).
        scaling: `"stable"`, `"weight_svd"`, `"gd_scale"` or `"unit"` (`LoraGAConfig.scale`).
        stable_gamma: The gamma of `"stable"`.

    Returns:
        `(residual, A, B)` in the weight's dtype: `residual + scale * B @ A` is `weight` to
        rounding.
    """
    grad = grad.float()
    u, s, v = torch.svd_lowrank(grad, q=min(4 * r, min(grad.shape)), niter=4)
    vh = v.t()  # [k, in]
    u, s, vh = u[:, : 2 * r], s[: 2 * r], vh[: 2 * r]
    if direction == "ArBr":
        a_idx, b_idx = slice(1, 2 * r, 2), slice(0, 2 * r, 2)
    elif direction == "A2rBr":
        a_idx, b_idx = slice(r, 2 * r), slice(0, r)
    elif direction == "ArB2r":
        a_idx, b_idx = slice(0, r), slice(r, 2 * r)
    else:  # "random": one draw for both
        a_idx = b_idx = torch.randperm(2 * r)[:r]
    a = vh[a_idx]  # [r, in]
    s_b = s[b_idx]
    b = u[:, b_idx] @ torch.diag(s_b)  # [out, r]
    if scaling == "stable":
        b = b * (weight.shape[0] ** 0.25 / stable_gamma**0.5)
    elif scaling == "weight_svd":
        _, weight_s, _ = torch.svd_lowrank(weight.float(), q=r, niter=4)
        if s_b[0] > 0:
            b = b * (weight_s[0] / s_b[0])
    elif scaling == "gd_scale":
        a, b = a / scale, b / scale
    a, b = a.to(weight.dtype), b.to(weight.dtype)
    # delta = scale * B @ A;  B: [out, r], A: [r, in]  (in float32, as PEFT's forward sees it)
    residual = (weight.float() - scale * (b.float() @ a.float())).to(weight.dtype)
    return residual, a.contiguous(), b.contiguous()
