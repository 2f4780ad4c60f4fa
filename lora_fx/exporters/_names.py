"""Names of LoRA tensors in ONNX files: each is derived from its PEFT key by one rule.

    PEFT file key (base_model.model. +)   layout "initializers"              "inputs", ORT adapter
    <site>.lora_A.weight                  <site>.lora_A.<adapter>.weight     <site>.lora_A.weight
    <site>.lora_B.weight                  <site>.lora_B.<adapter>.weight     <site>.lora_B.weight
    <site>.lora_B.bias                    <site>.lora_B.<adapter>.bias       <site>.lora_B.bias
    <site>.lora_embedding_A               <site>.lora_embedding_A.<adapter>  <site>.lora_embedding_A
                                          layout "stacked": the adapter slot is `stacked`

Rules:
1. Drop the `base_model.model.` prefix. With named adapters ("initializers" and "stacked"), put the
   adapter name after `lora_A` / `lora_B` / `lora_embedding_*`, which is PEFT's in-memory parameter
   name and the tensor's path in the lora_fx graph. The "inputs" layout serves every adapter through
   one input per tensor, so its names carry no adapter: they are the file keys without the prefix.
2. In "inputs" tensors and ORT adapter files, B holds `scale * B` (the scale is folded in), and the
   rank dimension of A and B is the symbolic dimension `<site>.r`.
"""

from __future__ import annotations

from lora_fx.core.keys import FILE_PREFIX, LoraPaths
from lora_fx.sites.kinds import lora_paths

__all__ = ["STACKED", "input_names", "peft_key", "rank_dim"]

STACKED = "stacked"


def input_names(kind: str, site: str) -> LoraPaths:
    """Adapter-free names (the "inputs" layout and ORT adapter files) of a site's tensors."""
    paths = lora_paths(kind, site, "_")
    strip = len(FILE_PREFIX)
    return LoraPaths(
        a=paths.a_key[strip:],
        b=paths.b_key[strip:],
        b_bias=paths.b_bias_key[strip:],
        dropout=paths.dropout,
        a_key=paths.a_key,
        b_key=paths.b_key,
        b_bias_key=paths.b_bias_key,
    )


def peft_key(onnx_name: str) -> str:
    """The PEFT file key of an adapter-free ONNX tensor name (rule 1 backwards)."""
    return FILE_PREFIX + onnx_name


def rank_dim(site: str) -> str:
    """The symbolic rank dimension of a site's A and B in the "inputs" layout."""
    return f"{site}.r"
