"""Adapter folder I/O primitives: safe reads and atomic writes."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import safetensors.torch
import torch

from lora_fx.config import LoraConfig
from lora_fx.errors import AdapterError

__all__ = ["BIN_NAME", "CONFIG_NAME", "SAFETENSORS_NAME", "atomic_write", "read_adapter_folder"]

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"


def read_adapter_folder(folder: Path) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """The config and tensors of a PEFT adapter folder (safetensors, or .bin with weights_only)."""
    if not (folder / CONFIG_NAME).is_file():
        raise AdapterError(f"no {CONFIG_NAME} in {str(folder)!r}; expected a PEFT adapter folder")
    cfg = LoraConfig.from_json(str(folder / CONFIG_NAME))
    if (folder / SAFETENSORS_NAME).is_file():
        return cfg, safetensors.torch.load_file(str(folder / SAFETENSORS_NAME))
    if (folder / BIN_NAME).is_file():
        return cfg, torch.load(folder / BIN_NAME, map_location="cpu", weights_only=True)
    raise AdapterError(f"no {SAFETENSORS_NAME} or {BIN_NAME} in {str(folder)!r}")


def atomic_write(target: Path, write: Callable[[str], object]) -> None:
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
