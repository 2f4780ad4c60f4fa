"""QALoRA's pooled input and the dense A it amounts to (PEFT's `QALoraLinearVariant`).

    pooled[..., j] = (in / g) * mean(x[..., j*g : (j+1)*g])     x: [..., in] -> [..., in / g]
    low = pooled A^T                                            A: [r, in / g]
        = x A_full^T,  A_full[:, k] = A[:, k // g] * (in / g) / g      (`expand_a`, for merges)

`g` is `qalora_group_size`; the factor `in / g` is PEFT's (`x_pooled * pooled_features`).
"""

from __future__ import annotations

import torch

__all__ = ["expand_a", "qalora_pool"]


def qalora_pool(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """`[..., in]` -> `[..., in / g]`: each group's mean times the number of groups (PEFT)."""
    groups = x.shape[-1] // group_size
    return x.unflatten(-1, (groups, group_size)).mean(dim=-1) * groups


def expand_a(a: torch.Tensor, group_size: int) -> torch.Tensor:
    """QALoRA's `A [r, in / g]` as the dense `[r, in]` factor with `x A_full^T = pool(x) A^T`."""
    groups = a.shape[-1]
    return a.repeat_interleave(group_size, dim=-1) * (groups / group_size)
