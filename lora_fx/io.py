"""Save and load adapters in PEFT's layout: `adapter_config.json` + `adapter_model.safetensors`.

Keys are PEFT's (`base_model.model.<site>.lora_A.weight`, see `_keys.py`), so `PeftModel.from_pretrained`
reads what `save_adapter` writes and `load_adapter` reads what PEFT's `save_pretrained` writes.

Rules:
1. Files are written to a temporary name and renamed into place: a failed save leaves no half file.
2. Files are read with safetensors, or `torch.load(weights_only=True)` for `adapter_model.bin`.
3. `load_adapter` checks every key and shape against the graph before changing anything; missing,
   unexpected or mis-shaped tensors raise `AdapterError` and leave the graph as it was.
4. Loading into a graph without that adapter injects its sites from the file's config first.
5. Bias keys (`bias="all"|"lora_only"`) and the full base matrices PEFT saves for `embed_tokens` /
   `lm_head` targets are copied into the base parameters, as PEFT's loader does.
6. `save_adapter` writes the adapter into `path` itself, whatever its name (PEFT's `save_pretrained`
   puts non-default adapters in a subfolder; pass that subfolder to `load_adapter`).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

import safetensors.torch
import torch
import torch.fx

from lora_fx import _graph
from lora_fx._keys import FILE_PREFIX, is_adapter_parameter, lora_paths, modules_to_save_path
from lora_fx._meta import SiteRecord, state_or_none
from lora_fx.capture import as_graph_module
from lora_fx.config import LoraConfig
from lora_fx.errors import AdapterError
from lora_fx.passes.inject import _site_record, inject
from lora_fx.passes.merge import require_state
from lora_fx.sites import Site, all_sites, find_sites, match_modules_to_save

__all__ = ["CONFIG_NAME", "SAFETENSORS_NAME", "load_adapter", "save_adapter"]

log = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"


def save_adapter(
    gm: torch.fx.GraphModule, path: str | os.PathLike, adapter_name: str = "default"
) -> None:
    """Write one adapter in PEFT's layout into the folder `path` (created if needed).

    Args:
        gm: A graph with the adapter injected.
        path: Output folder.
        adapter_name: Which adapter to save.

    Raises:
        AdapterError: No such adapter on the graph.

    Example:
        >>> lora_fx.save_adapter(gm, "out/adapter")
        >>> PeftModel.from_pretrained(model, "out/adapter")   # PEFT reads it
    """
    state = require_state(gm)
    if adapter_name not in state.adapters:
        raise AdapterError(
            f"unknown adapter {adapter_name!r}; adapters on this graph: {list(state.adapters)}"
        )
    record = state.adapters[adapter_name]
    sites = all_sites(gm)
    adapter_sites = [sites[fqn] for fqn in record.sites]
    keys = _adapter_keys(gm, adapter_name, adapter_sites, record.sites, record.modules_to_save)
    keys.update(_bias_keys(gm, record.config.bias, adapter_sites))
    tensors = {
        key: _graph.get_attr(gm, p).detach().cpu().contiguous() for key, (p, _) in keys.items()
    }
    config = record.config.to_dict()
    if record.config.is_all_linear:
        config["target_modules"] = sorted(record.sites)  # PEFT writes the resolved names
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    _atomic_write(
        folder / SAFETENSORS_NAME,
        lambda f: safetensors.torch.save_file(tensors, f, {"format": "pt"}),
    )
    _atomic_write(
        folder / CONFIG_NAME,
        lambda f: Path(f).write_text(json.dumps(config, indent=2, sort_keys=True)),
    )
    log.info("save_adapter: %r -> %s (%d tensors)", adapter_name, folder, len(tensors))


def load_adapter(
    gm: torch.fx.GraphModule | torch.export.ExportedProgram,
    path: str | os.PathLike,
    adapter_name: str = "default",
) -> torch.fx.GraphModule:
    """Load a PEFT adapter folder into the graph, in place (injecting its sites if needed).

    Args:
        gm: A captured graph; it may already hold `adapter_name` (its weights are replaced).
        path: Folder with `adapter_config.json` and `adapter_model.safetensors` (or `.bin`).
        adapter_name: Name for the adapter on the graph.

    Returns:
        The same GraphModule, recompiled.

    Raises:
        AdapterError: Missing files, missing/unexpected/mis-shaped tensors, or a merged adapter.
        ConfigError: The config file is not a LoRA config PEFT could have written.

    Example:
        >>> gm = lora_fx.load_adapter(lora_fx.capture(model, (ids,)), "peft_adapter/")
    """
    # plan
    gm = as_graph_module(gm)
    folder = Path(path)
    if not (folder / CONFIG_NAME).is_file():
        raise AdapterError(f"no {CONFIG_NAME} in {str(folder)!r}; expected a PEFT adapter folder")
    cfg = LoraConfig.from_json(str(folder / CONFIG_NAME))
    tensors = _read_tensors(folder)
    state = state_or_none(gm)
    if state is not None and adapter_name in state.adapters:
        record = state.adapters[adapter_name]
        if record.merged:
            raise AdapterError(
                f"adapter {adapter_name!r} is merged; unmerge it before loading weights into it"
            )
        sites_by_name = all_sites(gm)
        sites = [sites_by_name[fqn] for fqn in record.sites]
        records, saved_modules = record.sites, record.modules_to_save
    else:
        sites = find_sites(gm, cfg)
        records = {site.fqn: _site_record(cfg, site) for site in sites}
        saved_modules = (
            match_modules_to_save(gm, cfg.modules_to_save) if cfg.modules_to_save else []
        )
    expected = _adapter_keys(gm, adapter_name, sites, records, saved_modules)
    base_keys = _base_keys(gm, sites)
    _check_tensors(tensors, expected, base_keys, folder)

    # apply
    if state is None or adapter_name not in state.adapters:
        inject(gm, cfg, adapter_name)
    with torch.no_grad():
        for key, tensor in tensors.items():
            target = expected[key][0] if key in expected else base_keys[key]
            param = _graph.get_attr(gm, target)
            param.copy_(tensor.to(param.dtype))
    log.info("load_adapter: %s -> %r (%d tensors)", folder, adapter_name, len(tensors))
    return gm


def _adapter_keys(
    gm: torch.fx.GraphModule,
    adapter: str,
    sites: list[Site],
    records: dict[str, SiteRecord],
    saved_modules: list[str],
) -> dict[str, tuple[str, tuple[int, ...]]]:
    """PEFT file key -> (module-tree path, shape) for the adapter's A/B tensors and module copies."""
    keys: dict[str, tuple[str, tuple[int, ...]]] = {}
    for site in sites:
        rec = records[site.fqn]
        paths = lora_paths(site.kind, site.fqn, adapter)
        a_shape, b_shape = _factor_shapes(site, rec.r)
        keys[paths.a_key] = (paths.a, a_shape)
        keys[paths.b_key] = (paths.b, b_shape)
        if rec.lora_bias:
            keys[paths.b_bias_key] = (paths.b_bias, (site.out_features,))
    for module in saved_modules:
        copy_path = modules_to_save_path(module, adapter)
        for name, param in gm.get_submodule(module).named_parameters():
            if not is_adapter_parameter(name):
                keys[f"{FILE_PREFIX}{module}.{name}"] = (f"{copy_path}.{name}", tuple(param.shape))
    return keys


