"""Read-only views of the adapters on a graph: trainable parameters and PEFT's parameter report."""

from __future__ import annotations

import torch
import torch.fx
from torch import nn

__all__ = ["count_parameters", "print_trainable_parameters", "trainable_parameters"]


def trainable_parameters(gm: torch.fx.GraphModule) -> dict[str, nn.Parameter]:
    """The parameters that require grad, by name (what an optimizer should get).

    Example:
        >>> optimizer = torch.optim.AdamW(lora_fx.trainable_parameters(gm).values(), lr=1e-3)
    """
    return {name: p for name, p in gm.named_parameters() if p.requires_grad}


def count_parameters(gm: torch.fx.GraphModule) -> tuple[int, int]:
    """`(trainable, all)` parameter counts; a tied parameter counts once (as in PEFT)."""
    trainable = total = 0
    for _, param in gm.named_parameters():
        total += param.numel()
        trainable += param.numel() if param.requires_grad else 0
    return trainable, total


def print_trainable_parameters(gm: torch.fx.GraphModule) -> None:
    """Print `trainable params: N || all params: M || trainable%: P`, with PEFT's figures.

    Example:
        >>> lora_fx.print_trainable_parameters(gm)
        trainable params: 8,192 || all params: 172,736 || trainable%: 4.7425
    """
    trainable, total = count_parameters(gm)
    print(
        f"trainable params: {trainable:,d} || all params: {total:,d} || "
        f"trainable%: {100 * trainable / max(total, 1):.4f}"
    )
