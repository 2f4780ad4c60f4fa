"""The `lora-fx` command line: folder commands, the ONNX export command, the demo."""

from lora_fx.cli.main import main

__all__ = ["main"]
