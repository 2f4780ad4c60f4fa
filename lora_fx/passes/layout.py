"""Choose how the graph lays out its LoRA branches (outputs and gradients stay the same).

    "auto"   (default)  per call: "fused" in training and for few tokens, "weight" for
                        inference calls with many tokens (`fused_ops.weight_pays`)
    "fused"             y' = addmm(y, A(x), B.T, alpha=scale)       one op after A, no temporaries
    "plain"             y' = y + linear(A(x), B) * scale             PEFT's three ops
    "weight"            y' = site(x, W + scale * B @ A)              the delta added to W per call

Rules:
1. The layout is kept in the graph state and every later rebuild of the branches (set_adapter,
   unmerge, mixed batches) uses it.
2. Every layout computes the same function with the same parameters: saved adapters, hot-swap and
   merge do not depend on it. Results differ only by float rounding.
3. "weight" does `2 * r * in * out` extra FLOPs per call instead of `2 * r * tokens * (in + out)`:
   faster for inference on many tokens, but in training autograd then forms the full-size
   gradient of `W + delta` (one more matmul per site), so train with "fused" or "auto". Sites it
   cannot serve keep "fused" (`_branch.py` rule 7).
4. "auto" decides per call from the token count and whether autograd records, so one graph
   serves a training step, a prefill and a decode step at their best; under torch.compile the
   token test is a shape guard (a graph compiled for decode is not reused for a long prefill).
"""

from __future__ import annotations

import logging

import torch.fx

from lora_fx.core.state import require_state
from lora_fx.passes._branch import LAYOUTS
from lora_fx.passes._rollback import transactional
from lora_fx.passes._sync import sync

__all__ = ["LAYOUTS", "get_layout", "set_layout"]

log = logging.getLogger(__name__)


@transactional
def set_layout(gm: torch.fx.GraphModule, layout: str) -> torch.fx.GraphModule:
    """Rebuild the LoRA branches of `gm` in `layout`, in place ("auto", "fused", "plain", "weight").

    Raises:
        ValueError: `layout` is not one of LAYOUTS.
        AdapterError: nothing was injected into `gm`, or it is checkpointed.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is invalid; expected one of {list(LAYOUTS)}")
    state = require_state(gm)
    if state.layout == layout:
        return gm
    state.layout = layout
    sync(gm)
    log.info("set_layout: %r", layout)
    return gm


def get_layout(gm: torch.fx.GraphModule) -> str:
    """The branch layout of `gm` ("auto" unless `set_layout` chose another)."""
    return require_state(gm).layout
