"""Text generation on graphs captured with a KV cache (`capture_for_generation`)."""

from lora_fx.generation.loop import generate

__all__ = ["generate"]
