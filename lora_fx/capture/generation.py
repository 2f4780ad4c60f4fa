"""Capture a decoder-only transformers LM with a static KV cache, for `lora_fx.generate`.

    gm(input_ids[b, s], attention_mask[b, k], position_ids[b, s]) -> logits[b, s, vocab]

    * the cache is one pair of buffers per layer on the graph, `lora_fx_kv_cache.key_<i>` /
      `value_<i>`, each [max_batch_size, kv_heads, max_cache_len, head_dim], written in place
      (`index_put_` on the whole buffer, rows 0..b-1) at slots k-s .. k-1;
    * `attention_mask` is the 2D padding mask of every token seen so far, this call's included
      (k = tokens in the cache after the call), as `model.generate` and onnxruntime-genai pass it;
    * one graph serves prefill (s = prompt length) and decode (s = 1): batch, s and k are dynamic.

Rules and edge cases:
1. Parameter and site names are the model's own (`model.layers.0.self_attn.q_proj`), so every pass
   and PEFT's adapter files work on this graph unchanged; the wrapper's prefix is stripped.
2. Attention is `scaled_dot_product_attention` over the whole cache with a boolean mask built in
   the graph: causal by slot, padding from `attention_mask`, and a query always sees its own slot
   (a left-pad row would otherwise see nothing: NaN). Grouped-query heads use `enable_gqa`, so no
   op in the graph bakes the cache length into a shape (the ONNX `with_past` rewrite relies on it).
3. The mask's key positions come from the padded mask itself (`cumsum(ones_like(...))`), so the
   ONNX rewrite that swaps the cache for past/present inputs only drops the padding op.
4. Sliding-window models: the window is applied when every layer uses it; mixed layers are refused.
5. The write indexes the whole buffer rather than a batch slice of it: a slice would be written
   back whole (`slice_scatter`) by torch.compile's functionalization, a copy of the cache per
   layer and step (decode at batch 8 took twice as long).
6. The capture runs the model with a lora_fx attention function registered in transformers'
   `AttentionInterface`; the model's own setting is restored afterwards.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from lora_fx.capture.no_grad import inline_no_grad_regions
from lora_fx.capture.trace import _first_line, _trainable_module, capture_record
from lora_fx.core.state import CAPTURE_META
from lora_fx.errors import CaptureError

__all__ = ["CACHE_MODULE", "GENERATION_META", "GenerationSpec", "capture_for_generation"]

log = logging.getLogger(__name__)

GENERATION_META = "lora_fx_generation"
CACHE_MODULE = "lora_fx_kv_cache"
_ATTENTION = "lora_fx_sdpa"
_WRAPPED = "lm"


@dataclass(frozen=True)
class GenerationSpec:
    """What `generate` and the ONNX exporter need to know about a generation graph."""

    max_batch_size: int
    max_cache_len: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    num_attention_heads: int
    hidden_size: int
    vocab_size: int
    model_type: str
    cache_dtype: str
    eos_token_id: tuple[int, ...]
    pad_token_id: int | None
    bos_token_id: int | None
    sliding_window: int | None

    def key_buffer(self, layer: int) -> str:
        """The graph attribute holding layer `layer`'s keys."""
        return f"{CACHE_MODULE}.key_{layer}"

    def value_buffer(self, layer: int) -> str:
        """The graph attribute holding layer `layer`'s values."""
        return f"{CACHE_MODULE}.value_{layer}"

    @property
    def cache_bytes(self) -> int:
        """2 (keys, values) x layers x batch x kv_heads x cache length x head_dim x dtype size."""
        itemsize = torch.empty((), dtype=getattr(torch, self.cache_dtype)).element_size()
        return (
            2
            * self.num_layers
            * self.max_batch_size
            * self.num_kv_heads
            * self.max_cache_len
            * self.head_dim
            * itemsize
        )


