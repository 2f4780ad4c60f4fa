"""GPU checks: lora_fx against PEFT on CUDA, one record for the whole run.

    python benchmarks/gpu_checks.py                      # --device cuda, full sizes
    python benchmarks/gpu_checks.py --device cpu --quick # smoke run on a machine without a GPU
    python benchmarks/gpu_checks.py --out x.json         # JSON (default results/gpu_checks.json)
    python benchmarks/gpu_checks.py --checks qlora onnx  # a subset

Models are LlamaForCausalLM from configs with random weights (nothing is downloaded); adapters are
PEFT's `LoraConfig(init_lora_weights=False)` (random nonzero B) saved to a temporary folder and
loaded by both sides, so every comparison is between the same weights. TF32 is off for the whole
run (`allow_tf32=False` for matmuls and cuDNN), so float32 comparisons can be tight.

Checks (each in its own try/except; status "pass", "fail", "not available" or "error"):
1. peft_parity: `capture` (torch.export) + `load_adapter` vs `PeftModel` logits, float32 and
   bfloat16 bases, every branch layout in `lora_fx.LAYOUTS`; the adapter must move the logits.
2. compile: `torch.compile(gm, fullgraph=True)` (inductor): LoRA gradients equal eager's, frozen
   weights get none, no graph break, no recompile over train/eval toggles (two graphs in all),
   and a `lora_dropout=0.1` graph compiles whole with dropout live in train mode.
3. merge: `merge` / `unmerge` / `merge_and_unload` on float32 and bfloat16 bases, against the
   unmerged graph, the saved weights and PEFT's `merge_and_unload`; peak extra CUDA memory of
   `lora_fx.merge` and PEFT's `merge_adapter` (hidden 1024 outside --quick, so the figures are
   not lost in allocator rounding).
4. qlora: `lora_fx.quantize` (nf4 / fp4 / double quant / int8) + `load_adapter` vs PEFT on the
   same model with bitsandbytes layers (tests/models.py `bnb_copy`); codes compared bit for bit;
   one training step reaches the LoRA parameters only; bits per base weight.
5. onnx: `export_onnx` merged and unmerged, run in onnxruntime with `ort_providers()`'s choice
   (CUDA first) and with the CPU provider, against torch; "not available" without a CUDA provider.
6. throughput: training steps of fx eager / fx compiled / PEFT eager / PEFT compiled (built as
   benchmarks/bench_train.py builds them) on a bfloat16 base with float32 LoRA (PEFT's and
   lora_fx's default `autocast_adapter_dtype=True`), all-linear r=16, AdamW, interleaved shuffled
   rounds timed with `torch.cuda.synchronize`; tokens/s, compile time, peak memory per step,
   median per-round speed ratios.
Models are tiny (hidden 64, 2 layers, 4 heads / 2 KV heads) except merge's and throughput's.
On CPU, CUDA memory figures are left empty and ONNX Runtime's CUDA provider is "not available".
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import logging
import os
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # models, helpers
sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common, bench_speed, bench_train

import bench_speed
import bench_train
from _common import interleaved, run_meta
from helpers import lora_roles

import lora_fx

DEFAULT_OUT = Path(__file__).parent / "results" / "gpu_checks.json"
HF_KW = {"use_cache": False}
# Tolerances (atol, rtol), elementwise as torch.allclose. float32 with TF32 off: only summation
# order differs (fused addmm vs PEFT's three ops, SDPA kernels). bfloat16: one rounding of an
# activation is 2^-8 relative, and the two sides round in different places.
TOL = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (5e-2, 5e-2)}
# Inductor reorders float32 reductions (softmax, RMSNorm, matmul splits): tests/test_compile.py.
COMPILE_TOL = (1e-4, 1e-4)
# Merged vs unmerged and lora_fx vs PEFT merges: bfloat16 weights hold the merged value rounded
# once (lora_fx) or twice (PEFT rounds B @ A to bf16 first), a 2^-8 relative step per weight.
MERGE_TOL = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (1e-1, 5e-2)}
# bitsandbytes' 4-bit / int8 matmuls on both sides, on the same codes (compared bit for bit); the
# rest is float32 but PEFT's bitsandbytes LoRA layers add the branch in another order.
QLORA_TOL = (1e-4, 1e-4)
# ONNX Runtime: CPU provider as torch float32; the CUDA provider may use TF32 (its `use_tf32`
# option) and its own attention and reduction kernels.
ORT_TOL = {"CPUExecutionProvider": (1e-4, 1e-4), "CUDAExecutionProvider": (5e-3, 5e-3)}
MIN_EFFECT = 1e-3  # an adapter must move some logit by more than this (non-vacuous checks)
QUANT_TYPES = (("nf4", True), ("nf4", False), ("fp4", True), ("int8", False))
# Speed ratios "a / b" (throughput of a over b) = per-round step time of b over step time of a:
# (label, b, a) for bench_speed.ratios, which divides the first variant's time by the second's.
_RATIOS = (
    ("fx compiled / peft compiled", "peft compiled", "fx compiled"),
    ("fx compiled / peft eager", "peft eager", "fx compiled"),
    ("fx eager / peft eager", "peft eager", "fx eager"),
)
_TRAIN_VARIANTS = ("fx eager", "fx compiled", "peft eager", "peft compiled")


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


TINY = Shape()
MERGE_FULL = Shape(hidden=1024, intermediate=2816, heads=16, kv_heads=4, vocab=1024)
TRAIN_FULL = Shape(
    hidden=1024, intermediate=2752, layers=8, heads=16, kv_heads=4, vocab=32000, batch=8, seq=512
)
TRAIN_QUICK = Shape(batch=2, seq=32)


@dataclass(frozen=True)
class Ctx:
    """What every check gets: the device, the run mode and a scratch folder."""

    device: torch.device
    quick: bool
    tmp: Path

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


# ------------------------------------------------------------------------------- shared pieces


def llama(shape: Shape, device: torch.device, seed: int = 0) -> nn.Module:
    """A LlamaForCausalLM from config with random weights, in eval mode, on `device`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=2 * shape.seq,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).to(device).eval()


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


