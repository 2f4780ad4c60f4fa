"""CorDA's math: input covariances, and A, B and the residual weight from the SVD of `W C`.

    per call, x [n, in]:  x <- x / |max(x)|;   C += x^T x;   C <- C / calls
    C' = C + damp * mean(diag C) * I       (damp = 0.01, doubled until ||C' C'^-1 - I|| < 0.05)
    W C' = U S Vh;   V = (Vh C'^-1)^T      (so U S V^T = W, the directions ordered by W's effect on
                                            the observed inputs)
    ipm: the first r triplets;  kpm: the last r (the largest stay in the base weight)
    S /= scale;  A = sqrt(S) V^T [r, in];  B = U sqrt(S) [out, r];  W <- W - scale * B @ A

The steps follow PEFT 0.21.2 (`peft/tuners/lora/corda.py`, `LoraLayer.corda_init`) operation by
operation in float32, so A, B and the residual equal PEFT's. PEFT normalises each call's input by
its *largest value* (not its largest magnitude), kept here.
"""

from __future__ import annotations

import torch

from lora_fx.errors import CalibrationError

__all__ = ["CORDA_METHODS", "corda", "input_covariance"]

CORDA_METHODS = ("ipm", "kpm")
_DAMP = 0.01  # PEFT's first damping of the covariance's diagonal
_INV_ERROR = 0.05  # PEFT's bound on ||C' C'^-1 - I||
_MAX_DOUBLINGS = 64  # PEFT doubles the damping forever; past this the covariance is hopeless


def input_covariance(x: torch.Tensor, *, float32: bool = True) -> torch.Tensor:
    """One call's `x^T x` `[in, in]` of PEFT's hook; `x` `[..., in]` is scaled by its max first."""
    x = x.detach().reshape(-1, x.shape[-1])  # PEFT's `squeeze(0)` of a `[1, s, in]` input
    if float32:
        x = x.float()
    x = x / torch.max(x).abs()
    return x.t().matmul(x)


def corda(
    weight: torch.Tensor, covariance: torch.Tensor, r: int, scale: float, method: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CorDA from a weight `[out, in]` and its inputs' mean covariance `[in, in]`.

    Args:
        weight: The float32 base weight, `[out, in]`.
        covariance: The site's summed `input_covariance` divided by the number of calls.
        r: Rank.
        scale: The branch's scale (`lora_alpha / r`).
        method: `"ipm"` (top r directions) or `"kpm"` (bottom r).

    Returns:
        `(residual, A, B)`: `residual + scale * B @ A` is `weight` to float32 rounding.

    Raises:
        CalibrationError: The covariance is not finite, or no damping makes it invertible.
    """
    cov = covariance.float()
    if not torch.isfinite(cov).all():
        raise CalibrationError("the input covariance has inf or nan values")
    n = cov.size(0)
    damp = _DAMP
    for _ in range(_MAX_DOUBLINGS):
        compensate = torch.diag(
            torch.ones(n, device=cov.device) * torch.mean(torch.diag(cov)) * damp
        )
        fixed = cov + compensate
        try:
            inv = torch.linalg.inv(fixed)
        except torch.linalg.LinAlgError as e:  # all-zero inputs: nothing to damp
            raise CalibrationError(
                f"the input covariance is singular ({e}); pass calibration batches with "
                "nonzero inputs"
            ) from e
        if torch.dist(fixed @ inv, torch.eye(n, device=cov.device)).item() < _INV_ERROR:
            break
        damp = damp * 2
    else:
        raise CalibrationError(
            f"the input covariance stays singular after damping it by up to {damp:g} x its mean "
            "diagonal; pass more, or more varied, calibration batches"
        )
    u, s, vh = torch.linalg.svd(weight @ fixed, full_matrices=False)
    v = (vh @ inv).transpose(0, 1)
    keep = slice(None, r) if method == "ipm" else slice(-r, None)
    u, s, v = u[:, keep], s[keep], v[:, keep]
    s = s / scale
    a = v.t().mul(s.sqrt().view(-1, 1)).contiguous()
    b = u.mul(s.sqrt()).contiguous()
    return weight - scale * b @ a, a, b
