"""Save and load adapters in PEFT's layout, or diffusers' (one file, the config in its header).

PEFT: `adapter_config.json` + `adapter_model.safetensors`; diffusers:
`pytorch_lora_weights.safetensors` (rule 7).

Keys are PEFT's (`base_model.model.<site>.lora_A.weight`, see `core/keys.py`), so
`PeftModel.from_pretrained` reads what `save_adapter` writes and `load_adapter` reads what PEFT's
`save_pretrained` writes.

Rules:
1. Files are written to a temporary name and renamed into place: a failed save leaves no half file.
   Both are written first, then renamed back to back, the weights first; the weights record the
   sha256 of their config in the safetensors header, so a folder killed between the two renames
   (new weights, old config) is refused on load, never mixed (`core/files.py` rule 2). PEFT
   ignores that metadata; folders without it (PEFT's) load unchecked.
2. Files are read with safetensors, or `torch.load(weights_only=True)` for `adapter_model.bin`.
3. `load_adapter` checks every key and shape against the graph before changing anything; missing,
   unexpected or mis-shaped tensors raise `AdapterError` and leave the graph as it was.
4. Loading into a graph without that adapter injects its sites from the file's config first
   (without running an init that rewrites base weights: the graph is expected to hold the base the
   adapter was trained on, e.g. PiSSA's residual model).
5. Bias keys (`bias="all"|"lora_only"`) and the full base matrices PEFT saves for `embed_tokens` /
   `lm_head` targets are copied into the base parameters, as PEFT's loader does.
6. `save_adapter` writes the adapter into `path` itself, whatever its name (PEFT's `save_pretrained`
   puts non-default adapters in a subfolder; pass that subfolder to `load_adapter`).
7. `format="diffusers"` writes diffusers' one file (`core/files.py` rule 5): PEFT's keys without
   `base_model.model.`, the config JSON under `lora_adapter_metadata` in the header, exactly as
   diffusers' `save_lora_adapter`, so `model.load_lora_adapter(folder, prefix=None)` reads it with
   scale alpha/r. `load_adapter` tells the layouts apart by the files it finds (`read_adapter`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path

import safetensors.torch
import torch
import torch.fx

from lora_fx.capture import as_graph_module
from lora_fx.config import DUMMY_TARGET_MODULES, LoraConfig
from lora_fx.core import graph as _graph
from lora_fx.core.files import (
    CONFIG_DIGEST_KEY,
    CONFIG_NAME,
    DIFFUSERS_METADATA_KEY,
    DIFFUSERS_NAME,
    SAFETENSORS_NAME,
    atomic_write,
    atomic_writes,
    config_digest,
    read_adapter,
)
from lora_fx.core.keys import to_diffusers_key
from lora_fx.core.state import SiteRecord, require_state, state_or_none
from lora_fx.errors import AdapterError
from lora_fx.math.inits import FROZEN_B_INITS
from lora_fx.passes._file_keys import (
    adapter_keys,
    base_keys,
    bias_keys,
    check_tensors,
)
from lora_fx.passes._inline import inline_targeted_leaves
from lora_fx.passes._rollback import rollback_on_error
from lora_fx.passes._sync import sync
from lora_fx.passes.hotswap import hotswap_adapter
from lora_fx.passes.inject import inject, site_record, targeted_weights
from lora_fx.passes.replicate import REPLICATION_META, apply_replication
from lora_fx.sites import (
    Site,
    all_sites,
    convert_moe_config,
    find_sites,
    match_modules_to_save,
    pattern_key,
)
from lora_fx.sites.kinds import kind_of

__all__ = ["FORMATS", "load_adapter", "save_adapter"]

log = logging.getLogger(__name__)

FORMATS = ("peft", "diffusers")  # save_adapter's layouts (rules 1 and 7)


def save_adapter(
    gm: torch.fx.GraphModule,
    path: str | os.PathLike,
    adapter_name: str = "default",
    *,
    format: str = "peft",
    is_main_process: bool = True,
) -> None:
    """Write one adapter in PEFT's or diffusers' layout into the folder `path` (created if needed).

    Parameters sharded by FSDP2 (`DTensor`s) are gathered whole first; that is a collective, so
    with FSDP2 every rank calls `save_adapter` and only the one with `is_main_process` writes.

    Args:
        gm: A graph with the adapter injected (the module given to DDP / `fully_shard`).
        path: Output folder.
        adapter_name: Which adapter to save.
        format: `"peft"`: `adapter_config.json` + `adapter_model.safetensors`. `"diffusers"`:
            `pytorch_lora_weights.safetensors` as diffusers' `save_lora_adapter` writes it, read
            by `load_lora_adapter(path, prefix=None)` (rule 7).
        is_main_process: Whether this process writes the files (PEFT's `save_pretrained`
            argument); pass `torch.distributed.get_rank() == 0` in a multi-process run.

    Raises:
        AdapterError: No such adapter on the graph, or an unknown `format`.

    Example:
        >>> lora_fx.save_adapter(gm, "out/adapter")
        >>> PeftModel.from_pretrained(model, "out/adapter")   # PEFT reads it
        >>> lora_fx.save_adapter(gm, "out/lora", format="diffusers")
        >>> unet.load_lora_adapter("out/lora", prefix=None)   # diffusers reads it
    """
    if format not in FORMATS:
        raise AdapterError(f"format={format!r} is unknown; choose one of {list(FORMATS)}")
    state = require_state(gm)
    if adapter_name not in state.adapters:
        raise AdapterError(
            f"unknown adapter {adapter_name!r}; adapters on this graph: {list(state.adapters)}"
        )
    record = state.adapters[adapter_name]
    sites = all_sites(gm)
    adapter_sites = [sites[fqn] for fqn in record.sites]
    keys = adapter_keys(gm, adapter_name, adapter_sites, record.sites, record.modules_to_save)
    keys.update(bias_keys(gm, record.config.bias, adapter_sites))
    tensors = {
        key: _full_tensor(_graph.get_attr(gm, p)).detach().cpu().contiguous()
        for key, (p, _) in keys.items()
    }
    if not is_main_process:
        return
    config = record.config.to_dict()
    if record.config.is_all_linear:  # PEFT writes the resolved module names (no parameter sites)
        config["target_modules"] = sorted(
            fqn for fqn, rec in record.sites.items() if kind_of(rec.kind).matchers
        )
    if config["target_modules"] is None and not config.get("target_parameters"):
        config["target_modules"] = DUMMY_TARGET_MODULES  # how PEFT says "no LoRA module"
    config.update(_rank_fields(record.config, record.sites, sites))
    if not config.get("layer_replication") and REPLICATION_META in gm.meta:
        # Replicated by replicate_layers alone: PEFT needs the ranges to rebuild the same stack.
        config["layer_replication"] = gm.meta[REPLICATION_META]["layer_replication"]
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    if format == "diffusers":
        _write_diffusers(folder, config, tensors)
    else:
        _write_peft(folder, config, tensors)
    log.info("save_adapter: %r -> %s (%s, %d tensors)", adapter_name, folder, format, len(tensors))


def _write_peft(folder: Path, config: dict, tensors: dict[str, torch.Tensor]) -> None:
    """PEFT's two files, the weights naming their config (`core/files.py` rule 2)."""
    # The weights name their config (core/files.py rule 2); both files are written, then renamed
    # back to back, the weights first. The weights are serialized here: safetensors' save_file
    # writes through a `.tmpXXXXXX` file of its own (mode 0600) that a kill would leave behind.
    text = json.dumps(config, indent=2, sort_keys=True)
    metadata = {"format": "pt", CONFIG_DIGEST_KEY: config_digest(json.loads(text))}
    weights = safetensors.torch.save(tensors, metadata)
    atomic_writes(
        {
            folder / SAFETENSORS_NAME: lambda f: Path(f).write_bytes(weights),
            folder / CONFIG_NAME: lambda f: Path(f).write_text(text),
        }
    )


