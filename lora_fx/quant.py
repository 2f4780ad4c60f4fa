"""bitsandbytes weights as lora_fx sees them: read, dequantize, re-quantize, and the graph ops.

A quantized base weight is a bitsandbytes `Params4bit` (NF4 / FP4, optionally double-quantized
absmax) or `Int8Params` (row-wise absmax int8). Sites reach them two ways:

1. `call_module` of a user's `bnb.nn.Linear4bit` / `Linear8bitLt` (captured with `method="fx"`;
   both subclass `nn.Linear`, so they are ordinary linear sites);
2. `call_function` `linear_4bit(x, W, b)` / `linear_8bit(x, W, b)` nodes made by the `quantize`
   pass from a full-precision capture.

Everything here is plain tensor code (no graph); bitsandbytes is imported only when needed, so
lora_fx works without it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = [
    "SUPPORTED_QUANT_TYPES",
    "dequantize",
    "is_quantized",
    "linear_4bit",
    "linear_8bit",
    "logical_dtype",
    "logical_shape",
    "quant_type",
    "quantize_weight",
    "requantize_",
    "requires_bitsandbytes",
    "restore_",
    "snapshot",
    "storage_bytes",
]

SUPPORTED_QUANT_TYPES = ("nf4", "fp4", "int8")
_4BIT_CLASS, _8BIT_CLASS = "Params4bit", "Int8Params"


def requires_bitsandbytes() -> None:
    """Raise a clear ImportError when bitsandbytes is missing."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        raise ImportError(
            "quantized bases need bitsandbytes: pip install 'lora_fx[bnb]' (bitsandbytes>=0.45; "
            "0.50 runs on CPU)"
        ) from e


def is_quantized(weight: Any) -> bool:
    """Whether `weight` is a bitsandbytes quantized parameter (checked without importing bnb)."""
    return type(weight).__name__ in (_4BIT_CLASS, _8BIT_CLASS) and type(
        weight
    ).__module__.startswith("bitsandbytes")


def quant_type(weight: Any) -> str | None:
    """`"nf4"`, `"fp4"`, `"int8"` (or another type bitsandbytes reports); None if not quantized."""
    if not is_quantized(weight):
        return None
    if type(weight).__name__ == _8BIT_CLASS:
        return "int8"
    state = weight.quant_state
    return state.quant_type if state is not None else weight.quant_type


def logical_shape(weight: torch.Tensor) -> tuple[int, ...]:
    """The shape the weight has as a matrix (`[out, in]`), not its packed storage's."""
    if type(weight).__name__ == _4BIT_CLASS and weight.quant_state is not None:
        return tuple(weight.quant_state.shape)
    return tuple(weight.shape)


def logical_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype the weight computes in: the 4-bit state's dtype; float32 for int8."""
    if type(weight).__name__ == _4BIT_CLASS and weight.quant_state is not None:
        return weight.quant_state.dtype
    if is_quantized(weight):
        return torch.float32
    return weight.dtype


def dequantize(weight: torch.Tensor, module: nn.Module | None = None) -> torch.Tensor:
    """The full-precision `[out, in]` value of a quantized weight (float32 for int8).

    Args:
        weight: A `Params4bit` or `Int8Params`.
        module: The `Linear8bitLt` owning an int8 weight: after its first forward, bitsandbytes
            keeps the row scales on `module.state`, not on the weight.
    """
    import bitsandbytes.functional as bnbf

    if type(weight).__name__ == _4BIT_CLASS:
        data, state = weight.data, weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):  # Linear4bit's AVX512-BF16 eval layout
            data, state = bnbf._convert_weight_packed_for_cpu_inverse(data, state)
        return bnbf.dequantize_4bit(data, state)
    scales = _int8_scales(weight, module)
    return bnbf.int8_vectorwise_dequant(weight.data, scales.to(weight.device))


def requantize_(weight: torch.Tensor, value: torch.Tensor, module: nn.Module | None = None) -> None:
    """Quantize `value` into `weight` in place, with the weight's own settings.

    The Parameter object stays (every graph and module reference sees the new value); its storage
    and quantization state are replaced. 4-bit: same block size, quant type, double quant and
    compute dtype. int8: row-wise absmax, as `Int8Params` does on `.to(device)`.
    """
    import bitsandbytes.functional as bnbf

    with torch.no_grad():
        if type(weight).__name__ == _4BIT_CLASS:
            state = weight.quant_state
            packed, new_state = bnbf.quantize_4bit(
                value.to(weight.device, state.dtype).contiguous(),
                blocksize=state.blocksize,
                compress_statistics=weight.compress_statistics,
                quant_type=weight.quant_type,
                quant_storage=weight.quant_storage,
            )
            weight.data, weight.quant_state = packed, new_state
            return
        rows, scales, _ = bnbf.int8_vectorwise_quant(
            value.to(weight.device, torch.float16).contiguous()
        )
        weight.data, weight.CB, weight.SCB = rows, rows, scales
        if module is not None and getattr(module, "state", None) is not None:
            module.state.reset_grads()  # Linear8bitLt re-reads CB / SCB from the weight next call


