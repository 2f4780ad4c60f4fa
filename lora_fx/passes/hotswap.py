"""Hot-swap adapter weights into an existing slot, leaving the graph untouched (no recompile).

    slot (rank R, scale s):   A <- pad(A_new),   B <- pad(B_new) * (s_new / s)

Rules:
1. Only parameter values change, in place: the graph code is not regenerated, so a `torch.compile`d
   graph runs the new adapter without recompiling (PEFT's `hotswap_adapter`).
2. The branch scale is a constant in the graph, so a different `lora_alpha` (or rsLoRA, or rank) is
   folded into B. A smaller rank is zero-padded (`B @ A` unchanged).
3. A larger rank needs `prepare_for_hotswap(gm, target_rank)` first, before compiling: it pads every
   slot to that rank (new parameter objects) and records the equivalent `lora_alpha`, so saving the
   slot still writes a valid PEFT adapter.
4. The file must target exactly the slot's sites (and `modules_to_save`); everything is checked
   before anything is written.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import torch
import torch.fx
from torch import nn

from lora_fx.core import graph as _graph
from lora_fx.core.files import read_adapter
from lora_fx.core.keys import FILE_PREFIX, is_adapter_parameter, modules_to_save_path
from lora_fx.core.state import LoraState, require_no_tokens, require_state, resolve_adapters
from lora_fx.errors import AdapterError
from lora_fx.math import ops
from lora_fx.passes._gather import refresh_adapter
from lora_fx.passes._rollback import transactional
from lora_fx.sites import find_sites
from lora_fx.sites.kinds import lora_paths

__all__ = ["hotswap_adapter", "prepare_for_hotswap"]

log = logging.getLogger(__name__)


@transactional
def prepare_for_hotswap(
    gm: torch.fx.GraphModule, target_rank: int, adapter_names: list[str] | None = None
) -> torch.fx.GraphModule:
    """Pad adapter slots to `target_rank` so later hot-swaps of any rank up to it never recompile.

    Call it before `torch.compile`. Outputs are unchanged (zero padding).

    Args:
        gm: A graph with adapters.
        target_rank: The largest rank you will hot-swap in.
        adapter_names: Slots to prepare (default: every adapter).

    Returns:
        The same GraphModule.

    Raises:
        AdapterError: A slot already has a larger rank, is merged, or is a grouped conv.

    Example:
        >>> lora_fx.prepare_for_hotswap(gm, target_rank=64)
        >>> compiled = torch.compile(gm)
    """
    state = require_state(gm)
    names = (
        list(state.adapters) if adapter_names is None else resolve_adapters(state, adapter_names)
    )
    require_no_tokens(state, names, "prepare_for_hotswap")
    for name in names:
        record = state.adapters[name]
        if record.merged:
            raise AdapterError(f"adapter {name!r} is merged; unmerge it before preparing hot-swap")
        too_big = {fqn: rec.r for fqn, rec in record.sites.items() if rec.r > target_rank}
        if too_big:
            raise AdapterError(
                f"adapter {name!r} has ranks above target_rank={target_rank}: {too_big}"
            )
    for name in names:
        record = state.adapters[name]
        rslora = record.config.use_rslora
        for fqn, rec in record.sites.items():
            if rec.r == target_rank:
                continue
            paths = lora_paths(rec.kind, fqn, name)
            a, b = _graph.get_attr(gm, paths.a), _graph.get_attr(gm, paths.b)
            new_a, new_b = ops.pad_rank(rec.kind, a.detach(), b.detach(), target_rank)
            _replace_parameter(gm, paths.a, new_a, a.requires_grad)
            _replace_parameter(gm, paths.b, new_b, b.requires_grad)
            alpha = ops.alpha_for_scale(rec.scale, target_rank, rslora)
            record.sites[fqn] = dataclasses.replace(rec, r=target_rank, lora_alpha=alpha)
    _graph.cleanup(gm)
    log.info("prepare_for_hotswap: %s padded to rank %d", names, target_rank)
    return gm


def hotswap_adapter(
    gm: torch.fx.GraphModule, path: str | os.PathLike, adapter_name: str = "default"
) -> torch.fx.GraphModule:
    """Write a PEFT adapter folder's weights into the existing slot `adapter_name`, in place.

    Args:
        gm: A graph holding the slot (possibly compiled by the caller).
        path: A PEFT adapter folder (or diffusers file) targeting the same sites.
        adapter_name: The slot to overwrite.

    Returns:
        The same GraphModule; its graph and code are not changed.

    Raises:
        AdapterError: No such slot, a merged slot, different targets, a rank above the slot's, or
            missing/mis-shaped tensors. Nothing is written then.

    Example:
        >>> lora_fx.load_adapter(gm, "adapter_b", "default", hotswap=True)   # no recompile
    """
    state = require_state(gm)
    resolve_adapters(state, [adapter_name])
    require_no_tokens(state, [adapter_name], "hotswap_adapter")
    record = state.adapters[adapter_name]
    if record.merged:
        raise AdapterError(f"adapter {adapter_name!r} is merged; unmerge it before hot-swapping")
    folder = Path(path)
    cfg, tensors, _ = read_adapter(folder)
    writes = _plan_writes(gm, state, adapter_name, cfg, tensors, folder)
    with torch.no_grad():
        for target, value in writes:
            param = _graph.get_attr(gm, target)
            param.copy_(value.to(param.dtype))
    refresh_adapter(gm, state, adapter_name)  # a mixed batch reads copies in its stacks
    log.info("hotswap_adapter: %s -> slot %r (%d tensors)", folder, adapter_name, len(writes))
    return gm


def _plan_writes(
    gm, state: LoraState, adapter: str, cfg, tensors, folder
) -> list[tuple[str, torch.Tensor]]:
    """Check the file against the slot and return (parameter path, value) pairs to write."""
    record = state.adapters[adapter]
    file_sites = {s.fqn for s in find_sites(gm, cfg)}
    if file_sites != set(record.sites):
        raise AdapterError(
            f"cannot hot-swap {str(folder)!r} into slot {adapter!r}: targets differ; only in the "
            f"file: {sorted(file_sites - set(record.sites))[:4]}, only in the slot: "
            f"{sorted(set(record.sites) - file_sites)[:4]}"
        )
    writes: list[tuple[str, torch.Tensor]] = []
    used: set[str] = set()
    for fqn, rec in record.sites.items():
        paths = lora_paths(rec.kind, fqn, adapter)
        new_r, new_scale = cfg.rank_for(fqn), cfg.scale_for(fqn)
        if new_r > rec.r:
            raise AdapterError(
                f"site {fqn!r}: the file's rank {new_r} exceeds the slot's rank {rec.r}; call "
                f"lora_fx.prepare_for_hotswap(gm, target_rank={new_r}) before compiling"
            )
        a_slot, b_slot = _graph.get_attr(gm, paths.a), _graph.get_attr(gm, paths.b)
        a_new, b_new = _tensor(tensors, paths.a_key, folder), _tensor(tensors, paths.b_key, folder)
        want_a = (new_r, *a_slot.shape[1:])
        want_b = (b_slot.shape[0], new_r, *b_slot.shape[2:])
        if tuple(a_new.shape) != want_a or tuple(b_new.shape) != want_b:
            raise AdapterError(
                f"site {fqn!r}: file shapes A {tuple(a_new.shape)}, B {tuple(b_new.shape)}; "
                f"expected A {want_a}, B {want_b}"
            )
        a_pad, b_pad = ops.pad_rank(rec.kind, a_new, b_new, rec.r)
        ratio = new_scale / rec.scale  # the graph multiplies by rec.scale
        writes += [(paths.a, a_pad), (paths.b, b_pad * ratio)]
        used |= {paths.a_key, paths.b_key}
        if rec.lora_bias:
            bias = tensors.get(paths.b_bias_key)
            writes.append(
                (paths.b_bias, torch.zeros(b_slot.shape[0]) if bias is None else bias * ratio)
            )
            used.add(paths.b_bias_key)
        variants = {"KaSA": rec.use_kasa, "BD-LoRA": rec.block_diagonal}
        variants.update({"VeLoRA": rec.velora is not None, "QALoRA": rec.qalora_group_size})
        variants["MonteCLoRA"] = rec.monteclora
        what = next((name for name, used in variants.items() if used), None)
        if what is not None:
            raise AdapterError(
                f"cannot hot-swap into slot {adapter!r}: {what} adapters are not supported"
            )
        if rec.use_dora:  # DoRA's magnitude does not depend on the rank or the scale
            writes.append((paths.magnitude, _tensor(tensors, paths.magnitude_key, folder)))
            used.add(paths.magnitude_key)
    for module in record.modules_to_save:
        copy_path = modules_to_save_path(module, adapter)
        for name, param in gm.get_submodule(module).named_parameters():
            if not is_adapter_parameter(name):
                key = f"{FILE_PREFIX}{module}.{name}"
                value = _tensor(tensors, key, folder)
                if value.shape != param.shape:
                    raise AdapterError(
                        f"{key}: file {tuple(value.shape)} vs slot {tuple(param.shape)}"
                    )
                writes.append((f"{copy_path}.{name}", value))
                used.add(key)
    extra = sorted(set(tensors) - used)
    if extra:
        raise AdapterError(
            f"{len(extra)} tensors in {str(folder)!r} fit no slot tensor, e.g. {extra[:3]}"
        )
    return writes


def _tensor(tensors: dict[str, torch.Tensor], key: str, folder: Path) -> torch.Tensor:
    """A required tensor from the file."""
    if key not in tensors:
        raise AdapterError(f"{str(folder)!r} has no tensor {key!r}")
    return tensors[key]


def _replace_parameter(
    gm: torch.fx.GraphModule, path: str, value: torch.Tensor, grad: bool
) -> None:
    """Register a new Parameter at `path` (ParameterDict entries included)."""
    owner_path, _, name = path.rpartition(".")
    owner = _graph.get_attr(gm, owner_path)
    param = nn.Parameter(value, requires_grad=grad)
    if isinstance(owner, nn.ParameterDict):
        owner[name] = param
    else:
        setattr(owner, name, param)
