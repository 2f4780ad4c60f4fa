"""Where LoRA parameters live: module-tree paths (PEFT's in-memory names) and PEFT file keys.

    in memory                                 file (prefix base_model.model.)
    <site>.lora_A.<adapter>.weight            <site>.lora_A.weight
    <site>.lora_B.<adapter>.weight (.bias)    <site>.lora_B.weight (.bias)
    <site>.lora_embedding_A.<adapter>         <site>.lora_embedding_A
    <site>.lora_magnitude_vector.<adapter>.weight  <site>.lora_magnitude_vector   (DoRA)
    <site>.lora_dropout.<adapter>             (not saved)
    <emb>.token_adapter.trainable_tokens_delta.<adapter>
                                              <emb>.token_adapter.trainable_tokens_delta
    <module>.modules_to_save.<adapter>.<p>    <module>.<p>

Saving is a rename: drop the adapter name and prefix `base_model.model.`. diffusers' LoRA files
(`save_lora_adapter`) hold the same keys without that prefix: `<site>.lora_A.weight`.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "BUFFER_HOLDERS",
    "FILE_PREFIX",
    "HOLDERS",
    "LoraPaths",
    "from_diffusers_key",
    "is_adapter_parameter",
    "modules_to_save_path",
    "to_diffusers_key",
]

FILE_PREFIX = "base_model.model."
# Holders of buffers, not parameters: the trainability sync leaves them alone.
BUFFER_HOLDERS = ("lora_velora_embed", "lora_arrow", "lora_alora_offsets")
# Child modules lora_fx adds to a site, by kind.
HOLDERS = (
    "lora_A",
    "lora_B",
    "lora_embedding_A",
    "lora_embedding_B",
    "lora_dropout",
    "lora_magnitude_vector",
    "lora_diag",
    "lora_velora_embed",  # VeLoRA's projection buffers (never trainable: BUFFER_HOLDERS)
    "lora_arrow",  # Arrow routers' prototypes (buffers, not saved: PEFT's are non-persistent)
    "lora_alora_offsets",  # aLoRA's per-row offsets (buffers, never in files: BUFFER_HOLDERS)
    "lora_monteclora_sampler",  # MonteCLoRA's samplers (variational parameters and buffers)
    "trainable_tokens_delta",  # trainable tokens (the site is `<embedding>.token_adapter`)
)


@dataclass(frozen=True)
class LoraPaths:
    """Module-tree paths of one branch's tensors and their PEFT file keys."""

    a: str
    b: str
    b_bias: str
    dropout: str
    a_key: str
    b_key: str  # "" for a kind with one tensor (trainable tokens)
    b_bias_key: str
    magnitude: str = ""  # DoRA's magnitude vector
    magnitude_key: str = ""
    diag: str = ""  # KaSA's learnable diagonal `lora_diag` [r]
    diag_key: str = ""
    velora: str = ""  # VeLoRA's projection buffer `lora_velora_embed` [ceil(in / num_groups)]
    velora_key: str = ""
    alora: str = ""  # aLoRA's per-row offsets buffer `lora_alora_offsets` [batch] (not in files)


def modules_to_save_path(module: str, adapter: str) -> str:
    """Where the trainable copy of a `modules_to_save` module lives."""
    return f"{module}.modules_to_save.{adapter}"


def is_adapter_parameter(name: str) -> bool:
    """Whether a parameter path lies inside a LoRA holder or a modules_to_save copy."""
    parts = name.split(".")
    return any(part in HOLDERS or part == "modules_to_save" for part in parts)


def to_diffusers_key(peft_key: str) -> str:
    """A PEFT file key as diffusers writes it: without `base_model.model.`."""
    return peft_key.removeprefix(FILE_PREFIX)


def from_diffusers_key(key: str) -> str:
    """A diffusers file key as PEFT writes it (the inverse of `to_diffusers_key`)."""
    return FILE_PREFIX + key