def snapshot(weight: torch.Tensor, module: nn.Module | None = None) -> tuple[Any, ...]:
    """What `restore_` needs to put the weight back bitwise.

    References, not copies: `requantize_` replaces the storage instead of writing into it.
    """
    if type(weight).__name__ == _4BIT_CLASS:
        return (weight.data, weight.quant_state)
    return (weight.data, _int8_scales(weight, module))


def restore_(weight: torch.Tensor, saved: tuple[Any, ...], module: nn.Module | None = None) -> None:
    """Put back a `snapshot`."""
    if type(weight).__name__ == _4BIT_CLASS:
        weight.data, weight.quant_state = saved
        return
    weight.data, weight.CB, weight.SCB = saved[0], saved[0], saved[1]
    if module is not None and getattr(module, "state", None) is not None:
        module.state.reset_grads()


def storage_bytes(weight: torch.Tensor, module: nn.Module | None = None) -> int:
    """Bytes a weight really occupies: packed codes plus scales (and double-quant statistics)."""
    tensor_bytes = weight.data.numel() * weight.data.element_size()
    if type(weight).__name__ == _4BIT_CLASS:
        state = weight.quant_state
        extra = [state.absmax, state.code]
        if state.nested:
            extra += [state.state2.absmax, state.state2.code, state.offset]
        return tensor_bytes + sum(t.numel() * t.element_size() for t in extra if t is not None)
    if type(weight).__name__ == _8BIT_CLASS:
        scales = _int8_scales(weight, module)
        return tensor_bytes + scales.numel() * scales.element_size()
    return tensor_bytes


def quantize_weight(
    weight: torch.Tensor,
    quant_type: str,
    *,
    blocksize: int = 64,
    compress_statistics: bool = True,
    compute_dtype: torch.dtype | None = None,
) -> nn.Parameter:
    """A frozen bitsandbytes parameter holding `weight[out, in]` quantized.

    Equal, bit for bit, to what `bnb.nn.Linear4bit` / `Linear8bitLt` store for the same weight
    (`Params4bit(w, ...).to(device)` runs the same `quantize_4bit`).

    Raises:
        ValueError: `quant_type` is not one of `SUPPORTED_QUANT_TYPES`.
    """
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    if quant_type not in SUPPORTED_QUANT_TYPES:
        raise ValueError(
            f"quant_type={quant_type!r} is not supported; supported: {list(SUPPORTED_QUANT_TYPES)}"
        )
    w = weight.detach().to(compute_dtype or weight.dtype).contiguous()
    if quant_type == "int8":
        rows, scales, _ = bnbf.int8_vectorwise_quant(w.to(torch.float16))
        return bnb.nn.Int8Params(
            rows, requires_grad=False, has_fp16_weights=False, CB=rows, SCB=scales
        )
    packed, state = bnbf.quantize_4bit(
        w, blocksize=blocksize, compress_statistics=compress_statistics, quant_type=quant_type
    )
    return bnb.nn.Params4bit(
        packed,
        requires_grad=False,
        quant_state=state,
        blocksize=blocksize,
        compress_statistics=compress_statistics,
        quant_type=quant_type,
        bnb_quantized=True,
    )


# ---------------------------------------------------------------- graph ops (call_function targets)


def linear_4bit(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """`x @ W.T + b` on 4-bit storage, as `bnb.nn.Linear4bit.forward` computes it."""
    import bitsandbytes as bnb

    dtype = weight.quant_state.dtype
    if bias is not None:
        bias = bias.to(dtype)
    out = bnb.matmul_4bit(x.to(dtype), weight, bias=bias, quant_state=weight.quant_state)
    return out.to(x.dtype)


def linear_8bit(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """`x @ W.T + b` on int8 storage, as `bnb.nn.Linear8bitLt.forward` (threshold 0) computes it."""
    import bitsandbytes as bnb
    from bitsandbytes.autograd._functions import MatmulLtState

    state = MatmulLtState()
    state.CB, state.SCB = weight.data, weight.SCB
    state.has_fp16_weights, state.is_training = False, False
    if bias is not None:
        bias = bias.to(x.dtype)
    return bnb.matmul(x, weight, bias=bias, state=state)


def _int8_scales(weight: torch.Tensor, module: nn.Module | None) -> torch.Tensor:
    """Row scales of an int8 weight: on the weight, or on its Linear8bitLt's state."""
    scales = getattr(weight, "SCB", None)
    if scales is None and module is not None and getattr(module, "state", None) is not None:
        scales = module.state.SCB
    if scales is None:
        raise ValueError("int8 weight has no row scales (SCB); was it quantized?")
    return scales
