"""bitsandbytes weights as lora_fx sees them: read, dequantize, re-quantize, and the graph ops.

A quantized base weight is a bitsandbytes `Params4bit` (NF4 / FP4, optionally double-quantized
absmax) or `Int8Params` (row-wise absmax int8). Sites reach them two ways:

1. `call_module` of a user's `bnb.nn.Linear4bit` / `Linear8bitLt` (captured with `method="fx"`;
   both subclass `nn.Linear`, so they are ordinary linear sites);
2. `call_function` `linear_4bit(x, W, b)` / `linear_8bit(x, W, b)` nodes made by the `quantize`
   pass from a full-precision capture.

Everything here is plain tensor code (no graph); bitsandbytes is imported only when needed, so
lora_fx works without it.

bitsandbytes on CPUs with AVX512-BF16 (recent Xeons; bitsandbytes 0.50):
1. `Linear4bit.__init__` sets `support_avx512bf16_for_cpu = has_avx512bf16()`. When it is set,
   `Linear4bit.forward` on a CPU input, in eval, with an input that needs no grad, rewrites its
   weight in place into a packed layout (`quant_state.packing_format_for_cpu = True`): absmax
   dequantized (double quant undone) and rounded to bfloat16, `quant_state.dtype = bfloat16`.
   From then on `matmul_4bit` runs the packed kernel `gemv_4bit`, which computes in bfloat16
   (about 3e-3 from the float32 result on O(1) outputs).
2. The layout needs `out_features % 32 == 0` (`AssertionError: N must be divisible by block_n`)
   and `in_features % blocksize == 0` (a `RuntimeError` reshaping the absmax); bitsandbytes does
   not check first, so such a layer cannot run in eval at all.
3. `matmul_4bit` takes the packed kernel for every later call, in training too; the kernel has no
   backward: the input's gradient is dropped (no bias) or the call raises (bias).
4. Its inverse (`Linear4bit.state_dict`, `.cuda()`) re-quantizes a double-quantized absmax and
   leaves a plain absmax in the packed `[in / blocksize, out]` order (wrong values);
   `dequantize_4bit` (PEFT's merge and DoRA) does not know the layout at all.
5. The packed kernel is registered only where `has_avx512bf16()` holds at import: elsewhere the
   layout is never made and cannot be run.

So lora_fx never computes on the packed layout: the `quantize` pass's weights belong to no
`Linear4bit` (nothing packs them; `linear_4bit` computes in the compute dtype on every CPU and any
shape), and `capture(method="fx")` gives the graph its own copy of each `Linear4bit` (`plain_copy`)
that does not pack and unpacks a weight the user's model packed. Functions here read a packed weight
exactly (`dequantize`, `unpack_`), and `requantize_` writes the plain layout.
"""

from __future__ import annotations

import collections
import copy
import sys
from typing import Any

import torch
from torch import nn

from lora_fx.core.quiet import dropping_bitsandbytes_notice

__all__ = [
    "SUPPORTED_QUANT_TYPES",
    "dequantize",
    "is_packed",
    "is_quantized",
    "linear_4bit",
    "linear_8bit",
    "logical_dtype",
    "logical_shape",
    "plain_copy",
    "quant_type",
    "quantize_weight",
    "requantize_",
    "requires_bitsandbytes",
    "restore_",
    "snapshot",
    "storage_bytes",
    "unpack_",
]

SUPPORTED_QUANT_TYPES = ("nf4", "fp4", "int8")
_4BIT_CLASS, _8BIT_CLASS = "Params4bit", "Int8Params"


def requires_bitsandbytes() -> Any:
    """`import bitsandbytes`, for lora_fx code that may be the first to import it.

    Its CPU backend's notice that the optional `kernels` package is missing is dropped while
    importing (`core.quiet`): bitsandbytes falls back to its own kernel, nothing to act on.
    Code given a bitsandbytes tensor imports it plainly: it is loaded already.

    Returns:
        The `bitsandbytes` module.

    Raises:
        ImportError: bitsandbytes is not installed (the message says how to install it).
    """
    if "bitsandbytes" in sys.modules:
        return sys.modules["bitsandbytes"]
    try:
        with dropping_bitsandbytes_notice():
            import bitsandbytes
    except ImportError as e:
        raise ImportError(
            "quantized bases need bitsandbytes: pip install 'lora_fx[bnb]' (bitsandbytes>=0.45; "
            "0.50 runs on CPU)"
        ) from e
    return bitsandbytes


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
    """The dtype the weight computes in: the 4-bit state's dtype; float32 for int8.

    For a packed weight, the dtype it had before bitsandbytes packed it (packing sets bfloat16).
    """
    if type(weight).__name__ == _4BIT_CLASS and weight.quant_state is not None:
        state = weight.quant_state
        return state.original_dtype if is_packed(weight) else state.dtype
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
        if is_packed(weight):  # the value the packed kernel computes with; weight left packed
            data, state = _plain_layout(data, state)
        return bnbf.dequantize_4bit(data, state)
    scales = _int8_scales(weight, module)
    return bnbf.int8_vectorwise_dequant(weight.data, scales.to(weight.device))


