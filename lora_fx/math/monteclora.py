"""MonteCLoRA's reparameterised A and its variational loss (PEFT's `tuners/lora/monteclora.py`).

One training forward, with the draws `z_mvn [n, in, r]`, `z_wishart [r, r]`, `z_dirichlet [n]`:

    S     = diag(clip(diag(D Z_w D^T), 1e-3)),  D = diag(exp(std_prior))  `wishart_covariance`
    noise = sample_scaler * z_mvn @ chol(S)                   [n, in, r]   `gaussian_noise`
    w     = softmax(chol(Sigma(alpha)) z_dir + mu(alpha)),  alpha = exp(prior)  `expert_weights`
    A'    = (sum_k w_k (A^T + noise_k))^T                     [r, in]      `perturbed_a`

Eval uses A itself (and merges fold plain LoRA's `B @ A`). The loss reads S and w of the last
forward: `kl_loss_weight * (KL_dir + KL_wishart + KL_mvn)` plus `sum(w^2)` with `use_entropy`.
The order of operations is PEFT's, for the same numbers.
"""

from __future__ import annotations

import torch

__all__ = [
    "expert_weights",
    "gaussian_noise",
    "perturbed_a",
    "variational_loss",
    "wishart_covariance",
]


def wishart_covariance(std_prior: torch.Tensor, z_wishart: torch.Tensor) -> torch.Tensor:
    """`diag(clip(diag(D Z D^T), 1e-3))`, `D = diag(exp(std_prior))`: the `[r, r]` covariance."""
    std = torch.diag(torch.exp(std_prior))
    covariance = std @ z_wishart @ std.T
    return torch.diag(torch.clip(covariance.diag(), min=1e-3))


def gaussian_noise(z_mvn: torch.Tensor, covariance: torch.Tensor, scaler: float) -> torch.Tensor:
    """`scaler * z_mvn @ chol(covariance)` (Cholesky in float32): the `[n, in, r]` noise on A^T."""
    lower = torch.linalg.cholesky(covariance.float()).to(covariance.dtype)
    noise = torch.nan_to_num(torch.einsum("eio,op->eip", z_mvn, lower), nan=1e-3)
    return scaler * noise


def expert_weights(prior: torch.Tensor, z_dirichlet: torch.Tensor) -> torch.Tensor:
    """The `[n]` sample weights: a softmax of PEFT's log-normal Dirichlet approximation."""
    eps, n = 1e-6, prior.shape[0]
    alpha = torch.clamp(torch.exp(prior), min=eps)
    mu = torch.log(alpha) - torch.log(alpha).mean()
    diag_term = 1 / alpha * (1 - 2 / n) + 1 / (n**2) * (1 / alpha).sum()
    sigma = torch.diag(torch.clamp(diag_term, min=eps))
    sigma = sigma + eps * torch.eye(n, device=prior.device)
    lower = torch.linalg.cholesky(sigma.float()).to(sigma.dtype)
    return torch.softmax(lower @ z_dirichlet + mu, dim=-1)


def perturbed_a(a: torch.Tensor, sample: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """`(sum_k w_k (A^T + noise_k))^T` for `sample = (noise, w)`; A itself when None (eval).

    A sample with a NaN leaves A as it is (PEFT warns and uses the base weights).
    """
    if sample is None:
        return a
    noise, weights = sample
    averaged = torch.einsum("n,nij->ij", weights, a.T + torch.nan_to_num(noise, nan=0.0))
    bad = torch.isnan(noise).any() | torch.isnan(weights).any()
    return torch.where(bad, a, averaged.T)


def variational_loss(
    std_prior: torch.Tensor,
    prior: torch.Tensor,
    covariance: torch.Tensor,
    weights: torch.Tensor,
    *,
    dirichlet_prior: float,
    kl_loss_weight: float,
    use_entropy: bool,
) -> torch.Tensor:
    """`kl_loss_weight * (KL_dir + KL_wishart + KL_mvn) [+ sum(w^2)]` (`get_variational_loss`).

    Args:
        std_prior: `[r]` log standard deviations.
        prior: `[n]` log Dirichlet concentrations (`expert_weights_prior`).
        covariance: `[r, r]` covariance of the last forward (`gaussian_var_prior`).
        weights: `[n]` sample weights of the last forward (`expert_weights`).
        dirichlet_prior: The Dirichlet prior's concentration.
        kl_loss_weight: Factor on the KL terms.
        use_entropy: Add the weights' squared sum.

    Returns:
        The scalar loss of one site.
    """
    n, r = prior.shape[0], std_prior.shape[0]
    alpha2 = torch.exp(prior)
    alpha1 = torch.tensor([dirichlet_prior] * n, device=prior.device)
    gamma = lambda x: torch.lgamma(x).exp()  # noqa: E731  (PEFT's custom_gamma)
    kl_dir = (
        torch.log(gamma(alpha2.sum()) / gamma(alpha1.sum()))
        + (torch.log(gamma(alpha2) / gamma(alpha1))).sum()
        + ((alpha2 - alpha1) * (torch.digamma(alpha2) - torch.digamma(alpha2.sum()))).sum()
    )
    std = torch.diag(torch.exp(std_prior))
    var = torch.diag((std @ std.T).diag())
    kl_wishart = 0.5 * (-torch.log(var).trace() * r + var.trace() * r - r**2)
    clamped = torch.clamp(covariance, min=1e-6)
    kl_mvn = n * 0.5 * (clamped.trace() - torch.log(clamped).trace() - r)
    loss = kl_loss_weight * (kl_dir + kl_wishart + kl_mvn)
    return loss + (weights**2).sum() if use_entropy else loss
