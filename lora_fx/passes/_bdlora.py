"""BD-LoRA on one site: A or B stored as `nblocks` diagonal blocks (PEFT's `BdLoraLinearVariant`).

    block-diagonal A:  A [r, in / nb]    low = block_diag_linear(x, A, nb)     (x: nb slices)
    block-diagonal B:  B [out, r / nb]   up  = block_diag_linear(low, B, nb)
    delta = scale * block_diag(B) @ block_diag(A)      (merge / unmerge, `_fold.py`)

Rules:
1. Which factor: `use_bdlora.target_modules_bd_a` / `_bd_b` patterns matched as *substrings* of
   the site name (PEFT's `pattern in target_name`, unlike `target_modules`), `SiteRecord`.
2. Run after A and B are initialised, as PEFT's variant `init` runs after
   `reset_lora_parameters`: a block-diagonal A is then drawn again with `kaiming_uniform_`
   (PEFT's defaults, a=0, fan_in = in / nb), a block-diagonal B is zero, whatever
   `init_lora_weights` says; the same seed gives PEFT's tensors.
3. The blocks replace the factor's weight at the same path, so the file keys are plain LoRA's
   (`<site>.lora_A.weight`) with PEFT's block shapes.
"""

from __future__ import annotations

import torch
import torch.fx
from torch import nn

from lora_fx.core import graph as _graph
from lora_fx.core.state import SiteRecord
from lora_fx.sites import Site
from lora_fx.sites.kinds import lora_paths

__all__ = ["add_block_diagonal", "block_shapes"]


def block_shapes(
    shapes: tuple[tuple[int, ...], ...], record: SiteRecord
) -> tuple[tuple[int, ...], ...]:
    """A's and B's stored shapes: the block-diagonal one keeps `columns / nblocks` (rule 3)."""
    index = "ab".find(record.block_diagonal) if record.block_diagonal else -1
    if index < 0:
        return shapes
    rows, cols = shapes[index]
    blocked = (rows, cols // record.nblocks)
    return (blocked, shapes[1]) if index == 0 else (shapes[0], blocked)


def add_block_diagonal(
    gm: torch.fx.GraphModule, site: Site, adapter: str, record: SiteRecord
) -> None:
    """Replace A (kaiming) or B (zeros) by its `nblocks` stacked blocks (rule 2)."""
    paths = lora_paths(site.kind, site.fqn, adapter)
    path = paths.a if record.block_diagonal == "a" else paths.b
    old = _graph.get_attr(gm, path)
    rows, cols = old.shape
    weight = torch.empty(rows, cols // record.nblocks, dtype=old.dtype, device=old.device)
    if record.block_diagonal == "a":
        nn.init.kaiming_uniform_(weight)
    else:
        nn.init.zeros_(weight)
    holder = gm.get_submodule(path.rsplit(".", 1)[0])
    holder.weight = nn.Parameter(weight, requires_grad=old.requires_grad)