def _write_diffusers(folder: Path, config: dict, tensors: dict[str, torch.Tensor]) -> None:
    """The diffusers file: keys without the PEFT prefix, the config in the header (rule 7)."""
    # As diffusers' save_lora_adapter: json.dumps(config.to_dict(), indent=2, sort_keys=True).
    text = json.dumps(config, indent=2, sort_keys=True)
    metadata = {"format": "pt", DIFFUSERS_METADATA_KEY: text}
    renamed = {to_diffusers_key(key): tensor for key, tensor in tensors.items()}
    weights = safetensors.torch.save(renamed, metadata)
    atomic_write(folder / DIFFUSERS_NAME, lambda f: Path(f).write_bytes(weights))


def load_adapter(
    gm: torch.fx.GraphModule | torch.export.ExportedProgram,
    path: str | os.PathLike,
    adapter_name: str = "default",
    *,
    hotswap: bool = False,
) -> torch.fx.GraphModule:
    """Load a PEFT or diffusers adapter into the graph, in place (injecting its sites if needed).

    Args:
        gm: A captured graph; it may already hold `adapter_name` (its weights are replaced).
        path: Folder with `adapter_config.json` and `adapter_model.safetensors` (or `.bin`),
            or diffusers' `pytorch_lora_weights.safetensors` (the file or its folder; the config
            is read from its header).
        adapter_name: Name for the adapter on the graph.
        hotswap: Write the weights into the existing slot `adapter_name` without changing the graph
            (no torch.compile recompile), folding a different alpha into B and padding a smaller
            rank; see `lora_fx.hotswap_adapter`.

    Returns:
        The same GraphModule, recompiled.

    Raises:
        AdapterError: Missing files, a diffusers file without its config, missing/unexpected/
            mis-shaped tensors, or a merged adapter.
        ConfigError: The config (file or header) is not a LoRA config PEFT could have written.

    Example:
        >>> gm = lora_fx.load_adapter(lora_fx.capture(model, (ids,)), "peft_adapter/")
    """
    # plan
    gm = as_graph_module(gm)
    folder = Path(path)
    if hotswap:
        return hotswap_adapter(gm, folder, adapter_name)
    cfg, tensors, layout = read_adapter(folder)
    state = state_or_none(gm)
    existing = state is not None and adapter_name in state.adapters
    # All or nothing: a new adapter's sites are named on the replicated graph; a failure in
    # planning, inject or the writes puts the graph, its state and overwritten tensors back.
    replication = None if existing else cfg.layer_replication
    with rollback_on_error(gm) as undo:
        apply_replication(gm, replication)  # a new adapter's sites: the new layer indices
        if existing:
            record = state.adapters[adapter_name]
            if record.merged:
                raise AdapterError(
                    f"adapter {adapter_name!r} is merged; unmerge it before loading weights into it"
                )
            sites_by_name = all_sites(gm)
            sites = [sites_by_name[fqn] for fqn in record.sites]
            records, saved_modules = record.sites, record.modules_to_save
        else:
            cfg = convert_moe_config(gm, cfg)  # a v4-style config PEFT would convert too
            inline_targeted_leaves(gm, targeted_weights(gm, cfg))
            sites = find_sites(gm, cfg)
            records = {site.fqn: site_record(cfg, site) for site in sites}
            saved_modules = (
                match_modules_to_save(gm, cfg.modules_to_save) if cfg.modules_to_save else []
            )
        expected = adapter_keys(gm, adapter_name, sites, records, saved_modules)
        base = base_keys(gm, sites)
        check_tensors(tensors, expected, base, folder, layout=layout)

        # apply
        if not existing:
            # The file holds the adapter's weights: an init that rewrites the base (PiSSA, OLoRA,
            # LoftQ) must not run again on what is already its residual; the config is kept as read.
            plain = dataclasses.replace(
                cfg,
                init_lora_weights=True,
                loftq_config={},
                eva_config=None,
                corda_config=None,
                lora_ga_config=None,
            )
            inject(gm, plain, adapter_name)
            state_or_none(gm).adapters[adapter_name].config = cfg
            if cfg.init_lora_weights in FROZEN_B_INITS:
                sync(gm)  # MiCA's config freezes B, as PEFT's variant does on load
        with torch.no_grad():
            for key, tensor in tensors.items():
                target = expected[key][0] if key in expected else base[key]
                param = _graph.get_attr(gm, target)
                if existing or key not in expected:  # tensors that held values before this call
                    undo.keep(param)
                param.copy_(tensor.to(param.dtype))
    log.info("load_adapter: %s -> %r (%d tensors)", folder, adapter_name, len(tensors))
    return gm


