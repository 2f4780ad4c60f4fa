"""aLoRA's per-row offsets and the position mask its branch output is multiplied by.

    offsets[b] = T_ids - start_b         start_b: where the *last* invocation sequence of row b
                                          begins (0: not found, the row gets no adapter)
    mask[b, t] = t >= T - min(offsets[b], T)          T: the tokens of the current call

Offsets count from the end of the row, as PEFT's `calculate_alora_offsets` does, so left padding
does not move them and a decode step (T = 1) of a row that found its invocation sequence in the
prompt is adapted (PEFT's `ALoraLinearVariant.forward` clips the offset to T the same way).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["alora_mask", "alora_offsets"]


def alora_offsets(input_ids: torch.Tensor, invocation_tokens: Sequence[int]) -> torch.Tensor:
    """`[batch]` offsets from the end of each row to its last invocation sequence; 0 if absent.

    PEFT's `calculate_alora_offsets` with its `None` written as 0 (both mean: base model only).
    """
    ids = input_ids.reshape(1, -1) if input_ids.dim() == 1 else input_ids
    n, seq = len(invocation_tokens), ids.shape[-1]
    offsets = torch.zeros(ids.shape[0], dtype=torch.long, device=ids.device)
    if n > seq:
        return offsets
    pattern = torch.as_tensor(list(invocation_tokens), dtype=ids.dtype, device=ids.device)
    # found[b, s]: the sequence starts at s in row b;  windows: [batch, seq - n + 1, n]
    found = (ids.unfold(-1, n, 1) == pattern).all(-1)
    starts = torch.arange(found.shape[-1], device=ids.device)
    last = torch.where(found, starts, -1).amax(-1)  # -1: not found
    return torch.where(last >= 0, seq - last, offsets)


def alora_mask(offsets: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """1 on the positions of `out` [batch, T, ..] at or after each row's invocation, else 0.

    `offsets` is `[batch]` (0: no adapter on the row); an empty one means none were set, so no
    row is adapted (PEFT's `alora_offsets=None`). Shaped `out.shape[:-1] + (1,)`, in `out`'s dtype;
    a site that flattened the batch (`[batch * T, features]`) gets each row's mask repeated, and a
    2-D `[batch, features]` output counts as T = 1, as in PEFT.
    """
    shape = (*out.shape[:-1], 1)
    if offsets.numel() == 0:
        return out.new_zeros(shape)
    rows = math.prod(out.shape[:-1])  # not Size.numel(): it would make symbolic sizes static
    torch._check(  # no tensor in the message's closure: torch.compile keeps one graph
        rows % offsets.shape[0] == 0,
        lambda: (
            "aLoRA: the offsets were set for another batch size; call "
            "lora_fx.set_alora_offsets(gm, input_ids) for this batch"
        ),
    )
    seq = rows // offsets.shape[0]
    start = seq - offsets.clamp(max=seq)  # [batch]
    mask = torch.arange(seq, device=out.device) >= start[:, None]  # [batch, T]
    return mask.to(out.dtype).reshape(shape)
