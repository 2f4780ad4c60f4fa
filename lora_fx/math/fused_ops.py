"""Tensor functions the fused branch layouts call from graph nodes (tensors in, tensor out).

    add_lora:         y + scale * (x @ A.T) @ B.T   rank-r activations, then one addmm into `y`
    add_low_rank:     y + scale * low @ B.T     as one addmm with `y` as the accumulator
    low_rank_weight:  W + scale * B @ A         the weight a site would have if merged, per call
    weight_for_tokens / add_lora_for_tokens:     the "auto" layout's pair: per call, the delta goes
                      into W when `weight_pays`, else into the output (exactly one of the two acts)

All are plain tensor ops with no data-dependent control flow, so torch.compile, torch.export and
the ONNX exporter trace them into ordinary ATen ops (`addmm`, `view`); eager fx calls them as
functions. Gradients are those of the unfused expressions.
"""

from __future__ import annotations

import torch

__all__ = [
    "WEIGHT_PAYS_FACTOR",
    "add_lora",
    "add_lora_for_tokens",
    "add_low_rank",
    "add_low_rank_out_of_place",
    "low_rank_weight",
    "weight_for_tokens",
    "weight_pays",
]

# `weight_pays` threshold: W + scale * B @ A per call beats the branch once
# tokens * (in + out) >= WEIGHT_PAYS_FACTOR * in * out. At factor 1 the two cost the same FLOPs;
# measured per site on CPU (1 thread, r=8; 256x256 .. 1024x1024 sites, 16..512 tokens) the
# branch's small GEMMs win up to about 1.5x that point (the merged weight is written and read
# once more per call), the weight from there on.
WEIGHT_PAYS_FACTOR = 1.5


def add_lora(
    y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float
) -> torch.Tensor:
    """`y + scale * B(A(x))` for a linear site: the rank-r activations, then one `addmm` into `y`.

    The `addmm` accumulates into `y` with the scale as `alpha`: no output-sized temporaries.
    The activations are computed transposed, `A @ x.T` (`[r, tokens]`): CPU GEMMs with the
    rank as their row count run 1.4-4.9x faster than with it as their column count
    (`benchmarks/bench_rank_gemm.py`), and autograd's `mm` backward keeps that orientation for
    the gradients of A and x (see `_accumulate` for B's side).
    """
    low_t = torch.mm(lora_a, x.reshape(-1, x.shape[-1]).t())
    if not torch.is_grad_enabled() and low_t.dtype == lora_b.dtype == y.dtype:
        # Inference, one dtype: `_accumulate`'s checks and casts cost more dispatcher calls
        # than the rank-r GEMMs themselves at a hundred tokens.
        y.view(-1, y.shape[-1]).addmm_(low_t.t(), lora_b.t(), alpha=scale)
        return y
    return _accumulate(y, low_t.t(), lora_b, scale)


def weight_pays(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor) -> bool:
    """True when this call should read `W + scale * B @ A` rather than run the branch.

    Only for calls autograd does not record (inference): in training the weight form would make
    autograd build the full-size gradient of `W + delta`. Otherwise by token count: the weight
    costs `2 r in out` per call whatever the tokens, the branch `2 r tokens (in + out)`.
    Under torch.compile the comparison is a guard on the token count, so a graph is specialised
    for one side of the threshold (no data-dependent control flow); torch.export always takes
    the branch, so an exported graph keeps a dynamic token count.
    """
    if torch.is_grad_enabled() and (
        x.requires_grad or lora_a.requires_grad or lora_b.requires_grad
    ):
        return False
    if torch.compiler.is_exporting():  # one traced path: no guard on a dynamic token count
        return False
    features_in, features_out = lora_a.shape[-1], lora_b.shape[0]
    tokens = x.numel() // features_in
    return tokens * (features_in + features_out) >= WEIGHT_PAYS_FACTOR * features_in * features_out


def weight_for_tokens(
    weight: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    transposed: bool,
) -> torch.Tensor:
    """The weight a site reads in the "auto" layout: `W + scale * B @ A` if `weight_pays`, or W."""
    if weight_pays(x, lora_a, lora_b):
        return low_rank_weight(weight, lora_a, lora_b, scale, transposed)
    return weight


def add_lora_for_tokens(
    y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float
) -> torch.Tensor:
    """The "auto" layout's branch: `add_lora` unless `weight_for_tokens` put the delta in W."""
    if weight_pays(x, lora_a, lora_b):
        return y
    return add_lora(y, x, lora_a, lora_b, scale)


