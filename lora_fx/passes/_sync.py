"""The one sync point: everything graph-side is derived from the `LoraState` record.

    state.active = ["a", "b"]  ->  y' = y + branch_a(x) + branch_b(x)   (inactive ones: no nodes)

Every pass is: check (raise before touching anything) -> change the state -> `sync(gm)`.

Rules:
1. Every switch rebuilds all branches: remove every lora_fx branch, then insert those of the active,
   unmerged adapters in the order given, so the sum order is PEFT's (its `active_adapters` order).
2. In mixed-batch mode (`state.batch_adapters`, the slot table) each batch row gathers its slot's
   adapter from per-site stacks (`_gather.py`). The graph is rebuilt only when its layout key
   changes; otherwise sync writes the stack buffers' values and leaves the code as it is, so a
   compiled graph is reused (adapters loaded into or deleted from slots: no recompile).
3. Branches take `state.layout` ("auto" unless `set_layout` chose another; `_branch.py` rule 7).
4. Graph references to a `modules_to_save` module point at the copy of the first active adapter
   that has one, else at the original module (also for a copy whose adapter is being deleted).
5. `_set_trainable` is the one trainability rule: an adapter's tensors (A, B, B's bias, DoRA's
   magnitude; not VeLoRA's projection buffers) and its `modules_to_save` copies require grad
   exactly when it is active (PEFT's `set_adapter`, and its disabled adapters); base parameters
   are left as they are.
6. `sync` = branches and module copies (rules 1-4), trainability (rule 5), then dead code
   elimination, lint and recompile. Sites are matched once per sync.
"""

from __future__ import annotations

import torch
import torch.fx

from lora_fx.core import graph as _graph
from lora_fx.core.keys import BUFFER_HOLDERS, HOLDERS, modules_to_save_path
from lora_fx.core.state import LORA_META, LoraState, get_state
from lora_fx.math.inits import FROZEN_B_INITS
from lora_fx.passes._branch import insert_branch, remove_branches
from lora_fx.passes._emit import point_module_copies
from lora_fx.passes._gather import INDEX_BUFFER, emit_batch, layout_key, site_ranks, write_slots
from lora_fx.sites import all_sites

__all__ = ["check_batch_rows", "sync"]


def sync(gm: torch.fx.GraphModule) -> None:
    """Derive branches, module-copy references and `requires_grad` from the state; recompile."""
    state = get_state(gm)
    if state.batch_adapters is not None:
        # Deleted adapters free their slots (zeroed below); a new adapter takes none until a
        # batch names it.
        slots = state.batch_adapters
        freed = [k for k, n in enumerate(slots) if n is not None and n not in state.adapters]
        state.batch_adapters = [n if n in state.adapters else None for n in slots]
        sites = all_sites(gm)
        ranks = site_ranks(state, sites, gm)
        key = layout_key(state, ranks)
        if key == state.batch_key:  # rule 2: same layout, new values only
            write_slots(gm, state, ranks, freed)
            _set_trainable(gm, state)
            return
    _rebuild_branches(gm, state)
    if state.batch_adapters is not None:
        state.batch_key = key
        write_slots(gm, state, ranks)
    _set_trainable(gm, state)
    _graph.cleanup(gm)


def _rebuild_branches(gm: torch.fx.GraphModule, state: LoraState) -> None:
    """Branches of the active adapters (rules 1-3) and module-copy references (rule 4)."""
    remove_branches(gm)
    sites = all_sites(gm)
    if state.batch_adapters is not None:
        _insert_batch_check(gm)
        emit_batch(gm, state, sites, site_ranks(state, sites, gm))
    else:
        for name in state.active:
            if not state.adapters[name].merged:
                for fqn, rec in state.adapters[name].sites.items():
                    insert_branch(gm, sites[fqn], name, rec, layout=state.layout)
    point_module_copies(gm.graph, state, state.active)


def _set_trainable(gm: torch.fx.GraphModule, state: LoraState) -> None:
    """Active adapters' tensors and module copies require grad; inactive ones are frozen."""
    slots = state.batch_adapters if state.batch_training else None
    for name, record in state.adapters.items():
        on = name in (slots or state.active)
        # MiCA's B is fixed by its init (PEFT's `frozen_peft_weight_names`): only A trains
        frozen = ("lora_B",) if record.config.init_lora_weights in FROZEN_B_INITS else ()
        for fqn in record.sites:
            children = gm.get_submodule(fqn)._modules
            for holder in HOLDERS:  # A, B (and B's bias), DoRA's magnitude: whatever this site has
                if holder in BUFFER_HOLDERS:  # VeLoRA's projection is a buffer: never trained
                    continue
                container = children.get(holder)
                if container is not None and name in container:
                    container[name].requires_grad_(on and holder not in frozen)
        for path in record.modules_to_save:
            gm.get_submodule(modules_to_save_path(path, name)).requires_grad_(on)


def check_batch_rows(index: torch.Tensor, first_input: torch.Tensor) -> None:
    """Fail loudly when the batch and the per-row adapter list differ in length (PEFT raises too).

    Without it a batch that is a multiple of the list would silently reuse rows' adapters.
    """
    torch._check(
        first_input.shape[0] == index.shape[0],
        lambda: "mixed batch: the batch and the adapter name list differ in length",
    )


def _insert_batch_check(gm: torch.fx.GraphModule) -> None:
    """A check node after the first used input: its batch size must equal the index's length."""
    first = next((n for n in gm.graph.nodes if n.op == "placeholder" and n.users), None)
    if first is None:
        return
    with gm.graph.inserting_after(first):
        mask = gm.graph.get_attr(INDEX_BUFFER)
    with gm.graph.inserting_after(mask):
        check = gm.graph.call_function(check_batch_rows, (mask, first))
    for node in (mask, check):
        node.meta[LORA_META] = {"adapter": "", "site": "", "role": "mask"}
