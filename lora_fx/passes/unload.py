"""Remove adapters from the graph: `unload` (base weights as they were) and `merge_and_unload`.

    y' = y + scale * lora_B(lora_A(dropout(x)))   ->   y            (branch, A, B, dropout removed)

Rules:
1. `unload` on a graph with merged adapters unmerges them first (with a warning: the weights are
   then restored up to rounding, not bitwise). Without a merge, every base weight is bitwise
   untouched.
2. Trained `modules_to_save` copies replace their originals, and trained biases stay, as PEFT's
   `unload` does.
3. Afterwards the graph holds no lora_fx node, no LoRA parameter and no LoRA state.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable

import torch
import torch.fx

from lora_fx.core import graph as _graph
from lora_fx.core.keys import HOLDERS
from lora_fx.core.state import STATE_META, require_graph_module, require_state
from lora_fx.errors import LoraFxError, MergeError
from lora_fx.passes._branch import remove_branches
from lora_fx.passes._rollback import transactional
from lora_fx.passes.merge import merge, unmerge
from lora_fx.passes.quantize import dequantize as dequantize_pass

__all__ = ["merge_and_unload", "unload"]

log = logging.getLogger(__name__)


@transactional
def unload(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Remove every adapter without folding it, in place: the base graph comes back.

    Returns:
        The same GraphModule, recompiled, with no LoRA node, parameter or state.

    Raises:
        AdapterError: The graph has no adapter.

    Example:
        >>> gm = lora_fx.unload(gm)   # base weights bitwise as before inject
    """
    state = require_state(gm)
    if any(rec.merged for rec in state.adapters.values()):
        warnings.warn(
            "unload: merged adapters are unmerged first; base weights are restored up to rounding",
            stacklevel=2,
        )
        unmerge(gm)
    remove_branches(gm)
    sites = {fqn for record in state.adapters.values() for fqn in record.sites}
    for fqn in sites:
        for holder in HOLDERS:
            _graph.delete_attr(gm, f"{fqn}.{holder}")
        _graph.delete_if_empty(gm, fqn)  # a container lora_fx made (`<embedding>.token_adapter`)
    kept = _keep_trained_copies(
        gm, {p for rec in state.adapters.values() for p in rec.modules_to_save}
    )
    del gm.meta[STATE_META]
    _graph.cleanup(gm)
    log.info(
        "unload: %d adapters, %d sites, %d modules_to_save kept",
        len(state.adapters),
        len(sites),
        kept,
    )
    return gm


@transactional
def merge_and_unload(
    gm: torch.fx.GraphModule,
    safe_merge: bool = False,
    adapter_names: Iterable[str] | None = None,
    *,
    dequantize: bool = False,
) -> torch.fx.GraphModule:
    """Fold the adapters into the base weights, then remove every LoRA node and parameter, in place.

    Args:
        gm: A graph with adapters injected.
        safe_merge: As in `merge`: check merged weights are finite before writing them.
        adapter_names: Adapters to fold (default: the active ones); the others are dropped.
        dequantize: First turn quantized (bitsandbytes) base linears into full-precision ones
            (`lora_fx.dequantize`), so the merge is exact instead of re-quantized.

    Returns:
        The same GraphModule: a plain graph with zero LoRA overhead. `merge_report(gm)` still
        gives the merge's rounding loss per site.

    Raises:
        MergeError: A step failed; the message names the step ('dequantize', 'merge' or
            'unload').
        NotAGraphModuleError: `gm` is not a captured GraphModule.

    Example:
        >>> gm = lora_fx.merge_and_unload(gm)
    """
    require_graph_module(gm)  # a TypeError of its own, not wrapped as a step's MergeError
    if dequantize:
        try:
            dequantize_pass(gm)
        except LoraFxError as e:
            raise MergeError(f"merge_and_unload failed in step 'dequantize': {e}") from e
    with _graph.deferred_cleanup(gm):  # one recompile for both steps
        try:
            merge(gm, adapter_names, safe_merge=safe_merge)
        except LoraFxError as e:
            raise MergeError(f"merge_and_unload failed in step 'merge': {e}") from e
        state = require_state(gm)
        merged = {n for n, rec in state.adapters.items() if rec.merged}
        try:
            # The folded deltas stay in the weights: forget the merged adapters before unloading.
            for name in merged:
                state.adapters[name].merged = False
            unload(gm)
        except LoraFxError as e:
            msg = f"merge_and_unload failed in step 'unload' (after 'merge'): {e}"
            raise MergeError(msg) from e
    return gm


def _keep_trained_copies(gm: torch.fx.GraphModule, paths: set[str]) -> int:
    """Put each module's trained copy in its place and point the graph back at the original path."""
    kept = 0
    for path in sorted(paths):
        prefix = f"{path}.modules_to_save."
        users = [
            n
            for n in gm.graph.nodes
            if n.op in ("get_attr", "call_module") and n.target.startswith(prefix)
        ]
        if not users:
            continue
        adapter = users[0].target[len(prefix) :].split(".", 1)[0]
        copy_path = prefix + adapter
        trained = gm.get_submodule(copy_path)
        for node in users:
            node.target = path + node.target[len(copy_path) :]
        _graph.set_module(gm, path, trained)
        kept += 1
    return kept