def capture_for_generation(
    model: nn.Module,
    *,
    max_batch_size: int = 1,
    max_cache_len: int = 256,
    cache_dtype: torch.dtype | None = None,
) -> torch.fx.GraphModule:
    """Capture a decoder-only transformers LM with a static KV cache as one GraphModule.

    Args:
        model: A transformers `...ForCausalLM` (Llama, Qwen2, Mistral, GPT-2, ...).
        max_batch_size: The most prompts one `generate` call may take.
        max_cache_len: The most tokens (prompt + new) a row may hold.
        cache_dtype: The cache's dtype; the model's parameter dtype by default.

    Returns:
        A GraphModule `gm(input_ids, attention_mask, position_ids) -> logits`, its KV cache in
        buffers; `inject`, `load_adapter`, `merge`, ... work on it; `lora_fx.generate` runs it.

    Raises:
        TypeError: `model` is not a transformers causal LM.
        ValueError: A size is not a positive int, or the model mixes sliding and full attention.
        CaptureError: torch.export failed; the message says why.

    Example:
        >>> gm = lora_fx.capture_for_generation(model, max_batch_size=4, max_cache_len=512)
        >>> lora_fx.load_adapter(gm, "adapter_dir")
        >>> out = lora_fx.generate(gm, ids, attention_mask=mask, max_new_tokens=32)
    """
    config = _causal_lm_config(model)
    for name, value in (("max_batch_size", max_batch_size), ("max_cache_len", max_cache_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    spec = _spec(model, config, max_batch_size, max_cache_len, cache_dtype)
    wrapper = _CachedLM(model, spec)
    example = _example_inputs(spec, model)
    was_training = model.training
    saved_attention = config._attn_implementation
    try:
        model.eval()
        config._attn_implementation = _register_attention()
        program = torch.export.export(
            wrapper, example, dynamic_shapes=_dynamic_shapes(spec), strict=False
        )
    except Exception as e:
        raise CaptureError(
            f"capture_for_generation failed on {type(model).__name__}: "
            f"{type(e).__name__}: {_first_line(e)}"
        ) from e
    finally:
        config._attn_implementation = saved_attention
        model.train(was_training)
    gm = _strip_wrapper(_trainable_module(program.module()))
    inline_no_grad_regions(gm)
    gm.meta[GENERATION_META] = spec
    gm.meta[CAPTURE_META] = capture_record(model, "export")
    gm.eval()
    log.info(
        "capture_for_generation: %s, batch <= %d, cache %d tokens (%.1f MiB) -> %d nodes",
        type(model).__name__,
        max_batch_size,
        max_cache_len,
        spec.cache_bytes / 2**20,
        len(gm.graph.nodes),
    )
    return gm


def generation_spec(gm: Any) -> GenerationSpec | None:
    """The generation spec of a graph from `capture_for_generation`, else None."""
    meta = getattr(gm, "meta", None)
    return meta.get(GENERATION_META) if isinstance(meta, dict) else None


class _GraphCache:
    """The cache object the transformers model calls `update` on, backed by graph buffers.

    Duck-typed after `transformers.Cache`: the model only calls `update` (the 4D mask it gets is
    used as is, so the mask helpers that query a cache never run).
    """

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], slots: torch.Tensor):
        self.keys, self.values, self.slots = keys, values, slots
        self.is_compileable = True
        # read by transformers' mask helpers before they see the mask is already 4D
        self.is_sliding = [False] * len(keys)
        self.is_linear = [False] * len(keys)
        self.is_dummy = [False] * len(keys)

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        cache_kwargs: dict | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this call's keys/values at their slots; return the whole cache of these rows."""
        rows, heads = key_states.shape[0], key_states.shape[1]
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        where = (
            torch.arange(rows, device=keys.device)[:, None, None],
            torch.arange(heads, device=keys.device)[None, :, None],
            self.slots[None, None, :],
        )
        keys.index_put_(where, key_states.to(keys.dtype))
        values.index_put_(where, value_states.to(values.dtype))
        return keys[:rows], values[:rows]


