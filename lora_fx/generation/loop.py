"""`generate`: token generation on a graph from `capture_for_generation`.

    prefill:  logits = gm(prompt[b, p], mask[b, p], positions[b, p])      cache slots 0..p-1
    decode:   logits = gm(token[b, 1], mask[b, p+t], position[b, 1])      cache slot p+t-1

Rules (each as transformers' `generate` does it, so greedy tokens equal `PeftModel.generate`'s):
1. Left padding: `attention_mask` zeros mark padding; positions are `cumsum(mask) - 1` (1 on pads).
2. A row that produced an EOS token gets `pad_token_id` from then on; generation stops when every
   row has finished or after `max_new_tokens`. The result is `[b, prompt + new]`.
3. `pad_token_id` defaults to the model's, else the first EOS id (transformers does the same).
4. `adapter_names`: one adapter per row for the whole call (`"__base__"` for none); the graph's
   active adapters come back after.
5. Compiled graphs (`torch.compile(gm)`) are called with the growing dimensions marked dynamic, so
   decode compiles once, whatever the prompt length or step.
6. A streamer (transformers' `TextStreamer` or anything with `put` / `end`) gets the prompt, then
   each step's tokens, then `end()`.
7. aLoRA adapters (`alora_invocation_tokens`) act from the prompt's invocation tokens on: the
   offsets are computed once from the prompt and kept for every decode step (PEFT's `generate`),
   then the graph's previous offsets come back. With `adapter_names`, each row's offsets come
   from its own adapter's invocation tokens (plain LoRA rows: every position).
8. Everything is checked before any work: a batch or a length over what the graph was captured
   for raises `GenerationError` with the numbers and what to pass instead.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx

from lora_fx.capture.generation import GenerationSpec, generation_spec
from lora_fx.errors import GenerationError
from lora_fx.generation.sampling import check_sampling, next_tokens
from lora_fx.passes._alora import prompt_offsets
from lora_fx.passes.mixed_batch import adapter_batch

__all__ = ["generate"]

log = logging.getLogger(__name__)


@torch.no_grad()
def generate(
    gm: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int = 20,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    generator: torch.Generator | None = None,
    adapter_names: Sequence[str] | None = None,
    streamer: Any = None,
) -> torch.Tensor:
    """Generate tokens with the graph's KV cache: prompt + new tokens, like `model.generate`.

    Args:
        gm: A graph from `lora_fx.capture_for_generation` (with adapters or not), or
            `torch.compile` of one.
        input_ids: [batch, prompt] token ids, left-padded when prompts differ in length.
        attention_mask: [batch, prompt], 0 on padding; all ones when omitted.
        max_new_tokens: The most tokens to add per row.
        do_sample: Sample instead of taking the most likely token.
        temperature: Sampling temperature (> 0).
        top_k: Keep the k most likely tokens when sampling (None: all).
        top_p: Keep the smallest set of tokens whose probability reaches top_p (None: all).
        eos_token_id: Token id(s) that end a row; the model's by default.
        pad_token_id: Fills a row after its EOS; the model's, else the first EOS id.
        generator: The random generator for sampling (the global one when None).
        adapter_names: One adapter name per row (`"__base__"`: none) for this call.
        streamer: An object with `put(tokens)` and `end()`, e.g. transformers' `TextStreamer`.

    Returns:
        A LongTensor [batch, prompt + generated], padded with `pad_token_id` after EOS.

    Raises:
        GenerationError: The graph has no KV cache, or the batch / prompt + max_new_tokens is over
            what it was captured for.
        ValueError: A bad mask shape or sampling setting.

    Example:
        >>> gm = lora_fx.capture_for_generation(model, max_batch_size=2, max_cache_len=128)
        >>> out = lora_fx.generate(gm, ids, attention_mask=mask, max_new_tokens=32)
    """
    graph = _graph_of(gm)
    spec = _require_spec(graph)
    attention_mask = _checked_inputs(spec, input_ids, attention_mask, max_new_tokens)
    check_sampling(temperature, top_k, top_p)
    eos = _eos_ids(spec, eos_token_id)
    pad = pad_token_id if pad_token_id is not None else spec.pad_token_id
    if pad is None:
        pad = eos[0] if eos else 0
    if adapter_names is not None and len(adapter_names) != input_ids.shape[0]:
        raise GenerationError(
            f"adapter_names has {len(adapter_names)} names for a batch of "
            f"{input_ids.shape[0]} rows; pass one name per row"
        )
    rows = (
        contextlib.nullcontext()
        if adapter_names is None
        else adapter_batch(graph, list(adapter_names))
    )
    choice = dict(
        do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator
    )
    was_training = graph.training
    graph.eval()
    try:
        with rows, prompt_offsets(graph, input_ids):  # rule 7 (no-op without aLoRA rows)
            return _loop(
                gm, spec, input_ids, attention_mask, max_new_tokens, eos, pad, streamer, choice
            )
    finally:
        graph.train(was_training)


def _loop(
    gm: Any,
    spec: GenerationSpec,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int,
    eos: tuple[int, ...],
    pad: int,
    streamer: Any,
    choice: dict[str, Any],
) -> torch.Tensor:
    """Prefill, then one decode step per token (rules 1, 2, 5, 6)."""
    device = input_ids.device
    mask = attention_mask.to(torch.long)
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    eos_ids = torch.tensor(eos, device=device, dtype=input_ids.dtype)
    unfinished = torch.ones(input_ids.shape[0], dtype=torch.bool, device=device)
    tokens = [input_ids]
    if streamer is not None:
        streamer.put(input_ids.cpu())
    logits = _call(gm, input_ids, mask, positions, prefill=True)
    for step in range(max_new_tokens):
        new = next_tokens(logits[:, -1, :], **choice)
        new = torch.where(unfinished, new, torch.full_like(new, pad))
        tokens.append(new[:, None])
        if streamer is not None:
            streamer.put(new.cpu())
        if eos:
            unfinished &= ~torch.isin(new, eos_ids)
        if step == max_new_tokens - 1 or not bool(unfinished.any()):
            break
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        position = mask.sum(-1, keepdim=True) - 1
        logits = _call(gm, new[:, None], mask, position, prefill=False)
    if streamer is not None:
        streamer.end()
    return torch.cat(tokens, dim=1)


def _call(
    gm: Any, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, *, prefill: bool
) -> torch.Tensor:
    """One graph call; growing dimensions marked dynamic for torch.compile (rule 5)."""
    torch._dynamo.maybe_mark_dynamic(mask, 1)
    if prefill:
        torch._dynamo.maybe_mark_dynamic(ids, 1)
        torch._dynamo.maybe_mark_dynamic(positions, 1)
    return gm(ids, mask, positions)


def _graph_of(gm: Any) -> torch.fx.GraphModule:
    """The GraphModule behind `gm` (itself, or the one `torch.compile` wrapped)."""
    inner = getattr(gm, "_orig_mod", gm)
    if not isinstance(inner, torch.fx.GraphModule):
        raise TypeError(
            f"generate() needs a graph from lora_fx.capture_for_generation, got {type(gm).__name__}"
        )
    return inner


def _require_spec(graph: torch.fx.GraphModule) -> GenerationSpec:
    """The graph's generation spec, or an error pointing at `capture_for_generation`."""
    spec = generation_spec(graph)
    if spec is None:
        raise GenerationError(
            "this graph has no KV cache: generate() needs a graph from "
            "lora_fx.capture_for_generation(model, max_batch_size=..., max_cache_len=...); "
            "a graph from lora_fx.capture recomputes the whole sequence for every token"
        )
    return spec


