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
Each check is a module of `benchmarks/_gpu_checks/`; this script runs them and reports.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # models, helpers
sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common, bench_train, _gpu_checks

from _common import run_meta, table, write_json
from _gpu_checks.compile import check_compile
from _gpu_checks.merge import check_merge
from _gpu_checks.ort import check_onnx
from _gpu_checks.parity import check_peft_parity
from _gpu_checks.qlora import check_qlora
from _gpu_checks.shared import Ctx, error_text
from _gpu_checks.throughput import check_throughput

DEFAULT_OUT = Path(__file__).parent / "results" / "gpu_checks.json"

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
            result = {"status": "error", "error": error_text(e), "traceback": tail}
    if not ctx.cuda and name in _NEEDS_CUDA:
        result.setdefault("skipped_on_cpu", _NEEDS_CUDA[name])
    result["seconds"] = time.perf_counter() - start
    result["warnings"] = sorted({f"{w.category.__name__}: {w.message}"[:300] for w in caught})[:15]
    gc.collect()
    torch._dynamo.reset()
    if ctx.cuda:
        torch.cuda.empty_cache()
    return result


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
        lines += ["   " + line for line in table(header, cells).splitlines()]
    for key in _PRINTED:
        if key in result:
            lines.append(f"   {key}: {json.dumps(_short(result[key]))}")
    if "traceback" in result:
        lines += ["   " + line for line in result["traceback"][-8:]]
    return "\n".join(lines)


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
            write_json(record, args.out, default=str)
    summary = {n: r["status"] for n, r in record["checks"].items()}
    print(f"summary: {json.dumps(summary)} | total {record['meta']['total_s']:.0f} s", flush=True)
    print(f"wrote {args.out}", flush=True)
    return record


if __name__ == "__main__":
    main()