class _CachedLM(nn.Module):
    """The module torch.export captures: mask building, the cache, and the LM's forward."""

    def __init__(self, lm: nn.Module, spec: GenerationSpec) -> None:
        super().__init__()
        setattr(self, _WRAPPED, lm)
        self.spec = spec
        cache = nn.Module()
        shape = (spec.max_batch_size, spec.num_kv_heads, spec.max_cache_len, spec.head_dim)
        dtype = getattr(torch, spec.cache_dtype)
        device = next(lm.parameters()).device
        for i in range(spec.num_layers):
            cache.register_buffer(f"key_{i}", torch.zeros(shape, dtype=dtype, device=device))
            cache.register_buffer(f"value_{i}", torch.zeros(shape, dtype=dtype, device=device))
        setattr(self, CACHE_MODULE, cache)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
    ) -> torch.Tensor:
        """Logits of this call's tokens; the cache gains their keys and values."""
        spec, cache = self.spec, getattr(self, CACHE_MODULE)
        new, seen = input_ids.shape[1], attention_mask.shape[1]
        slots = torch.arange(seen - new, seen, device=input_ids.device)  # this call's cache slots
        mask = causal_padding_mask(attention_mask, slots, spec.max_cache_len, spec.sliding_window)
        graph_cache = _GraphCache(
            [getattr(cache, f"key_{i}") for i in range(spec.num_layers)],
            [getattr(cache, f"value_{i}") for i in range(spec.num_layers)],
            slots,
        )
        out = getattr(self, _WRAPPED)(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=position_ids,
            past_key_values=graph_cache,
            use_cache=True,
        )
        return out.logits


def causal_padding_mask(
    attention_mask: torch.Tensor, slots: torch.Tensor, cache_len: int, window: int | None
) -> torch.Tensor:
    """[b, 1, s, cache_len] bool: key slot j is visible to query slot i (rule 2, 3).

    attention_mask: [b, k] (1 = a real token); slots: [s], the queries' cache slots.
    """
    seen = F.pad(attention_mask.bool(), (0, cache_len - attention_mask.shape[1]))  # [b, L]
    key_slots = torch.cumsum(torch.ones_like(seen[0], dtype=torch.long), 0) - 1  # [L]: 0..L-1
    query_slots = slots[:, None]
    visible = key_slots[None, :] <= query_slots  # causal, [s, L]
    if window is not None:
        visible = visible & (key_slots[None, :] > query_slots - window)
    own = key_slots[None, :] == query_slots
    return (visible[None, None] & seen[:, None, None, :]) | own[None, None]


def _graph_sdpa(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Transformers' attention-function contract, as one SDPA call (rule 2)."""
    for unsupported in ("softcap", "s_aux", "sinks", "position_bias"):
        if kwargs.get(unsupported) is not None:
            raise NotImplementedError(
                f"capture_for_generation: attention with {unsupported!r} is not supported yet"
            )
    out = F.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=attention_mask,
        dropout_p=0.0,
        scale=scaling,
        enable_gqa=query.shape[1] != key.shape[1],
    )
    return out.transpose(1, 2).contiguous(), None


def _register_attention() -> str:
    """Register `_graph_sdpa` with transformers (idempotent); return its name."""
    from transformers import AttentionInterface

    AttentionInterface.register(_ATTENTION, _graph_sdpa)
    return _ATTENTION


def _causal_lm_config(model: Any) -> Any:
    """The transformers config of a decoder-only LM, or a TypeError that says what is expected."""
    config = getattr(model, "config", None)
    if not isinstance(model, nn.Module) or config is None or not hasattr(model, "generate"):
        raise TypeError(
            "capture_for_generation needs a transformers causal LM (e.g. AutoModelForCausalLM), "
            f"got {type(model).__name__}"
        )
    if getattr(config, "is_encoder_decoder", False):
        raise TypeError(
            f"capture_for_generation supports decoder-only LMs; {type(model).__name__} is an "
            "encoder-decoder model"
        )
    return config