def _bias_keys(
    gm: torch.fx.GraphModule, bias: str, sites: list[Site]
) -> dict[str, tuple[str, tuple]]:
    """PEFT's bias keys: `<site>.base_layer.bias` for adapted sites, `<module>.bias` for the rest."""
    if bias == "none":
        return {}
    keys: dict[str, tuple[str, tuple]] = {}
    site_biases = {site.bias: site for site in sites if site.bias is not None}
    for path, site in site_biases.items():
        keys[f"{FILE_PREFIX}{site.fqn}.base_layer.bias"] = (
            path,
            tuple(_graph.get_attr(gm, path).shape),
        )
    if bias == "all":
        for name, param in gm.named_parameters():
            if (
                name.rsplit(".", 1)[-1] == "bias"
                and not is_adapter_parameter(name)
                and name not in site_biases
            ):
                keys[f"{FILE_PREFIX}{name}"] = (name, tuple(param.shape))
    return keys


def _base_keys(gm: torch.fx.GraphModule, sites: list[Site]) -> dict[str, str]:
    """Base-parameter keys an adapter file may carry: every bias key, and full site weights."""
    keys = {key: p for key, (p, _) in _bias_keys(gm, "all", sites).items()}
    for site in sites:
        keys[f"{FILE_PREFIX}{site.fqn}.base_layer.weight"] = site.weight
    return keys


def _factor_shapes(site: Site, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shapes of A and B, as PEFT's modules have them."""
    if site.kind == "linear":
        return (r, site.in_features), (site.out_features, r)
    if site.kind == "embedding":
        return (r, site.in_features), (site.out_features, r)
    spec = site.conv
    ones = (1,) * spec.dims
    return (r, site.in_features, *spec.kernel_size), (site.out_features, r // spec.groups, *ones)


def _check_tensors(
    tensors: dict[str, torch.Tensor],
    expected: dict[str, tuple[str, tuple[int, ...]]],
    base_keys: dict[str, str],
    folder: Path,
) -> None:
    """Every expected key present with its shape, and nothing unknown; else one clear error."""
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected) - set(base_keys))
    wrong = [
        f"{key}: file {tuple(tensors[key].shape)} vs graph {shape}"
        for key, (_, shape) in expected.items()
        if key in tensors and tuple(tensors[key].shape) != shape
    ]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensors, e.g. {missing[:3]}")
    if unexpected:
        problems.append(f"{len(unexpected)} tensors that fit no site, e.g. {unexpected[:3]}")
    if wrong:
        problems.append(f"{len(wrong)} mis-shaped tensors, e.g. {wrong[:3]}")
    if problems:
        raise AdapterError(
            f"adapter in {str(folder)!r} does not fit this graph: "
            + "; ".join(problems)
            + "; nothing was loaded"
        )


def _read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """The adapter's tensors, read safely."""
    if (folder / SAFETENSORS_NAME).is_file():
        return safetensors.torch.load_file(str(folder / SAFETENSORS_NAME))
    if (folder / BIN_NAME).is_file():
        return torch.load(folder / BIN_NAME, map_location="cpu", weights_only=True)
    raise AdapterError(f"no {SAFETENSORS_NAME} or {BIN_NAME} in {str(folder)!r}")


def _atomic_write(target: Path, write) -> None:
    """Call `write(tmp_path)` then rename into place; the temp file is removed on failure."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
