"""What a site is: a matched base op (or several calls of one module) named by its PEFT path."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx

__all__ = ["ConvSpec", "Match", "Site"]


@dataclass(frozen=True)
class ConvSpec:
    """Geometry of a conv site; A reuses it, B is 1x1 with the site's groups."""

    dims: int
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...] | str
    dilation: tuple[int, ...]
    groups: int


@dataclass(frozen=True)
class Site:
    """A matched base op (or several calls of one module), named by its PEFT module path."""

    fqn: str
    kind: str  # "linear" | "conv" | "embedding" | "param"
    nodes: tuple[torch.fx.Node, ...]
    inputs: tuple[torch.fx.Node, ...]  # the branch input at each node (x, or the ids)
    weight: str  # attribute path of the base weight on gm
    bias: str | None
    in_features: int
    out_features: int
    transposed: bool = False  # base weight stored [in, out]
    conv: ConvSpec | None = None
    padding_idx: int | None = None
    experts: int = 1  # "param" sites: stacked experts in a 3-D parameter
    # Named by a site module (Linear, Embedding, Conv, Conv1D, subclasses): PEFT could wrap it.
    # A functional op on a parameter elsewhere (a router's F.linear) is a site by name only.
    module: bool = True


@dataclass(frozen=True)
class Match:
    """One node's match, before the matches with the same name are grouped into a Site."""

    fqn: str
    kind: str
    node: torch.fx.Node
    input: torch.fx.Node
    weight: str
    bias: str | None
    in_features: int
    out_features: int
    transposed: bool = False
    conv: ConvSpec | None = None
    padding_idx: int | None = None
    module: bool = True