def _spec(
    model: nn.Module,
    config: Any,
    max_batch_size: int,
    max_cache_len: int,
    cache_dtype: torch.dtype | None,
) -> GenerationSpec:
    """Sizes and token ids from the config (`get_text_config` for multimodal wrappers)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    dtype = cache_dtype or next(model.parameters()).dtype
    window = getattr(text, "sliding_window", None)
    layer_types = getattr(text, "layer_types", None) or []
    if window is not None and window < max_cache_len:
        sliding = {t == "sliding_attention" for t in layer_types}
        if sliding == {True, False}:
            raise ValueError(
                f"{type(model).__name__} mixes sliding-window ({window}) and full attention "
                "layers; capture_for_generation supports one kind; use max_cache_len <= "
                f"{window}"
            )
        if not getattr(text, "use_sliding_window", True) or sliding == {False}:
            window = None
    else:
        window = None
    generation = getattr(model, "generation_config", None)
    eos = getattr(generation, "eos_token_id", None) or getattr(text, "eos_token_id", None)
    eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
    pad = getattr(generation, "pad_token_id", None)
    pad = pad if pad is not None else getattr(text, "pad_token_id", None)
    return GenerationSpec(
        max_batch_size=max_batch_size,
        max_cache_len=max_cache_len,
        num_layers=text.num_hidden_layers,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        num_attention_heads=heads,
        hidden_size=text.hidden_size,
        vocab_size=text.vocab_size,
        model_type=getattr(text, "model_type", "") or "",
        cache_dtype=str(dtype).removeprefix("torch."),
        eos_token_id=tuple(int(i) for i in eos_ids),
        pad_token_id=None if pad is None else int(pad),
        bos_token_id=getattr(text, "bos_token_id", None),
        sliding_window=window,
    )


def _example_inputs(spec: GenerationSpec, model: nn.Module) -> tuple[torch.Tensor, ...]:
    """A prefill-shaped example (batch 2, 3 tokens, 5 seen) so no dimension specializes."""
    device = next(model.parameters()).device
    batch = min(2, spec.max_batch_size)
    new, seen = min(3, spec.max_cache_len), min(5, spec.max_cache_len)
    ids = torch.zeros(batch, new, dtype=torch.long, device=device)
    mask = torch.ones(batch, seen, dtype=torch.long, device=device)
    positions = torch.arange(seen - new, seen, device=device).expand(batch, -1)
    return ids, mask, positions


def _dynamic_shapes(spec: GenerationSpec) -> dict[str, dict[int, Any]]:
    """Batch up to max_batch_size, new and seen tokens up to max_cache_len."""
    dim = torch.export.Dim
    batch = dim("batch", min=1, max=spec.max_batch_size) if spec.max_batch_size > 1 else None
    new = dim("new_tokens", min=1, max=spec.max_cache_len)
    seen = dim("seen_tokens", min=1, max=spec.max_cache_len)
    rows = {0: batch} if batch is not None else {}
    return {
        "input_ids": {**rows, 1: new},
        "attention_mask": {**rows, 1: seen},
        "position_ids": {**rows, 1: new},
    }


def _strip_wrapper(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Move the LM's modules to the graph's root, so names are the model's own (rule 1)."""
    prefix = f"{_WRAPPED}."
    root = nn.Module()
    for name, child in gm.named_children():
        if name == _WRAPPED:
            for inner, module in child.named_children():
                root.add_module(inner, module)
        else:
            root.add_module(name, child)
    for node in gm.graph.nodes:
        if node.op in ("get_attr", "call_module") and str(node.target).startswith(prefix):
            node.target = node.target[len(prefix) :]
        stack = node.meta.get("nn_module_stack")
        if stack:
            node.meta["nn_module_stack"] = {
                key: (path[len(prefix) :] if path.startswith(prefix) else path, cls)
                for key, (path, cls) in stack.items()
                if path != _WRAPPED
            }
    stripped = torch.fx.GraphModule(root, gm.graph, type(gm).__name__)
    stripped.meta.update(gm.meta)
    return stripped
