"""Unmerged inference at near-merged speed: the "weight" branch layout, then an ONNX export.

The adapter stays separate (swappable, saveable) while each site reads `W + scale * B @ A`,
computed once per call instead of a rank-r branch per token.
"""

import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import lora_fx
from lora_fx import LoraConfig

torch.manual_seed(0)
model = LlamaForCausalLM(
    LlamaConfig(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
).eval()
ids = torch.randint(0, 512, (4, 64))
gm = lora_fx.capture(model, (ids,), {"use_cache": False})
cfg = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False)
gm = lora_fx.inject(gm, cfg).eval()  # default layout: "fused" (also the training layout)


def median_ms(fn, rounds=20):
    times = []
    with torch.no_grad():
        for _ in range(rounds):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


with torch.no_grad():
    fused = gm(ids).logits
fused_ms = median_ms(lambda: gm(ids))
lora_fx.set_layout(gm, "weight")
with torch.no_grad():
    weight = gm(ids).logits
weight_ms = median_ms(lambda: gm(ids))
print(f"fused {fused_ms:.2f} ms, weight {weight_ms:.2f} ms per forward")
print(f"max |diff| fused vs weight: {(fused - weight).abs().max().item():.2e}")

# ONNX: the unmerged file keeps A and B; ONNX Runtime folds W + scale * B @ A when it loads it.
try:
    import onnxruntime as ort

    from lora_fx.exporters import export_onnx
except ImportError:
    print("onnx / onnxruntime not installed: pip install 'lora_fx[onnx]'")
else:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "llama_lora.onnx"
        export_onnx(gm, (ids,), path, merged=False)
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    onnx_logits = session.run(None, {session.get_inputs()[0].name: ids.numpy()})[0]
    diff = (torch.from_numpy(onnx_logits) - weight).abs().max().item()
    print(f"max |diff| onnxruntime vs torch: {diff:.2e}")
