"""Run calibration batches through a graph, with observers on chosen inputs (EVA, CorDA, LoRA-GA).

    x = <site input>   ->   x = <site input>;  observed.record("x", x)   (only inside `observing`)

Rules:
1. Batches are checked by form and key before anything runs (`check_batches`): a dict batch is
   passed by keyword, a tuple positionally, a tensor as the only input.
2. `observing` adds one `call_function` node after each distinct watched node, runs the graph in
   eval with active adapters disabled (PEFT measures the base model), and on exit, also when
   raising, erases the observers, recompiles, and restores the training flag and the adapters.
3. `inject_with_inits` is the apply step of an init that rewrites the base weight (CorDA,
   LoRA-GA): plain branches, then A, B and the residual, rolled back whole on failure.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.fx

from lora_fx.config import LoraConfig
from lora_fx.core import graph as _graph
from lora_fx.core.state import state_or_none
from lora_fx.errors import CalibrationError
from lora_fx.passes._base_init import write_init
from lora_fx.passes._rollback import rollback_on_error
from lora_fx.passes.adapters import disable_adapters
from lora_fx.passes.inject import inject
from lora_fx.sites import find_sites

__all__ = [
    "MASK_KEYS",
    "Observed",
    "check_batches",
    "graph_inputs",
    "inject_with_inits",
    "observing",
    "run_batch",
]

MASK_KEYS = ("attention_mask", "labels")  # accepted in dict batches; passed only if graph inputs


@dataclasses.dataclass
class Observed:
    """What the observer nodes recorded during one forward pass, for the watched inputs."""

    watching: set[str] = dataclasses.field(default_factory=set)
    seen: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)

    def record(self, name: str, x: torch.Tensor) -> None:
        """The observer node's target: keep `x` if its node is watched."""
        if name in self.watching:
            self.seen[name] = x.detach()


def check_batches(gm: torch.fx.GraphModule, batches: Any, init: str) -> list[Any]:
    """The batches as a list, each of a form the graph can take (checked by key, not by running)."""
    if batches is None:
        raise CalibrationError(
            f"init_lora_weights={init!r} needs calibration batches; pass an iterable of model "
            "inputs (dicts of keyword inputs, tuples of positional inputs, or tensors)"
        )
    if isinstance(batches, (torch.Tensor, dict)) or not isinstance(batches, Iterable):
        raise CalibrationError(
            f"batches must be an iterable of batches (e.g. a list or a DataLoader), got "
            f"{type(batches).__name__}; wrap a single batch in a list"
        )
    batches = list(batches)
    if not batches:
        raise CalibrationError(
            f"batches is empty; init_lora_weights={init!r} needs at least one calibration batch"
        )
    takes = graph_inputs(gm)
    for i, batch in enumerate(batches):
        if isinstance(batch, dict):
            unknown = sorted(set(batch) - set(takes) - set(MASK_KEYS))
            if unknown:
                raise CalibrationError(
                    f"batch {i} has keys {unknown} that are not inputs of the graph; it takes "
                    f"{takes} (plus {list(MASK_KEYS)} for the token mask)"
                )
            if not any(k in takes for k in batch):
                raise CalibrationError(
                    f"batch {i} (keys {sorted(batch)}) gives none of the graph's inputs {takes}"
                )
        elif isinstance(batch, (tuple, list)):
            if len(batch) > len(takes):
                raise CalibrationError(
                    f"batch {i} has {len(batch)} positional inputs; the graph takes {takes}"
                )
        elif not isinstance(batch, torch.Tensor):
            raise CalibrationError(
                f"batch {i} is a {type(batch).__name__}; expected a dict of keyword inputs, a "
                f"tuple of positional inputs or a tensor (the graph takes {takes})"
            )
    return batches


def graph_inputs(gm: torch.fx.GraphModule) -> list[str]:
    """The names the graph's `forward` takes."""
    return list(inspect.signature(gm.forward).parameters)


@contextlib.contextmanager
def observing(gm: torch.fx.GraphModule, nodes: Iterable[torch.fx.Node]) -> Iterator[Observed]:
    """Observers after `nodes` on the base graph in eval while inside; all undone on exit."""
    observed = Observed()
    state = state_or_none(gm)
    with contextlib.ExitStack() as stack:
        if state is not None and state.active:  # PEFT measures the base model (`disable_adapter`)
            stack.enter_context(disable_adapters(gm))
        added = []
        for node in dict.fromkeys(nodes):
            with gm.graph.inserting_after(node):
                added.append(gm.graph.call_function(observed.record, (node.name, node)))
        training = gm.training
        try:
            gm.recompile()
            gm.eval()
            yield observed
        finally:
            for node in added:
                gm.graph.erase_node(node)
            gm.recompile()
            gm.train(training)


def run_batch(
    gm: torch.fx.GraphModule, batch: Any, i: int, takes: list[str], *, grad: bool = False
) -> Any:
    """The output of one forward pass of batch `i` (without gradients unless `grad`).

    A batch that does not fit raises.
    """
    try:
        with torch.set_grad_enabled(grad):
            if isinstance(batch, dict):
                return gm(**{k: v for k, v in batch.items() if k in takes})
            if isinstance(batch, (tuple, list)):
                return gm(*batch)
            return gm(batch)
    except (TypeError, ValueError, RuntimeError, IndexError, KeyError) as e:
        raise CalibrationError(
            f"batch {i} does not fit the graph's inputs {takes}: {type(e).__name__}: {e}"
        ) from e


def inject_with_inits(
    gm: torch.fx.GraphModule,
    cfg: LoraConfig,
    plain: LoraConfig,
    adapter_name: str,
    inits: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    *,
    autocast_adapter_dtype: bool,
) -> None:
    """Inject `plain` branches, record `cfg`, and write each site's `(residual, A, B)`.

    All or nothing: a failure takes back the branches and every rewritten base weight.
    """
    with rollback_on_error(gm) as undo:
        inject(gm, plain, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)
        state_or_none(gm).adapters[adapter_name].config = cfg
        for site in find_sites(gm, plain):
            undo.keep(_graph.get_attr(gm, site.weight))
            new_w, a, b = inits[site.fqn]
            write_init(gm, site, adapter_name, a, b, new_w)
