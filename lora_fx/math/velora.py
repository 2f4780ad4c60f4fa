"""VeLoRA's A projection: plain `linear` forward, compressed input activations for A's gradient.

    forward:   low = x A^T                                       (exact, as `lora_A(x)`)
    saved:     c[t, g] = <x_pad[t, g, :], v>                      x_pad: [tokens, groups, d]
    backward:  dA = dlow^T (scale * (c[..., None] * v).flat[:, :in])   (PEFT's approximation)
               dx = dlow A                                        (exact)

`v` is the `[d]` projection, `d = ceil(in / num_groups)`, kept unit-norm (PEFT's
`peft/tuners/lora/velora.py`, whose order of operations is followed here for the same numbers).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["group_dim", "mean_projection", "normalize_projection", "velora_linear"]


def group_dim(in_features: int, num_groups: int) -> int:
    """The projection's length: `ceil(in / num_groups)` features per group."""
    return (in_features + num_groups - 1) // num_groups


def _grouped(x: torch.Tensor, num_groups: int) -> torch.Tensor:
    """`[..., in]` -> `[tokens, groups, d]`, zero-padded to `groups * d` features."""
    d = group_dim(x.shape[-1], num_groups)
    if x.shape[-1] != num_groups * d:
        x = F.pad(x, (0, num_groups * d - x.shape[-1]))
    return x.reshape(-1, num_groups, d)


def normalize_projection(v: torch.Tensor) -> torch.Tensor:
    """`v / ||v||` in float32; an all-zero `v` becomes the normalised ones vector (PEFT)."""
    v = v.float()
    norm = torch.linalg.vector_norm(v)
    if norm == 0:
        v = torch.ones_like(v)
        norm = torch.linalg.vector_norm(v)
    return v / norm


def mean_projection(x: torch.Tensor, num_groups: int) -> torch.Tensor:
    """The unit-norm mean sub-token of a batch: PEFT's "batch_average" projection `[d]`."""
    sub = _grouped(x.detach(), num_groups)
    return normalize_projection(sub.reshape(-1, sub.shape[-1]).mean(dim=0))


class _VeloraLinear(torch.autograd.Function):
    """`x A^T` whose backward rebuilds x from its projection on `v` (PEFT's `VeloraFunction`)."""

    @staticmethod
    def forward(ctx, x, a, embed, num_groups, scale):
        ctx.x_shape, ctx.x_dtype, ctx.scale = tuple(x.shape), x.dtype, scale
        # c: [tokens, groups] = x_pad[t, g, :] . v
        compressed = torch.einsum("tgd,d->tg", _grouped(x, num_groups), embed.to(x.dtype))
        ctx.save_for_backward(compressed, a, embed)
        return F.linear(x, a)

    @staticmethod
    def backward(ctx, grad):
        compressed, a, embed = ctx.saved_tensors
        dtype = grad.dtype
        grad_2d = grad.reshape(-1, grad.shape[-1]).to(dtype)  # [tokens, r]
        grad_x = grad_a = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad_2d @ a.to(dtype)).reshape(ctx.x_shape).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            c, v = compressed.to(dtype), embed.to(dtype)
            rebuilt = (c.unsqueeze(-1) * v.view(1, 1, -1)).reshape(-1, c.shape[-1] * v.numel())
            rebuilt = rebuilt[:, : ctx.x_shape[-1]] * ctx.scale  # [tokens, in]
            grad_a = (grad_2d.transpose(0, 1) @ rebuilt).to(a.dtype)  # [r, in]
        return grad_x, grad_a, None, None, None


def velora_linear(
    x: torch.Tensor, a: torch.Tensor, embed: torch.Tensor | None, num_groups: int, scale: float
) -> torch.Tensor:
    """`x A^T`; with a projection `embed` (training), A's gradient is VeLoRA's approximation."""
    if embed is None:  # eval or no grad: PEFT's plain `lora_A(x)`
        return F.linear(x, a)
    return _VeloraLinear.apply(x, a, embed, num_groups, scale)