def add_low_rank(
    y: torch.Tensor, low: torch.Tensor, lora_b: torch.Tensor, scale: float
) -> torch.Tensor:
    """`y + scale * low @ lora_b.T` in one `addmm` over the flattened rows.

    The separate `linear`, `mul` and `add` of the plain branch each write a full output-sized
    temporary; `addmm_` (alpha=scale) writes none, and the scale costs nothing.
    """
    return _accumulate(y, low.reshape(-1, low.shape[-1]), lora_b, scale)


def add_low_rank_out_of_place(
    y: torch.Tensor, low: torch.Tensor, lora_b: torch.Tensor, scale: float
) -> torch.Tensor:
    """`add_low_rank` without the in-place write, for torch.export with dynamic shapes.

    Exporting the in-place `addmm_` on a view makes torch.export guard on symbolic strides and
    reject a dynamic sequence length; a functional `addmm` exports cleanly (ONNX: one Gemm).
    """
    rows = torch.addmm(
        y.reshape(-1, y.shape[-1]), low.reshape(-1, low.shape[-1]), lora_b.t(), alpha=scale
    )
    return rows.view(y.shape)


def _accumulate(
    y: torch.Tensor, low_rows: torch.Tensor, lora_b: torch.Tensor, scale: float
) -> torch.Tensor:
    """`y + scale * low_rows @ lora_b.T`, written into `y` unless autograd records.

    In place is safe: `y` is a fresh output of the site op (or of the previous adapter's add),
    read by nothing but this node, and no backward formula saves it. Under autocast the rank-r
    product comes out in the autocast dtype while in-place ops are not autocast: `.to` makes the
    operands agree, as the plain branch's autocast `linear` would.
    """
    rows = y.view(-1, y.shape[-1])  # site outputs are fresh and contiguous; view adds no guards
    low_rows, lora_b = low_rows.to(y.dtype), lora_b.to(y.dtype)
    if torch.is_grad_enabled() and (
        y.requires_grad or low_rows.requires_grad or lora_b.requires_grad
    ):
        # Out of place: autograd replays an in-place write on a view with CopySlices, a grad
        # clone and fill per site in backward (9 % of an eager training step).
        # Backward GEMMs should have the rank as their row count (rank-column GEMMs run 1.4-4.9x
        # slower on CPU): `B^T @ grad.T` for the activations, `low.T @ grad` for B.
        # Autograd's `mm` backward follows its inputs' memory order, so compiled graphs pass
        # the activations column-major and B^T row-major (a copy, which they save: their
        # activation memory stays under PEFT's); eager runs `_AddLowRank`, which saves B.
        low_cols = low_rows.t().contiguous().t()  # no copy when already column-major
        if torch.compiler.is_compiling():  # compile / export: plain ops
            return torch.addmm(rows, low_cols, lora_b.t().contiguous(), alpha=scale).view(y.shape)
        return _AddLowRank.apply(rows, low_cols, lora_b, scale).view(y.shape)
    return rows.addmm_(low_rows, lora_b.t(), alpha=scale).view(y.shape)


class _AddLowRank(torch.autograd.Function):
    """`rows + scale * low @ B.T` whose backward runs rank-row GEMMs and saves only low and B.

    Eager autograd of the plain ops would save the row-major copy of B^T those GEMMs need;
    this saves B itself (a parameter: no memory) and reads B^T as a transposed operand.
    """

    @staticmethod
    def forward(ctx, rows, low, lora_b, scale):
        ctx.save_for_backward(low, lora_b)
        ctx.scale = scale
        return torch.addmm(rows, low, lora_b.t(), alpha=scale)

    @staticmethod
    def backward(ctx, grad):
        low, lora_b = ctx.saved_tensors
        grad_rows = grad if ctx.needs_input_grad[0] else None
        grad_low = grad_b = None
        if ctx.needs_input_grad[1]:  # [r, tokens] = B^T @ grad^T, returned as [tokens, r]
            grad_low = torch.mm(lora_b.t(), grad.t()).mul_(ctx.scale).t()
        if ctx.needs_input_grad[2]:  # [r, out] = low^T @ grad, returned as [out, r]
            grad_b = torch.mm(low.t(), grad).mul_(ctx.scale).t()
        return grad_rows, grad_low, grad_b, None


def low_rank_weight(
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    transposed: bool,
) -> torch.Tensor:
    """`weight + scale * B @ A` in `weight`'s layout (`[out, in]`, or `[in, out]` if transposed).

    Costs `2 * r * in * out` FLOPs per call whatever the number of tokens, against
    `2 * r * tokens * (in + out)` for a branch: cheaper once a call has more than about
    `in * out / (in + out)` tokens (prefill, batch scoring).
    """
    if transposed:
        return torch.addmm(weight, lora_a.t(), lora_b.t(), alpha=scale)
    return torch.addmm(weight, lora_b, lora_a, alpha=scale)
