"""QALoRA on one site: A reads the input averaged over groups of `qalora_group_size` features.

    low = lora_A(x)   ->   low = linear(qalora_pool(dropout(x), g), A[r, in / g])

Rules:
1. `inject` checks that g divides the site's in_features (`sites/match.py`), then replaces A by a
   new `nn.Linear(in / g, r, bias=False)` drawn after A and B, as PEFT's variant `init` does: the
   same seed gives PEFT's tensors. The file keys stay `lora_A.weight` / `lora_B.weight`.
2. PEFT has QALoRA on GPTQ linears only; here any linear site takes it, dense or bitsandbytes
   (the branch reads x, never the base weight).
3. PEFT cannot merge QALoRA; here the delta is exact and dense, `scale * B @ expand_a(A, g)`
   (`math/qalora.py`), so merge, unmerge and merge_and_unload work as for plain LoRA.
"""

from __future__ import annotations

import torch.fx
from torch import nn

from lora_fx.core import graph as _graph
from lora_fx.core.state import SiteRecord
from lora_fx.sites import Site
from lora_fx.sites.kinds import lora_paths

__all__ = ["add_qalora", "qalora_shapes"]


def qalora_shapes(
    shapes: tuple[tuple[int, ...], ...], record: SiteRecord
) -> tuple[tuple[int, ...], ...]:
    """A's and B's stored shapes: QALoRA's A keeps `in / qalora_group_size` columns."""
    if not record.qalora_group_size:
        return shapes
    (rows, cols), rest = shapes[0], shapes[1:]
    return ((rows, cols // record.qalora_group_size), *rest)


def add_qalora(gm: torch.fx.GraphModule, site: Site, adapter: str, record: SiteRecord) -> None:
    """Replace A by PEFT's `nn.Linear(in / g, r, bias=False)` (rule 1)."""
    old = _graph.get_attr(gm, lora_paths(site.kind, site.fqn, adapter).a)
    columns = site.in_features // record.qalora_group_size
    new = nn.Linear(columns, record.r, bias=False, device=old.device, dtype=old.dtype)
    new.weight.requires_grad_(old.requires_grad)
    gm.get_submodule(f"{site.fqn}.lora_A")[adapter] = new
