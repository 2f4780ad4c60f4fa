"""Capture: a model becomes a GraphModule every pass can work on (torch.export or fx)."""

from lora_fx.capture.generation import capture_for_generation
from lora_fx.capture.trace import as_graph_module, capture

__all__ = ["as_graph_module", "capture", "capture_for_generation"]
