"""The PEFT file layout of an adapter on a graph: file key -> (module-tree path, shape).

Shared by `save_adapter`, `load_adapter` and hot-swapping, so the three agree on every key.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.fx

from lora_fx.core import graph as _graph
from lora_fx.core.keys import (
    FILE_PREFIX,
    is_adapter_parameter,
    modules_to_save_path,
    to_diffusers_key,
)
from lora_fx.core.state import SiteRecord
from lora_fx.errors import AdapterError
from lora_fx.math.velora import group_dim
from lora_fx.passes._bdlora import block_shapes
from lora_fx.passes._monteclora import monteclora_keys
from lora_fx.passes._qalora import qalora_shapes
from lora_fx.sites import Site
from lora_fx.sites.kinds import kind_of, lora_paths

__all__ = [
    "adapter_keys",
    "base_keys",
    "bias_keys",
    "check_tensors",
]


def adapter_keys(
    gm: torch.fx.GraphModule,
    adapter: str,
    sites: list[Site],
    records: dict[str, SiteRecord],
    saved_modules: list[str],
) -> dict[str, tuple[str, tuple[int, ...]]]:
    """PEFT file key -> (module-tree path, shape) for the A/B tensors and module copies."""
    keys: dict[str, tuple[str, tuple[int, ...]]] = {}
    for site in sites:
        rec = records[site.fqn]
        paths = lora_paths(site.kind, site.fqn, adapter)
        kind = kind_of(site)
        shapes = qalora_shapes(block_shapes(kind.factor_shapes(site, rec.r), rec), rec)
        keys[paths.a_key] = (paths.a, shapes[0])
        if paths.b_key:  # trainable tokens have one tensor
            keys[paths.b_key] = (paths.b, shapes[1])
        if rec.lora_bias:
            keys[paths.b_bias_key] = (paths.b_bias, (site.out_features,))
        if rec.use_dora:
            keys[paths.magnitude_key] = (paths.magnitude, kind.magnitude_shape(site))
        if rec.use_kasa:
            keys[paths.diag_key] = (paths.diag, (rec.r,))
        if rec.monteclora:  # MonteCLoRA's sampler: two parameters, two buffers
            keys.update(monteclora_keys(site.fqn, adapter, rec.r, rec.monteclora))
        if rec.velora is not None:  # VeLoRA's projection buffer
            keys[paths.velora_key] = (paths.velora, (group_dim(site.in_features, rec.velora[0]),))
    for module in saved_modules:
        copy_path = modules_to_save_path(module, adapter)
        for name, param in gm.get_submodule(module).named_parameters():
            if not is_adapter_parameter(name):
                keys[f"{FILE_PREFIX}{module}.{name}"] = (f"{copy_path}.{name}", tuple(param.shape))
    return keys


def bias_keys(
    gm: torch.fx.GraphModule, bias: str, sites: list[Site]
) -> dict[str, tuple[str, tuple]]:
    """PEFT's bias keys: `<site>.base_layer.bias` for adapted sites, else `<module>.bias`."""
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


def base_keys(gm: torch.fx.GraphModule, sites: list[Site]) -> dict[str, str]:
    """Base-parameter keys an adapter file may carry: every bias key, and full site weights."""
    keys = {key: p for key, (p, _) in bias_keys(gm, "all", sites).items()}
    for site in sites:
        keys[f"{FILE_PREFIX}{site.fqn}.base_layer.weight"] = site.weight
    return keys


def check_tensors(
    tensors: dict[str, torch.Tensor],
    expected: dict[str, tuple[str, tuple[int, ...]]],
    base_keys: dict[str, str],
    folder: Path,
    *,
    layout: str = "peft",
) -> None:
    """Every expected key present with its shape, and nothing unknown; else one clear error.

    Keys are quoted as the file has them: PEFT's, or without `base_model.model.` for diffusers'.
    """
    shown = to_diffusers_key if layout == "diffusers" else str
    missing = sorted(shown(k) for k in set(expected) - set(tensors))
    unexpected = sorted(shown(k) for k in set(tensors) - set(expected) - set(base_keys))
    wrong = [
        f"{shown(key)}: file {tuple(tensors[key].shape)} vs graph {shape}"
        for key, (_, shape) in expected.items()
        if key in tensors and tuple(tensors[key].shape) != shape
    ]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensors, e.g. {missing[:3]}")
    if unexpected:
        problems.append(f"{len(unexpected)} tensors that fit no site, e.g. {unexpected[:3]}")
        if expected:  # what a key of this graph looks like in this layout
            problems[-1] += f" (keys here look like {shown(min(expected))!r})"
    if wrong:
        problems.append(f"{len(wrong)} mis-shaped tensors, e.g. {wrong[:3]}")
    if problems:
        raise AdapterError(
            f"adapter in {str(folder)!r} ({layout} layout) does not fit this graph: "
            + "; ".join(problems)
            + "; nothing was loaded"
        )