def _checked_inputs(
    spec: GenerationSpec,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    max_new_tokens: int,
) -> torch.Tensor:
    """The attention mask (ones when omitted), after every size check (rule 7)."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError(
            "input_ids must be a [batch, prompt] LongTensor, got "
            f"{getattr(input_ids, 'shape', type(input_ids).__name__)}"
        )
    if input_ids.dtype not in (torch.long, torch.int):
        raise ValueError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int):
        raise TypeError(f"max_new_tokens must be an int, got {type(max_new_tokens).__name__}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    batch, prompt = input_ids.shape
    if prompt < 1:
        raise ValueError("input_ids has no tokens; pass a prompt of at least one token")
    if batch > spec.max_batch_size:
        raise GenerationError(
            f"a batch of {batch} prompts is over this graph's "
            f"max_batch_size={spec.max_batch_size}; split the batch or capture again with "
            f"max_batch_size>={batch}"
        )
    if prompt + max_new_tokens > spec.max_cache_len:
        raise GenerationError(
            f"prompt ({prompt} tokens) + max_new_tokens ({max_new_tokens}) = "
            f"{prompt + max_new_tokens} is over this graph's max_cache_len={spec.max_cache_len}; "
            f"pass max_new_tokens<={spec.max_cache_len - prompt} or capture again with "
            f"max_cache_len>={prompt + max_new_tokens}"
        )
    if attention_mask is None:
        return torch.ones_like(input_ids)
    if tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)}; expected the shape of "
            f"input_ids {tuple(input_ids.shape)}"
        )
    if bool((attention_mask[:, -1] == 0).any()):
        raise ValueError(
            "attention_mask has padding at the end of a row; generation needs left padding "
            "(tokenizer.padding_side = 'left')"
        )
    return attention_mask


def _eos_ids(spec: GenerationSpec, eos_token_id: int | Sequence[int] | None) -> tuple[int, ...]:
    """The EOS ids to stop on: the caller's, else the model's."""
    if eos_token_id is None:
        return spec.eos_token_id
    if isinstance(eos_token_id, int):
        return (eos_token_id,)
    return tuple(int(i) for i in eos_token_id)
