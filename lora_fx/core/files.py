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
    """The config and tensors of a PEFT adapter folder (safetensors, or .bin with weights_only).

    Raises:
        AdapterError: A file is missing, or a tensor file cannot be read (named in the message).
        ConfigError: `adapter_config.json` is not JSON or not a valid LoRA config (named).
    """
    if not (folder / CONFIG_NAME).is_file():
        raise AdapterError(f"no {CONFIG_NAME} in {str(folder)!r}; expected a PEFT adapter folder")
    cfg = LoraConfig.from_json(str(folder / CONFIG_NAME))
    for name in (SAFETENSORS_NAME, BIN_NAME):
        path = folder / name
        if not path.is_file():
            continue
        try:
            if name == SAFETENSORS_NAME:
                return cfg, safetensors.torch.load_file(str(path))
            return cfg, torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # safetensors' SafetensorError, pickle's errors: name the file
            raise AdapterError(
                f"cannot read {str(path)!r} ({type(e).__name__}: {' '.join(str(e).split())}); "
                "the file is truncated or not a tensor file"
            ) from e
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
