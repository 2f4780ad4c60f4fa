"""Check 5, onnx: `export_onnx` merged and unmerged, run in ONNX Runtime (CUDA first) vs torch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .shared import (
    TINY,
    Ctx,
    all_ok,
    compare,
    error_text,
    fx_graph,
    logits,
    save_peft_adapter,
    status,
    token_ids,
)

__all__ = ["check_onnx"]

# ONNX Runtime: CPU provider as torch float32; the CUDA provider may use TF32 (its `use_tf32`
# option) and its own attention and reduction kernels.
ORT_TOL = {"CPUExecutionProvider": (1e-4, 1e-4), "CUDAExecutionProvider": (5e-3, 5e-3)}


def check_onnx(ctx: Ctx) -> dict[str, Any]:
    import onnxruntime as ort

    from lora_fx.exporters import ort_providers, ort_session

    if ctx.cuda and hasattr(ort, "preload_dlls"):
        # onnxruntime-gpu finds CUDA / cuDNN in the nvidia-* wheels torch brought only if asked.
        ort.preload_dlls()
    base, ids = TINY.model(ctx.device), token_ids(TINY, ctx.device)
    folder = save_peft_adapter(base, ctx.tmp / "onnx")
    gm = fx_graph(base, ids, folder)
    with torch.no_grad():
        expected = logits(gm(ids)).cpu()
    exported_on, device_export_error = ctx.device.type, None
    try:
        files = _export_both(gm, ids, ctx.tmp)
    except Exception as e:  # export from CUDA tensors failed: record it, export a CPU copy
        device_export_error, exported_on = error_text(e), "cpu"
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