def _full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor (an FSDP2 shard) gathered whole, on every rank (a collective); else `tensor`."""
    if torch.distributed.is_available():
        from torch.distributed.tensor import DTensor

        if isinstance(tensor, DTensor):
            return tensor.full_tensor()
    return tensor


def _rank_fields(
    cfg: LoraConfig, records: dict[str, SiteRecord], sites: dict[str, Site]
) -> dict[str, dict]:
    """rank/alpha patterns for sites whose rank or alpha differ from the config (hot-swap padding).

    Full site names (parameter paths for parameter sites) go first: PEFT takes the first
    pattern key that matches.
    """
    keys = {fqn: pattern_key(sites[fqn]) for fqn in records}
    changed = {
        keys[fqn]: rec
        for fqn, rec in records.items()
        if _rank_alpha(rec) != _rank_alpha(site_record(cfg, sites[fqn]))
    }
    if not changed:
        return {}
    return {
        "rank_pattern": {**{f: rec.r for f, rec in changed.items()}, **cfg.rank_pattern},
        "alpha_pattern": {**{f: rec.lora_alpha for f, rec in changed.items()}, **cfg.alpha_pattern},
    }


def _rank_alpha(rec: SiteRecord) -> tuple[int, float]:
    """What a hot-swapped slot may change of a record: its rank and alpha."""
    return rec.r, rec.lora_alpha
