"""Next-token choice from logits, as Hugging Face `generate` does it (pure tensor functions).

    greedy:   argmax(logits)
    sampling: logits / temperature -> top-k -> top-p -> softmax -> multinomial

Rules:
1. The order and the edge rules are transformers' `TemperatureLogitsWarper`, `TopKLogitsWarper`,
   `TopPLogitsWarper` (min_tokens_to_keep=1), so a seeded run draws the same tokens as
   `model.generate(do_sample=True, ...)` under the same seed.
2. Scores are float32 whatever the model's dtype (transformers upcasts the last logits too).
"""

from __future__ import annotations

import torch

__all__ = ["check_sampling", "next_tokens", "warp"]


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """ValueError for a temperature, top_k or top_p transformers would refuse."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a float, got {type(temperature).__name__}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}; use do_sample=False")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")


def warp(
    scores: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None
) -> torch.Tensor:
    """Temperature, then top-k, then top-p; filtered tokens get -inf.  scores: [b, vocab]."""
    if temperature != 1.0:
        scores = scores / temperature
    if top_k is not None:
        k = min(top_k, scores.shape[-1])
        kth = torch.topk(scores, k)[0][..., -1, None]
        scores = scores.masked_fill(scores < kth, -float("inf"))
    if top_p is not None and top_p < 1.0:
        ascending, order = torch.sort(scores, descending=False)
        cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative <= (1 - top_p)
        drop[..., -1:] = False  # keep at least one token
        scores = scores.masked_fill(drop.scatter(1, order, drop), -float("inf"))
    return scores


def next_tokens(
    logits: torch.Tensor,
    *,
    do_sample: bool,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One token per row from the last position's logits [b, vocab] -> [b]."""
    scores = logits.to(torch.float32)
    if not do_sample:
        return scores.argmax(dim=-1)
    probs = warp(scores, temperature, top_k, top_p).softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)