def requantize_(weight: torch.Tensor, value: torch.Tensor, module: nn.Module | None = None) -> None:
    """Quantize `value` into `weight` in place, with the weight's own settings.

    The Parameter object stays (every graph and module reference sees the new value); its storage
    and quantization state are replaced. 4-bit: same block size, quant type, double quant and
    compute dtype, in bitsandbytes' plain layout (also when the weight was packed). int8: row-wise
    absmax, as `Int8Params` does on `.to(device)`.
    """
    import bitsandbytes.functional as bnbf

    with torch.no_grad():
        if type(weight).__name__ == _4BIT_CLASS:
            state = weight.quant_state
            packed, new_state = bnbf.quantize_4bit(
                value.to(weight.device, logical_dtype(weight)).contiguous(),
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

    References, not copies: `requantize_` replaces the storage and state instead of writing into
    them. (bitsandbytes' packing rewrites the state object in place, but only the weight's current
    one; after `requantize_` that is no longer the saved one.)
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
    """Bytes a weight really occupies: 4-bit codes plus scales (and double-quant statistics).

    A weight in bitsandbytes' packed CPU layout counts its bfloat16 absmax as it is stored.
    """
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
    bnb = requires_bitsandbytes()
    bnbf = bnb.functional
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
    """`x @ W.T + b` on 4-bit storage, as `bnb.nn.Linear4bit.forward` computes it.

    With the plain layout `matmul_4bit` dequantizes and multiplies in the compute dtype, on every
    CPU and for any shape; the `quantize` pass's weights belong to no `Linear4bit`, so bitsandbytes
    never packs them (see the module docstring).
    """
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


# ---------------------------------------------------- bitsandbytes' packed CPU layout (AVX512-BF16)


def is_packed(weight: Any) -> bool:
    """Whether a 4-bit weight is in the layout `Linear4bit` packs it into on AVX512-BF16 CPUs."""
    state = getattr(weight, "quant_state", None) if type(weight).__name__ == _4BIT_CLASS else None
    return bool(getattr(state, "packing_format_for_cpu", False))


def unpack_(weight: torch.Tensor) -> bool:
    """Put a packed 4-bit weight back into bitsandbytes' plain layout, in place, value for value.

    The absmax stays as packing rounded it (bfloat16 values, stored as float32, no double quant),
    so the weight computes what the packed kernel did, but in the compute dtype.

    Returns:
        Whether the weight was packed.
    """
    if not is_packed(weight):
        return False
    weight.data, weight.quant_state = _plain_layout(weight.data, weight.quant_state)
    return True


def plain_copy(module: nn.Module) -> nn.Module:
    """A copy of a bitsandbytes `Linear4bit` that never computes on the packed CPU layout.

    It shares parameters, buffers and children with `module` (the user's model is not changed),
    turns bitsandbytes' packing off (`support_avx512bf16_for_cpu = False`), and unpacks, before
    each call, a shared weight the user's own module has packed meanwhile. So the layer runs
    `matmul_4bit` in its compute dtype on every CPU: any `out_features` / `in_features`, training
    after eval keeps its gradients, and results do not depend on the CPU. The cost: eval on an
    AVX512-BF16 CPU does not use the faster bfloat16 kernel.
    """
    clone = copy.copy(module)
    clone._parameters = dict(module._parameters)
    clone._buffers = dict(module._buffers)
    clone._modules = dict(module._modules)
    clone._forward_pre_hooks = collections.OrderedDict(module._forward_pre_hooks)
    clone.support_avx512bf16_for_cpu = False
    clone.register_forward_pre_hook(_unpack_before_forward)
    return clone


def _unpack_before_forward(module: nn.Module, args: tuple[Any, ...]) -> None:
    """Forward pre-hook of `plain_copy`: unpack the weight if it is packed."""
    unpack_(module.weight)


def _plain_layout(data: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
    """Codes and a new state in the plain layout for a packed weight; `state` is not changed.

    bitsandbytes' own inverse restores the codes but re-quantizes a double-quantized absmax and
    leaves a plain one in packed order; so take only its codes and reorder the absmax here.
    """
    import bitsandbytes.functional as bnbf

    plain = copy.copy(state)
    plain.original_nested = False  # keep the absmax as it is, without a second quantization
    codes, plain = bnbf._convert_weight_packed_for_cpu_inverse(data, plain)
    # absmax: packed as [in / blocksize, out] bfloat16; plain: block order of [out, in], float32
    plain.absmax = state.absmax.T.reshape(-1).float().contiguous()
    return codes, plain


def _int8_scales(weight: torch.Tensor, module: nn.Module | None) -> torch.Tensor:
    """Row scales of an int8 weight: on the weight, or on its Linear8bitLt's state."""
    scales = getattr(weight, "SCB", None)
    if scales is None and module is not None and getattr(module, "state", None) is not None:
        scales = module.state.SCB
    if scales is None:
        raise ValueError("int8 weight has no row scales (SCB); was it quantized?")
    return scales
