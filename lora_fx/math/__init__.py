"""Tensor math: LoRA deltas, fused branch ops, DoRA, adapter combination, inits, bitsandbytes.

Tensors in, tensors out: no graph, no state record.
"""

__all__: list[str] = []