# ------------------------------------------------------------------------------- 1. PEFT parity


def check_peft_parity(ctx: Ctx) -> dict[str, Any]:
    base, ids = llama(TINY, ctx.device), token_ids(TINY, ctx.device)
    folder = save_peft_adapter(base, ctx.tmp / "parity")
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        model = copy.deepcopy(base).to(dtype)
        with torch.no_grad():
            expected = logits(peft_model(model, folder)(ids, **HF_KW))
            moved = effect(expected, logits(model(ids, **HF_KW)))
            gm = fx_graph(model, ids, folder)
            for layout in lora_fx.LAYOUTS:
                lora_fx.set_layout(gm, layout)
                row = compare(logits(gm(ids)), expected, TOL[dtype])
                row["ok"] = row["ok"] and moved > MIN_EFFECT
                rows.append({"case": f"{_dtype(dtype)} {layout}", **row, "adapter_effect": moved})
    return {"status": status(all_ok(rows)), "rows": rows, "shape": vars(TINY)}


def _dtype(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ------------------------------------------------------------------------------- 2. compile


def _lora_graph(ctx: Ctx, dropout: float) -> tuple[torch.fx.GraphModule, torch.Tensor]:
    """The tiny Llama captured with PEFT's all-linear adapter (random B, `lora_dropout`)."""
    model, ids = llama(TINY, ctx.device), token_ids(TINY, ctx.device)
    folder = save_peft_adapter(model, ctx.tmp / f"compile-{dropout}", dropout=dropout)
    return fx_graph(model, ids, folder), ids


def _grads(gm, fn, ids) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss and LoRA gradients of one train-mode step of `fn` (gm or its compiled form)."""
    gm.train()
    gm.zero_grad(set_to_none=True)
    loss = lm_loss(fn(ids), ids)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in lora_fx.trainable_parameters(gm).items()}


def _fresh_dynamo() -> Any:
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    return torch._dynamo.utils.counters


def check_compile(ctx: Ctx) -> dict[str, Any]:
    counters = _fresh_dynamo()
    gm, ids = _lora_graph(ctx, dropout=0.0)
    compiled = torch.compile(gm, fullgraph=True)
    eager_loss, eager = _grads(gm, gm, ids)
    start = time.perf_counter()
    loss, grads = _grads(gm, compiled, ids)
    sync(ctx)
    train_compile_s = time.perf_counter() - start
    rows = [{"case": "loss", **compare(loss, eager_loss, COMPILE_TOL)}]
    worst = max(grads, key=lambda n: (grads[n] - eager[n]).abs().max().item())
    row = compare(torch.cat([g.flatten() for g in grads.values()]),
                  torch.cat([eager[n].flatten() for n in grads]), COMPILE_TOL)  # fmt: skip
    rows.append({"case": f"LoRA grads ({len(grads)})", **row, "worst": worst})
    zero_grads = sorted(n for n, g in grads.items() if not g.abs().sum() > 0)
    frozen = frozen_with_grad(gm)

    gm.eval()
    with torch.no_grad():
        compiled(ids)  # the eval graph
    optimizer = torch.optim.AdamW(lora_fx.trainable_parameters(gm).values(), lr=1e-3)
    recompile_error = None
    try:
        with torch._dynamo.config.patch(error_on_recompile=True):
            for _ in range(3):
                gm.train()
                lm_loss(compiled(ids), ids).backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                gm.eval()
                with torch.no_grad():
                    compiled(ids)
    except torch._dynamo.exc.RecompileError as e:
        recompile_error = str(e).splitlines()[0]
    gm.eval()
    with torch.no_grad():
        out = logits(compiled(ids))
        rows.append({"case": "eval after 3 steps", **compare(out, logits(gm(ids)), COMPILE_TOL)})
    graphs = counters["stats"]["unique_graphs"]
    breaks = dict(counters["graph_break"])
    dropout = _compile_with_dropout(ctx)
    ok = (
        all_ok(rows)
        and not zero_grads
        and frozen == 0
        and recompile_error is None
        and graphs == 2
        and not breaks
        and dropout["ok"]
    )
    return {
        "status": status(ok),
        "rows": rows,
        "backend": "inductor",
        "train_compile_s": train_compile_s,
        "unique_graphs": graphs,
        "graph_breaks": breaks,
        "recompile_error": recompile_error,
        "lora_params_with_zero_grad": zero_grads,
        "frozen_params_with_grad": frozen,
        "dropout": dropout,
    }


def _compile_with_dropout(ctx: Ctx) -> dict[str, Any]:
    """lora_dropout=0.1: fullgraph compile in train mode, dropout live, eval equals eager."""
    counters = _fresh_dynamo()
    gm, ids = _lora_graph(ctx, dropout=0.1)
    compiled = torch.compile(gm, fullgraph=True)
    gm.train()
    first, second = compiled(ids), logits(compiled(ids))
    live = effect(logits(first), second)
    lm_loss(first, ids).backward()
    grads = [p.grad for p in lora_fx.trainable_parameters(gm).values()]
    finite = all(
        g is not None and bool(torch.isfinite(g).all() and g.abs().sum() > 0) for g in grads
    )
    gm.eval()
    with torch.no_grad():
        evaluated = compare(logits(compiled(ids)), logits(gm(ids)), COMPILE_TOL)
    breaks = dict(counters["graph_break"])
    return {
        "ok": live > 0 and finite and not breaks and evaluated["ok"],
        "lora_dropout": 0.1,
        "train_outputs_differ_by": live,
        "grads_finite_nonzero": finite,
        "graph_breaks": breaks,
        "unique_graphs": counters["stats"]["unique_graphs"],
        "eval_vs_eager": evaluated,
        "frozen_params_with_grad": frozen_with_grad(gm),
    }


# ------------------------------------------------------------------------------- 3. merge


def check_merge(ctx: Ctx) -> dict[str, Any]:
    shape = TINY if ctx.quick else MERGE_FULL
    base, ids = llama(shape, ctx.device), token_ids(shape, ctx.device)
    folder = save_peft_adapter(base, ctx.tmp / "merge", r=16, alpha=32)
    rows, memory = [], {}
    for dtype in (torch.float32, torch.bfloat16):
        name = _dtype(dtype)
        model = copy.deepcopy(base).to(dtype)
        with torch.no_grad():
            rows_, memory[name] = _merge_one(ctx, model, ids, folder, MERGE_TOL[dtype])
        rows += [{"case": f"{name} {row.pop('case')}", **row} for row in rows_]
    return {
        "status": status(all_ok(rows)),
        "rows": rows,
        "peak_extra_mb": memory,
        "shape": vars(shape),
        "r": 16,
    }


def _merge_one(ctx: Ctx, model: nn.Module, ids, folder: Path, tol) -> tuple[list, dict]:
    gm = fx_graph(model, ids, folder)
    pm = peft_model(model, folder)
    base = logits(model(ids, **HF_KW))
    unmerged = logits(gm(ids))
    lora = set(lora_fx.trainable_parameters(gm))
    saved = {n: p.detach().clone() for n, p in gm.named_parameters() if n not in lora}
    fx_peak = peak_extra_bytes(ctx, lambda: lora_fx.merge(gm))
    merged = logits(gm(ids))
    params = dict(gm.named_parameters())
    # W + delta rounds once and the subtraction once more: 2 ulps of the largest merged weight.
    top = max(params[n].abs().max().item() for n in saved)
    restore_tol = 2 * torch.finfo(model.dtype).eps * top
    lora_fx.unmerge(gm)
    restore = max((params[n] - w).abs().max().item() for n, w in saved.items())
    lora_fx.merge_and_unload(gm)
    fx_mau = logits(gm(ids))
    leftover = sum(lora_roles(gm).values())  # lora_fx nodes, by their meta tags
    peft_peak = peak_extra_bytes(ctx, pm.merge_adapter)
    pm.unmerge_adapter()
    peft_mau = logits(pm.merge_and_unload()(ids, **HF_KW))
    moved = effect(unmerged, base)
    rows = [
        {"case": "merged vs unmerged", **compare(merged, unmerged, tol), "adapter_effect": moved},
        {"case": "unmerge restores weights", "max_abs_diff": restore, "atol": restore_tol,
         "ok": restore <= restore_tol},
        {"case": "fx merge_and_unload vs unmerged", **compare(fx_mau, unmerged, tol),
         "lora_nodes_left": leftover},
        {"case": "fx merge_and_unload vs peft", **compare(fx_mau, peft_mau, tol)},
        {"case": "peft merge_and_unload vs unmerged (info)", **compare(peft_mau, unmerged, tol),
         "ok": None},
    ]  # fmt: skip
    rows[0]["ok"] = rows[0]["ok"] and moved > MIN_EFFECT
    rows[2]["ok"] = rows[2]["ok"] and not leftover
    mb = {
        "fx merge": None if fx_peak is None else fx_peak / 2**20,
        "peft merge_adapter": None if peft_peak is None else peft_peak / 2**20,
    }
    return rows, mb


# ------------------------------------------------------------------------------- 4. QLoRA


def check_qlora(ctx: Ctx) -> dict[str, Any]:
    try:
        import bitsandbytes
    except Exception as e:  # a missing or broken build (no CUDA library) fails at import
        return {"status": "not available", "reason": f"import bitsandbytes failed: {e!r}"}
    base, ids = llama(TINY, torch.device("cpu")), token_ids(TINY, ctx.device)
    bnb_log = logging.getLogger("bitsandbytes")  # int8 logs "inputs will be cast" per call
    level, rows = bnb_log.level, []
    bnb_log.setLevel(logging.ERROR)
    try:
        for quant_type, double in QUANT_TYPES:
            name = f"{quant_type}{' double' if double else ''}"
            print(f"  qlora {name}", flush=True)
            try:
                rows.append({"case": name, **_qlora_one(ctx, base, ids, quant_type, double)})
            except Exception as e:  # one type failing must not hide the others
                rows.append({"case": name, "ok": False, "error": _error(e)})
    finally:
        bnb_log.setLevel(level)
    return {
        "status": status(all_ok(rows)),
        "rows": rows,
        "bitsandbytes": bitsandbytes.__version__,
        "shape": vars(TINY),
    }


def _qlora_one(ctx: Ctx, base: nn.Module, ids, quant_type: str, double: bool) -> dict[str, Any]:
    from models import bnb_copy

    from lora_fx.math import quant

    reference = bnb_copy(copy.deepcopy(base).to(ctx.device), quant_type, compress_statistics=double)
    _quantize_int8_params(reference, ctx.device)
    folder = save_peft_adapter(reference, ctx.tmp / f"qlora-{quant_type}-{double}", r=4, alpha=8)
    gm = lora_fx.capture(copy.deepcopy(base).to(ctx.device), (ids,), HF_KW)
    lora_fx.quantize(gm, quant_type, compress_statistics=double)
    lora_fx.load_adapter(gm, folder).eval()
    with torch.no_grad():
        expected = logits(peft_model(reference, folder)(ids, **HF_KW))
        moved = effect(expected, logits(reference(ids, **HF_KW)))
        row = compare(logits(gm(ids)), expected, QLORA_TOL)
    ref_params = dict(reference.named_parameters())
    packed = {n: p for n, p in gm.named_parameters() if quant.is_quantized(p)}
    codes_equal = sum(torch.equal(p.data, ref_params[n].data) for n, p in packed.items())
    stored = sum(quant.storage_bytes(p) for p in packed.values())
    weights = sum(torch.Size(quant.logical_shape(p)).numel() for p in packed.values())
    before = {n: p.data.clone() for n, p in packed.items()}

    gm.train()
    trainable = lora_fx.trainable_parameters(gm)
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-3)
    loss = lm_loss(gm(ids), ids)
    loss.backward()
    params = dict(gm.named_parameters())
    with_grad = {n for n, p in params.items() if p.grad is not None}
    grads_finite = all(bool(torch.isfinite(params[n].grad).all()) for n in with_grad)
    optimizer.step()
    codes_kept = all(torch.equal(p.data, before[n]) for n, p in packed.items())
    train_ok = with_grad == set(trainable) and grads_finite and codes_kept
    row["ok"] = row["ok"] and moved > MIN_EFFECT and train_ok and bool(torch.isfinite(loss))
    return {
        **row,
        "adapter_effect": moved,
        "quantized_weights": len(packed),
        "codes_equal_reference": f"{codes_equal}/{len(packed)}",
        "bits_per_weight": 8 * stored / max(weights, 1),
        "loss": loss.item(),
        "grads_only_lora": with_grad == set(trainable),
        "codes_unchanged_by_step": codes_kept,
    }


def _quantize_int8_params(model: nn.Module, device: torch.device) -> None:
    """Quantize, in place on `device`, the Int8Params that bnb_copy left in float.

    `Int8Params.to` quantizes only when the weight leaves the CPU, so bnb_copy of a CUDA model
    keeps float int8-layer weights; moving a CPU-quantized model instead would leave the
    weights' CB / SCB statistics behind on the CPU (`Module.to` swaps `.data` only).
    """
    for param in model.parameters():
        if type(param).__name__ == "Int8Params" and param.dtype != torch.int8:
            param.data = param.data.cpu()
            param.to(device)  # bitsandbytes' own quantization, on `device`, into `param`


# ------------------------------------------------------------------------------- 5. ONNX Runtime


def check_onnx(ctx: Ctx) -> dict[str, Any]:
    import onnxruntime as ort

    from lora_fx.exporters import ort_providers, ort_session

    if ctx.cuda and hasattr(ort, "preload_dlls"):
        # onnxruntime-gpu finds CUDA / cuDNN in the nvidia-* wheels torch brought only if asked.
        ort.preload_dlls()
    base, ids = llama(TINY, ctx.device), token_ids(TINY, ctx.device)
    folder = save_peft_adapter(base, ctx.tmp / "onnx")
    gm = fx_graph(base, ids, folder)
    with torch.no_grad():
        expected = logits(gm(ids)).cpu()
    exported_on, device_export_error = ctx.device.type, None
    try:
        files = _export_both(gm, ids, ctx.tmp)
    except Exception as e:  # export from CUDA tensors failed: record it, export a CPU copy
        device_export_error, exported_on = _error(e), "cpu"
        cpu_ids = ids.cpu()
        files = _export_both(fx_graph(base.cpu(), cpu_ids, folder), cpu_ids, ctx.tmp)
    available = ort.get_available_providers()
    rows, used = [], {}
    for label, device in (("preferred", "auto"), ("cpu", "cpu")):
        for kind, path in files.items():
            session = ort_session(path, device=device)
            provider = session.get_providers()[0]
            used[label] = session.get_providers()
            feed = {session.get_inputs()[0].name: ids.cpu().numpy()}
            out = torch.from_numpy(session.run(None, feed)[0])
            row = compare(out, expected, ORT_TOL[provider])
            rows.append({"case": f"{kind}, {label} session", "provider": provider, **row})
    cuda_used = used["preferred"][0] == "CUDAExecutionProvider"
    ok = all_ok(rows)
    if not ok or cuda_used:
        state, reason = status(ok), None
    elif not ctx.cuda:
        state, reason = "not available", "run with --device cpu: the CUDA provider needs a GPU"
    elif "CUDAExecutionProvider" not in available:
        state = "not available"
        reason = f"onnxruntime {ort.__version__} is a CPU build (providers: {available})"
    else:
        state = "not available"
        reason = "CUDAExecutionProvider is listed but the session fell back to CPU (CUDA libs?)"
    return {
        "status": state,
        "reason": reason,
        "rows": rows,
        "onnxruntime": ort.__version__,
        "available_providers": available,
        "lora_fx_ort_providers": ort_providers(),
        "session_providers": used,
        "exported_on": exported_on,
        "device_export_error": device_export_error,
    }


def _export_both(gm: torch.fx.GraphModule, ids: torch.Tensor, tmp: Path) -> dict[str, Path]:
    """`export_onnx` merged and unmerged (LoRA initializers); the two files."""
    from lora_fx.exporters import export_onnx

    files = {"merged": tmp / "merged.onnx", "unmerged": tmp / "unmerged.onnx"}
    export_onnx(gm, (ids,), files["merged"])
    export_onnx(gm, (ids,), files["unmerged"], merged=False)
    return files


# ------------------------------------------------------------------------------- 6. throughput


def _train_step(variant: bench_train.Variant, ids: torch.Tensor) -> torch.Tensor:
    """Forward, float32 cross-entropy, backward, AdamW step, zero_grad (bench_train's step)."""
    loss = lm_loss(variant.forward(ids), ids)
    loss.backward()
    variant.grad_bytes = sum(p.grad.nbytes for p in variant.trainable if p.grad is not None)
    variant.optimizer.step()
    variant.optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def check_throughput(ctx: Ctx) -> dict[str, Any]:
    shape = TRAIN_QUICK if ctx.quick else TRAIN_FULL
    _fresh_dynamo()
    base = llama(shape, ctx.device).to(torch.bfloat16)
    ids = token_ids(shape, ctx.device)
    folder = save_peft_adapter(base, ctx.tmp / "train", r=16, alpha=32)
    variants, first, errors = {}, {}, {}
    for name in _TRAIN_VARIANTS:  # a variant that fails is left out; the others still run
        try:
            variants[name] = bench_train.build(name, base, str(folder), ids)
            first[name] = _first_step(ctx, variants[name], ids)
            print(f"  {name}: first step {first[name]['seconds']:.1f} s", flush=True)
        except Exception as e:
            variants.pop(name, None)
            errors[name] = _error(e)
            print(f"  {name}: {errors[name][:200]}", flush=True)
    del base

    def timed_step(v: bench_train.Variant) -> Callable[[], None]:
        return lambda: (_train_step(v, ids), sync(ctx))

    print("  timed rounds", flush=True)
    samples = interleaved(
        {n: timed_step(v) for n, v in variants.items()},
        seconds=2.0 if ctx.quick else 20.0,
        min_rounds=3 if ctx.quick else 20,
    )
    tokens = shape.batch * shape.seq
    rows = []
    for name, v in variants.items():
        median = statistics.median(samples[name])
        memory = peak_extra_bytes(ctx, lambda v=v: _train_step(v, ids))
        state = v.state()
        rows.append({
            "case": name,
            "median_step_ms": 1e3 * median,
            "tokens_per_s": tokens / median,
            "compile_s": first[name]["seconds"] - median if "compiled" in name else None,
            "graph_breaks": first[name]["graph_breaks"] if "compiled" in name else None,
            "peak_step_mb": None if memory is None else memory / 2**20,
            "first_loss": first[name]["loss"],
            "trainable_params": state["trainable_params"],
            "frozen_with_grad": state["frozen_with_grad"],
            "frozen_with_optimizer_state": state["frozen_with_optimizer_state"],
        })  # fmt: skip
    losses = [r["first_loss"] for r in rows]
    ok = (
        not any(name.startswith("fx") for name in errors)
        and all(r["frozen_with_grad"] == 0 == r["frozen_with_optimizer_state"] for r in rows)
        and first["fx compiled"]["graph_breaks"] == 0
        and all(torch.isfinite(torch.tensor(losses)))
    )
    return {
        "status": status(ok),
        "rows": rows,
        "variant_errors": errors,
        "speedups": bench_speed.ratios(samples, _RATIOS),
        "rounds": len(next(iter(samples.values()))),
        "first_loss_max_gap": max(losses) - min(losses),
        "precision": "bfloat16 base weights, float32 LoRA (autocast_adapter_dtype), fp32 loss",
        "shape": vars(shape),
        "r": 16,
        "lora_alpha": 32,
        "optimizer": f"AdamW(lr={bench_train.LR})",
    }


def _first_step(ctx: Ctx, variant: bench_train.Variant, ids: torch.Tensor) -> dict[str, Any]:
    """The first training step (compiles a compiled variant): seconds, loss, graph breaks."""
    before = bench_train.graph_breaks()
    sync(ctx)
    start = time.perf_counter()
    loss = _train_step(variant, ids).item()
    sync(ctx)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "loss": loss, "graph_breaks": bench_train.graph_breaks() - before}


# ------------------------------------------------------------------------------- the run


CHECKS: dict[str, Callable[[Ctx], dict[str, Any]]] = {
    "peft_parity": check_peft_parity,
    "compile": check_compile,
    "merge": check_merge,
    "qlora": check_qlora,
    "onnx": check_onnx,
    "throughput": check_throughput,
}
_NEEDS_CUDA = {"merge": "peak CUDA memory", "throughput": "CUDA memory and synchronize timing"}


def environment(ctx: Ctx, meta: dict[str, Any]) -> dict[str, Any]:
    """Versions of everything the checks use, the GPU, and ONNX Runtime's providers."""
    props = torch.cuda.get_device_properties(ctx.device) if ctx.cuda else None
    env: dict[str, Any] = {
        **{key: meta[key] for key in ("lora_fx", "torch", "transformers", "peft", "python")},
        "device": str(ctx.device),
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name(ctx.device) if ctx.cuda else None,
        "gpu_capability": torch.cuda.get_device_capability(ctx.device) if ctx.cuda else None,
        "gpu_memory_gb": props.total_memory / 2**30 if props else None,
        "cudnn": torch.backends.cudnn.version() if ctx.cuda else None,
        "tf32": torch.backends.cuda.matmul.allow_tf32,
    }
    for module in ("bitsandbytes", "onnxruntime", "onnx", "onnxscript"):
        try:
            env[module] = __import__(module).__version__
        except Exception as e:  # record a broken install and go on
            env[module] = f"import failed: {e!r}"[:300]
    try:
        import onnxruntime

        env["ort_available_providers"] = onnxruntime.get_available_providers()
    except Exception as e:
        env["ort_available_providers"] = f"import failed: {e!r}"[:300]
    return env


def run_check(name: str, ctx: Ctx) -> dict[str, Any]:
    """One check, its failures and warnings caught; status "error" with a traceback tail."""
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        try:
            result = CHECKS[name](ctx)
        except Exception as e:
            tail = traceback.format_exc().splitlines()[-60:]
            result = {"status": "error", "error": _error(e), "traceback": tail}
    if not ctx.cuda and name in _NEEDS_CUDA:
        result.setdefault("skipped_on_cpu", _NEEDS_CUDA[name])
    result["seconds"] = time.perf_counter() - start
    result["warnings"] = sorted({f"{w.category.__name__}: {w.message}"[:300] for w in caught})[:15]
    gc.collect()
    torch._dynamo.reset()
    if ctx.cuda:
        torch.cuda.empty_cache()
    return result


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"[:2000]


def _cell(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return {True: "yes", False: "NO", None: "-"}[value]
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e3 else f"{value:.0f}"
    return str(value)


def _short(value: Any) -> Any:
    """`value` with floats cut to 3 significant digits, for printing."""
    if isinstance(value, dict):
        return {k: _short(v) for k, v in value.items()}
    return float(f"{value:.3g}") if isinstance(value, float) else value


_PRINTED = (
    "precision", "shape", "rounds", "first_loss_max_gap", "speedups", "peak_extra_mb",
    "train_compile_s", "unique_graphs", "graph_breaks", "dropout", "available_providers",
    "lora_fx_ort_providers", "session_providers", "exported_on", "device_export_error",
)  # fmt: skip


def report_check(name: str, result: dict[str, Any]) -> str:
    lines = [f"== {name}: {result['status'].upper()} ({result['seconds']:.1f} s)"]
    for key in ("reason", "error", "skipped_on_cpu", "recompile_error", "variant_errors"):
        if result.get(key):
            lines.append(f"   {key}: {result[key]}")
    rows = result.get("rows") or []
    if rows:
        header = list(dict.fromkeys(k for row in rows for k in row))
        cells = [[_cell(row.get(k)) for k in header] for row in rows]
        lines += ["   " + line for line in bench_train.table(header, cells).splitlines()]
    for key in _PRINTED:
        if key in result:
            lines.append(f"   {key}: {json.dumps(_short(result[key]))}")
    if "traceback" in result:
        lines += ["   " + line for line in result["traceback"][-8:]]
    return "\n".join(lines)


def write_atomic(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--quick", action="store_true", help="tiny models and few rounds only")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON output path")
    parser.add_argument("--checks", nargs="+", choices=list(CHECKS), default=list(CHECKS))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no GPU; use --device cpu for a smoke run")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        ctx = Ctx(device=device, quick=args.quick, tmp=Path(tmp))
        meta = run_meta(quick=args.quick, start=start)
        record = {"meta": meta, "environment": environment(ctx, meta), "checks": {}}
        print(json.dumps(record["environment"]), flush=True)
        for i, name in enumerate(args.checks, 1):
            print(f"[{i}/{len(args.checks)}] {name} ...", flush=True)
            record["checks"][name] = run_check(name, ctx)
            record["meta"]["total_s"] = time.perf_counter() - start
            print(report_check(name, record["checks"][name]), flush=True)
            write_atomic(args.out, record)
    summary = {n: r["status"] for n, r in record["checks"].items()}
    print(f"summary: {json.dumps(summary)} | total {record['meta']['total_s']:.0f} s", flush=True)
    print(f"wrote {args.out}", flush=True)
    return record


if __name__ == "__main__":
    main()
