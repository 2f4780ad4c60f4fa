"""Arrow: per-token routing among LoRA experts (PEFT's `ArrowLoraLinearLayer`), as tensor math.

    p_e   = top right singular vector of B_e @ A_e                 (power iteration, [in])
    c     = softmax(topk_mask(|x @ P^T|) / T)                       [..., E], 0 off the top k
    delta = sum_e c_e * s_e * B_e @ A_e @ x                         [..., out]

GenKnowSub (`use_gks`) first subtracts the mean of the general adapters' A and B from every
task expert's A and B (`general_knowledge_mean`). Tensors in, tensors out; the routing is plain
differentiable ops (matmul, abs, topk, scatter, softmax, einsum), so torch.compile and
torch.export see ordinary ops.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lora_fx.math.stack import stack_adapters

__all__ = [
    "arrow_coefficients",
    "arrow_delta",
    "arrow_prototypes",
    "general_knowledge_mean",
    "top_right_singular_vector",
]

# PEFT's power iteration: 15 steps from a unit-norm randn start, eps in the norms.
_ITERS = 15
_EPS = 1e-8


def top_right_singular_vector(
    a: torch.Tensor, b: torch.Tensor, seed: int | None = None
) -> torch.Tensor:
    """The top right singular vector of `B @ A` in float32, without forming `B @ A` (PEFT's).

    Power iteration on `v -> A^T (B^T B) (A v)`; the start is `randn(in)` from a generator seeded
    with `seed` on A's device (None: the global generator), so a seed gives PEFT's vector.
    The sign is arbitrary: routing uses `|x @ v|`.

    Args:
        a: A `[r, in]`.
        b: B `[out, r]`.
        seed: Seed of the start vector, or None.

    Returns:
        `[in]` float32, unit norm.
    """
    a32, b32 = a.detach().float(), b.detach().float()
    gram = b32.T @ b32  # [r, r]
    generator = None
    if seed is not None:
        generator = torch.Generator(device=a32.device.type)
        generator.manual_seed(int(seed))
    v = torch.randn(a32.shape[1], dtype=a32.dtype, device=a32.device, generator=generator)
    v = v / (v.norm() + _EPS)
    for _ in range(_ITERS):
        w = a32.T @ (gram @ (a32 @ v))
        v = w / (w.norm() + _EPS)
    return v


def arrow_prototypes(
    lora_as: Sequence[torch.Tensor], lora_bs: Sequence[torch.Tensor], seed: int | None = None
) -> torch.Tensor:
    """One prototype per expert, `[E, in]` in the first A's dtype (PEFT's `build_prototypes`)."""
    pairs = zip(lora_as, lora_bs, strict=True)
    return torch.stack([top_right_singular_vector(a, b, seed).to(a.dtype) for a, b in pairs])


def general_knowledge_mean(
    lora_as: Sequence[torch.Tensor], lora_bs: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """GenKnowSub's mean A `[r, in]` and mean B `[out, r]` of the general adapters."""
    return torch.stack(list(lora_as)).mean(0), torch.stack(list(lora_bs)).mean(0)


def arrow_coefficients(
    x: torch.Tensor, prototypes: torch.Tensor, top_k: int, temperature: float
) -> torch.Tensor:
    """Per-token expert weights `[..., E]`: softmax over the top-k `|x @ p_e|`, 0 elsewhere.

    Args:
        x: Tokens `[..., in]`.
        prototypes: `[E, in]`.
        top_k: Experts kept per token (`<= E`).
        temperature: Softmax temperature.

    Returns:
        `[..., E]`, each token's weights sum to 1.
    """
    sim = torch.abs(x @ prototypes.T)  # [..., E], sign-agnostic
    top, idx = torch.topk(sim, top_k, dim=-1)
    scores = torch.full_like(sim, float("-inf")).scatter(-1, idx, top)
    return torch.softmax(scores / temperature, dim=-1)


def arrow_delta(
    x: torch.Tensor,
    coefficients: torch.Tensor,
    lora_as: Sequence[torch.Tensor],
    lora_bs: Sequence[torch.Tensor],
    scales: Sequence[float],
) -> torch.Tensor:
    """`sum_e c_e * s_e * B_e A_e x`: the experts' outputs weighted per token, `[..., out]`.

    The experts are stacked (`stack.stack_adapters`: A `[E, r, in]`, scale * B `[E, out, r]`);
    the weights act on the rank-r activations, so no `[..., E, out]` tensor is formed.
    """
    a, b = stack_adapters(lora_as, lora_bs, scales, lora_as[0].shape[0])
    low = torch.einsum("...f,erf->...er", x, a)  # [..., E, r]
    return torch.einsum("...er,eor->...o", low * coefficients.unsqueeze(-1), b)
