"""What every GPU check shares: the model shapes, the run context, adapters and comparisons."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from _common import llama
from torch import nn

import lora_fx

__all__ = [
    "HF_KW",
    "MIN_EFFECT",
    "TINY",
    "Ctx",
    "Shape",
    "all_ok",
    "compare",
    "dtype_name",
    "effect",
    "error_text",
    "fresh_dynamo",
    "frozen_with_grad",
    "fx_graph",
    "lm_loss",
    "logits",
    "peak_extra_bytes",
    "peft_model",
    "save_peft_adapter",
    "status",
    "sync",
    "token_ids",
]

HF_KW = {"use_cache": False}
MIN_EFFECT = 1e-3  # an adapter must move some logit by more than this (non-vacuous checks)


@dataclass(frozen=True)
class Shape:
    """A LlamaForCausalLM config and the batch fed to it."""

    hidden: int = 64
    intermediate: int = 128
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    vocab: int = 256
    batch: int = 2
    seq: int = 16

    def model(self, device: torch.device) -> nn.Module:
        """The LlamaForCausalLM of this shape (seed 0), in eval mode, on `device`."""
        return llama(
            self.layers,
            hidden=self.hidden,
            intermediate=self.intermediate,
            heads=self.heads,
            kv_heads=self.kv_heads,
            vocab=self.vocab,
            seq=self.seq,
            device=device,
        )


TINY = Shape()


@dataclass(frozen=True)
class Ctx:
    """What every check gets: the device, the run mode and a scratch folder."""

    device: torch.device
    quick: bool
    tmp: Path

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


def token_ids(shape: Shape, device: torch.device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    return torch.randint(0, shape.vocab, (shape.batch, shape.seq), generator=gen).to(device)


def save_peft_adapter(
    model: nn.Module, folder: Path, *, r: int = 8, alpha: int = 16, dropout: float = 0.0
) -> Path:
    """PEFT's all-linear adapter with random B on a copy of `model`, saved to `folder`."""
    import peft

    cfg = peft.LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules="all-linear",
        init_lora_weights=False,
    )
    torch.manual_seed(2)
    peft.get_peft_model(copy.deepcopy(model), cfg).save_pretrained(str(folder))
    return folder


def peft_model(model: nn.Module, folder: Path) -> nn.Module:
    """`PeftModel.from_pretrained` on a copy of `model`, in eval mode."""
    from peft import PeftModel

    return PeftModel.from_pretrained(copy.deepcopy(model), str(folder)).eval()


def fx_graph(model: nn.Module, ids: torch.Tensor, folder: Path) -> torch.fx.GraphModule:
    """`capture` (torch.export) of a copy of `model` with the adapter in `folder`, in eval mode."""
    gm = lora_fx.capture(copy.deepcopy(model), (ids,), HF_KW)
    return lora_fx.load_adapter(gm, folder).eval()


def logits(out: Any) -> torch.Tensor:
    return (out.logits if hasattr(out, "logits") else out).detach().float()


def lm_loss(out: Any, ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy in float32."""
    scores = out.logits if hasattr(out, "logits") else out
    vocab = scores.shape[-1]
    return nn.functional.cross_entropy(
        scores[:, :-1].reshape(-1, vocab).float(), ids[:, 1:].reshape(-1)
    )


def compare(actual: torch.Tensor, expected: torch.Tensor, tol: tuple[float, float]) -> dict:
    """Max |actual - expected| and whether every element is within atol + rtol * |expected|."""
    atol, rtol = tol
    actual, expected = actual.detach().float(), expected.detach().float()
    diff = (actual - expected).abs()
    return {
        "max_abs_diff": diff.max().item(),
        "atol": atol,
        "rtol": rtol,
        "ok": bool((diff <= atol + rtol * expected.abs()).all()),
    }


def effect(adapted: torch.Tensor, base: torch.Tensor) -> float:
    """How far the adapter moves the output (must exceed MIN_EFFECT)."""
    return (adapted.float() - base.float()).abs().max().item()


def peak_extra_bytes(ctx: Ctx, fn: Callable[[], Any]) -> int | None:
    """Most CUDA bytes allocated during `fn` above what was allocated before; None on CPU."""
    if not ctx.cuda:
        fn()
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def sync(ctx: Ctx) -> None:
    if ctx.cuda:
        torch.cuda.synchronize()


def status(ok: bool) -> str:
    return "pass" if ok else "fail"


def all_ok(rows: list[dict]) -> bool:
    """No row failed (rows with `ok` None are information only)."""
    return all(row.get("ok") is not False for row in rows)


def frozen_with_grad(gm: nn.Module) -> int:
    trainable = set(lora_fx.trainable_parameters(gm))
    return sum(p.grad is not None for n, p in gm.named_parameters() if n not in trainable)


def dtype_name(dtype: torch.dtype) -> str:
    """`float32` for torch.float32."""
    return str(dtype).removeprefix("torch.")


def fresh_dynamo() -> Any:
    """Reset dynamo and clear its counters; returns the counters."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    return torch._dynamo.utils.counters


def error_text(e: BaseException) -> str:
    """An exception as `Type: message`, cut to 2000 characters."""
    return f"{type(e).__name__}: {e}"[:2000]
