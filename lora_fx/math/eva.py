"""EVA's math: an incremental PCA of site inputs, and ranks shared out by explained variance.

    per batch X [n, in]:  PCA <- partial_fit(PCA, X)            (PEFT's `IncrementalPCA`, lowrank)
    converged_i  <-  cos(V_i, V_i_previous) >= tau               (per component i)
    ranks        <-  top `sum(r)` explained-variance ratios over all sites, <= round(r * rho) each
    lora_A       <-  V[:rank]   (/ sqrt(S[:rank]) with `whiten`)

The steps follow PEFT 0.21.2 (`peft/utils/incremental_pca.py`, `tuners/lora/eva.py`) operation by
operation, in the same dtypes, with the same seeded `torch.svd_lowrank` (seed 42, `q = 2k`, 4
iterations) and sign flip (each right singular vector's largest entry positive), so the components
are PEFT's bit for bit and sign-deterministic.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch

__all__ = ["Pca", "distribute_ranks", "pca_step", "similarity"]

_SEED = 42  # PEFT's `lowrank_seed`
_NITER = 4  # PEFT's `lowrank_niter`


@dataclass(frozen=True)
class Pca:
    """The running PCA of one input: the top components and the statistics to update them."""

    components: torch.Tensor  # [k, in]: right singular vectors, rows
    singular_values: torch.Tensor  # [k]
    explained_variance_ratio: torch.Tensor  # [k]
    mean: torch.Tensor  # [in], float64
    var: torch.Tensor  # [in], float64
    seen: torch.Tensor  # [1]: samples seen


def pca_step(pca: Pca | None, x: torch.Tensor, k: int) -> Pca:
    """One `partial_fit` of PEFT's `IncrementalPCA(n_components=k, lowrank=True)` on `x` [n, in].

    Returns:
        The updated PCA (`pca` is None on the first batch).
    """
    x = x.to(torch.float32).clone()
    n = x.shape[0]
    if pca is None:
        mean, var, total = _mean_and_var(x, None, None, torch.tensor([0], device=x.device))
    else:
        mean, var, total = _mean_and_var(x, pca.mean, pca.var, pca.seen)
    if pca is None:
        x -= mean
    else:
        batch_mean = torch.mean(x, dim=0)
        x -= batch_mean
        correction = torch.sqrt((pca.seen.double() / total) * n) * (pca.mean - batch_mean)
        x = torch.vstack((pca.singular_values.view(-1, 1) * pca.components, x, correction))
    with torch.random.fork_rng():  # PEFT's seeded draw, leaving the caller's RNG as it was
        torch.manual_seed(_SEED)
        _, s, v = torch.svd_lowrank(x, q=2 * k, niter=_NITER)
    vt = v.mH
    # sign flip on V (sklearn's svd_flip, u_based_decision=False): each row's largest |entry| > 0
    signs = torch.sign(vt[range(vt.shape[0]), torch.argmax(torch.abs(vt), dim=1)])
    vt = vt * signs.view(-1, 1)
    return Pca(
        components=vt[:k],
        singular_values=s[:k],
        explained_variance_ratio=(s**2 / torch.sum(var * total))[:k],
        mean=mean,
        var=var,
        seen=total,
    )


def similarity(pca: Pca, previous: Pca) -> torch.Tensor:
    """Per-component cosine similarity of two consecutive PCAs' components (EVA's convergence)."""
    return torch.nn.functional.cosine_similarity(pca.components, previous.components)


def distribute_ranks(
    ratios: dict[str, torch.Tensor], shared: dict[str, str], budget: int
) -> dict[str, int]:
    """PEFT's `_get_rank_distribution`: the `budget` largest variance ratios, counted per site.

    Args:
        ratios: Per measured site, its explained-variance ratios, already cut to its maximum rank.
        shared: Sites whose input another site measures: `{site: measuring site}`.
        budget: The total rank (the sum of the config's ranks).

    Returns:
        `{site: rank}` for every site, measured ones first (0 for a site that got none).
    """
    sites = {**{name: name for name in ratios}, **shared}
    keys, values = zip(*[(k, v) for k, name in sites.items() for v in ratios[name]], strict=True)
    order = torch.stack(values).argsort(descending=True)
    counts = Counter(keys[i] for i in order[:budget])
    ranks = {k: counts.get(k, 0) for k in sites}
    for site, measured in shared.items():  # the measuring site keeps the highest of equal inputs
        if ranks[measured] < ranks[site]:
            ranks[measured], ranks[site] = ranks[site], ranks[measured]
    return ranks


def _mean_and_var(
    x: torch.Tensor, mean: torch.Tensor | None, var: torch.Tensor | None, seen: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PEFT's `_incremental_mean_and_var` (float64 sums): the running mean, variance and count."""
    new_count = torch.tensor([x.shape[0]], device=x.device)
    total = seen + new_count
    last_sum = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
    if mean is not None:
        last_sum = mean * seen
    new_sum = x.sum(dim=0, dtype=torch.float64)
    new_mean = (last_sum + new_sum) / total
    centred = x - new_sum / new_count
    correction = centred.sum(dim=0, dtype=torch.float64).square()
    new_unnormalised = centred.square().sum(dim=0, dtype=torch.float64) - correction / new_count
    if var is None:
        return new_mean, new_unnormalised / total, total
    ratio = seen.double() / new_count
    unnormalised = (
        var * seen + new_unnormalised + ratio / total * (last_sum / ratio - new_sum).square()
    )
    return new_mean, unnormalised / total, total
