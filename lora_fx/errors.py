"""Exceptions raised by lora_fx.

Each derives from `LoraFxError` and from the builtin a caller would expect, so `except ValueError`
still catches a bad config and `except RuntimeError` a failed capture.
"""

from __future__ import annotations

__all__ = [
    "AdapterError",
    "CalibrationError",
    "CaptureError",
    "ConfigError",
    "GenerationError",
    "LoraFxError",
    "MergeError",
    "NoTargetMatchedError",
    "NotAGraphModuleError",
    "OnnxExportError",
    "ReplicationError",
    "UnsupportedSiteError",
]


class LoraFxError(Exception):
    """Base class of every error lora_fx raises on purpose."""


class ConfigError(LoraFxError, ValueError):
    """A `LoraConfig` field has a value that is not allowed."""


class CalibrationError(LoraFxError, ValueError):
    """Calibration batches (EVA, CorDA) are missing, empty, or do not fit the graph's inputs."""


class CaptureError(LoraFxError, RuntimeError):
    """A model could not be captured as a GraphModule."""


class NoTargetMatchedError(LoraFxError, ValueError):
    """`target_modules` (or `modules_to_save`) matched nothing in the graph."""


class NotAGraphModuleError(LoraFxError, TypeError):
    """A pass was given an `nn.Module` or `ExportedProgram` where it needs a captured graph."""


class UnsupportedSiteError(LoraFxError, ValueError):
    """A matched site cannot carry the requested adapter (e.g. rank not divisible by groups)."""


class AdapterError(LoraFxError, ValueError):
    """An adapter name, adapter file or adapter tensor does not fit the graph."""


class MergeError(LoraFxError, ValueError, RuntimeError):
    """Merging or unloading failed; the weights were left as they were.

    A `ValueError` as PEFT's `safe_merge` error is (code written for PEFT catches that), and still
    a `RuntimeError` for code written against earlier lora_fx.
    """


class ReplicationError(ConfigError):
    """`layer_replication` cannot be applied: bad ranges, or no chain of repeated blocks."""


class OnnxExportError(LoraFxError, RuntimeError):
    """A graph could not be exported to ONNX, or the file could not be written."""


class GenerationError(LoraFxError, ValueError):
    """`generate` cannot run: a graph without a KV cache, or a batch or length over its capacity."""
