r"""PEFT's rewrite of a LoRA config for transformers-5 MoE models, so both adapt the same tensors.

transformers 5 fuses the experts of Mixtral-, Qwen3-MoE- and DeepSeek-like models into 3-D
parameters (`experts.gate_up_proj`, `experts.down_proj`) and makes the router a custom module
holding `gate.weight`. PEFT 0.21 (`utils/transformers_weight_conversion.py`) rewrites configs
written for the v4 names at `get_peft_model` / `from_pretrained` time, and lora_fx does the same
(`convert_moe_config`) so files move both ways:

1. A string `target_modules` is first resolved to leaf names: `all-linear` -> the leaf names of
   the Linear / Conv1D sites (not the output layer) plus every v4 name below; a regex -> the leaf
   names of the module and parameter paths it full-matches, plus a v4 expert name when the
   regex matches it under a fused parameter's container.
2. Each target equal to (or ending in `.`) a v4 name moves to `target_parameters` under its v5
   name (`w1` / `gate_proj` / `up_proj` -> `gate_up_proj`, `w2` / `down_proj` -> `down_proj`,
   `gate` -> `gate.weight`). A dense MLP's `gate_proj` is a v4 name too: on DeepSeek-V3, PEFT
   drops the dense and shared-expert MLP linears this way, and so does lora_fx.
3. When every v4 name fused into one v5 parameter is targeted, its rank and alpha are doubled
   with a `rank_pattern` / `alpha_pattern` entry `.*\.gate_up_proj`, matched (for parameter
   sites) against the parameter's path; naming only some of them is an error.
Which models convert is transformers' table (`conversion_mapping`), read once at capture
(`moe_family`, kept in the capture record). PEFT's quirk is kept: `qwen2_moe` itself is not
in that table, so Qwen2-MoE configs are left as they are (its router is then no target of
`all-linear`, as in PEFT, because it is no Linear module).
"""

from __future__ import annotations

import dataclasses
import logging
import re

import torch.fx

from lora_fx import patterns
from lora_fx.config import LoraConfig
from lora_fx.core.state import CAPTURE_META
from lora_fx.errors import ConfigError
from lora_fx.sites.match import all_sites

__all__ = ["convert_moe_config", "moe_family"]

log = logging.getLogger(__name__)

# v4 name -> v5 target parameter, per family (PEFT's `_MOE_TARGET_MODULE_MAPPING`)
_TARGET_MAPPING = {
    "mixtral": {
        "gate": "gate.weight",
        "w1": "gate_up_proj",
        "w3": "gate_up_proj",
        "w2": "down_proj",
    },
    "qwen2_moe": {
        "gate": "gate.weight",
        "gate_proj": "gate_up_proj",
        "up_proj": "gate_up_proj",
        "down_proj": "down_proj",
    },
}
# v5 parameter -> the v4 names fused into it (PEFT's `_MOE_FUSED_TARGETS`)
_FUSED = {
    "mixtral": {"gate_up_proj": ("w1", "w3")},
    "qwen2_moe": {"gate_up_proj": ("gate_proj", "up_proj")},
}


def moe_family(model_type: str | None) -> str | None:
    """The conversion family of a transformers `model_type` (as PEFT resolves it), or None."""
    if model_type is None:
        return None
    try:
        from transformers.conversion_mapping import (
            _MODEL_TO_CONVERSION_PATTERN,
            get_checkpoint_conversion_mapping,
        )
    except ImportError:  # transformers 4: nothing was fused
        return None
    family = "mixtral" if model_type == "mixtral" else _MODEL_TO_CONVERSION_PATTERN.get(model_type)
    if family not in _TARGET_MAPPING or get_checkpoint_conversion_mapping(model_type) is None:
        return None
    return family


def convert_moe_config(gm: torch.fx.GraphModule, cfg: LoraConfig) -> LoraConfig:
    """`cfg` rewritten as PEFT rewrites it for this graph's MoE model (unchanged for others).

    Raises:
        ConfigError: Only some of the v4 names fused into one parameter are targeted.
    """
    family = gm.meta.get(CAPTURE_META, {}).get("moe_family")
    if family is None or cfg.target_modules is None:
        return cfg
    mapping, fused = _TARGET_MAPPING[family], _FUSED[family]
    targets = cfg.target_modules
    if isinstance(targets, str):
        targets = _resolve_string(gm, cfg, mapping)
        if not targets:
            return cfg  # nothing matched: the usual "matched no site" error follows
    parameters = list(cfg.target_parameters or [])
    remaining, present = [], {name: set() for name in fused}
    for target in targets:
        old = next((o for o in mapping if target == o or target.endswith(f".{o}")), None)
        if old is None:
            remaining.append(target)
            continue
        if mapping[old] not in parameters:
            parameters.append(mapping[old])
        if mapping[old] in fused:
            present[mapping[old]].add(old)
    rank_pattern, alpha_pattern = dict(cfg.rank_pattern), dict(cfg.alpha_pattern)
    for new, required in fused.items():
        got = present[new]
        if 0 < len(got) < len(required):
            raise ConfigError(
                f"target_modules names {sorted(got)} but not {sorted(set(required) - got)}: on "
                f"this {family}-style model they are fused into one parameter {new!r}; target "
                f"all of {list(required)} (as PEFT requires)"
            )
        if len(got) == len(required) > 1:
            key = rf".*\.{re.escape(new)}"
            rank_pattern[key] = cfg.r * len(required)
            alpha_pattern[key] = cfg.lora_alpha * len(required)
    converted = dataclasses.replace(
        cfg,
        target_modules=sorted(set(remaining)),
        target_parameters=sorted(set(parameters)),
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
    )
    if converted != cfg:
        log.info(
            "MoE model (%s): target_modules=%r -> %r, target_parameters=%r (as PEFT)",
            family,
            cfg.target_modules,
            converted.target_modules,
            converted.target_parameters,
        )
    return converted


def _resolve_string(gm: torch.fx.GraphModule, cfg: LoraConfig, mapping: dict[str, str]) -> set[str]:
    """PEFT's `_resolve_string_target_modules`: a regex or `all-linear` as leaf names."""
    record = gm.meta.get(CAPTURE_META, {})
    if cfg.is_all_linear:
        output_layer = record.get("output_layer")
        linear = {
            fqn.rsplit(".", 1)[-1]
            for fqn, site in all_sites(gm).items()
            if site.kind == "linear" and site.module and fqn != output_layer
        }
        return linear | set(mapping)
    params = list(record.get("parameters") or [n for n, _ in gm.named_parameters()])
    modules = {p.rsplit(".", i)[0] for p in params for i in range(1, p.count(".") + 1)}
    pattern = cfg.target_modules
    matched = {
        key.rsplit(".", 1)[-1]
        for key in [*sorted(modules), *params]
        if patterns.fullmatch(pattern, key, field="target_modules")
    }
    containers: dict[str, set[str]] = {}
    for path in params:
        container, _, leaf = path.rpartition(".")
        containers.setdefault(leaf, set()).add(container)
    for old, new in mapping.items():
        if old not in matched and any(
            patterns.fullmatch(pattern, f"{c}.{old}", field="target_modules")
            for c in containers.get(new, ())
        ):
            matched.add(old)
    return matched
