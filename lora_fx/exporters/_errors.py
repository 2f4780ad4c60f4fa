"""The exporters' error (to move into `lora_fx/errors.py` beside the others)."""

from __future__ import annotations

from lora_fx.errors import LoraFxError

__all__ = ["OnnxExportError"]


class OnnxExportError(LoraFxError, RuntimeError):
    """A graph could not be exported to ONNX, or the file could not be written."""
