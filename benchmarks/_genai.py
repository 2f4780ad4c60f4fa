"""onnxruntime-genai timing for `bench_genai_builder.py`: greedy decode speed of a genai folder,
and the reference folder genai's own model builder writes for the same Hugging Face model.

    tokens, ttft_s, tok_per_s = genai_decode("genai_out", prompt_ids, 64)             # merged
    genai_decode("genai_out", prompt_ids, 64, adapter="genai_out/cat.onnx_adapter")   # multi-LoRA
    build_reference("hf_model_dir", "genai_ref")      # python -m onnxruntime_genai.models.builder

`python benchmarks/bench_genai_builder.py` compares lora_fx's export with the builder's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

__all__ = ["build_reference", "genai_decode", "pin_threads"]


def genai_decode(
    model_dir: str | os.PathLike,
    prompt_ids,
    max_new_tokens: int,
    adapter: str | os.PathLike | None = None,
    *,
    model=None,
) -> tuple[list[int], float, float]:
    """Greedy-decode one prompt with onnxruntime-genai.

    Args:
        model_dir: A folder `onnxruntime_genai.Model` loads.
        prompt_ids: One prompt, [1, p] or [p] (a tensor, array or list of ints).
        max_new_tokens: Tokens to generate (fewer if the model emits EOS).
        adapter: An `.onnx_adapter` file to run the request with (unmerged exports).
        model: An `og.Model` already loaded from `model_dir` (load time is not measured).

    Returns:
        (new tokens, time to first token in s: prefill + first pick, decode tokens per second
        after the first token).
    """
    import onnxruntime_genai as og

    model = model if model is not None else og.Model(str(model_dir))
    prompt = np.asarray(
        prompt_ids.tolist() if hasattr(prompt_ids, "tolist") else prompt_ids, np.int32
    )
    prompt = prompt.reshape(1, -1)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=prompt.shape[1] + max_new_tokens, do_sample=False)
    adapters = None
    if adapter is not None:
        adapters = og.Adapters(model)
        adapters.load(str(adapter), "bench")
    start = time.perf_counter()
    generator = og.Generator(model, params)
    if adapters is not None:
        generator.set_active_adapter(adapters, "bench")
    generator.append_tokens(prompt)
    generator.generate_next_token()
    first = time.perf_counter()
    steps = 1
    while not generator.is_done():
        generator.generate_next_token()
        steps += 1
    end = time.perf_counter()
    tokens = [int(t) for t in generator.get_sequence(0)[prompt.shape[1] :]]
    rate = (steps - 1) / (end - first) if steps > 1 else float("nan")
    return tokens, first - start, rate


def build_reference(hf_folder: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Run genai's model builder (fp32, CPU) on a local Hugging Face folder; offline.

    The folder needs tokenizer files too: the builder loads the tokenizer (for special ids).

    Raises:
        RuntimeError: The builder failed; the message has the end of its output.
    """
    out = Path(out_dir)
    command = [sys.executable, "-m", "onnxruntime_genai.models.builder"]
    command += ["-i", str(hf_folder), "-o", str(out), "-p", "fp32", "-e", "cpu"]
    with tempfile.TemporaryDirectory() as cache:
        done = subprocess.run(
            [*command, "-c", cache],
            capture_output=True,
            text=True,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
            check=False,
        )
    if done.returncode != 0:
        raise RuntimeError(f"genai model builder failed: {(done.stdout + done.stderr)[-1500:]}")
    return out


def pin_threads(folder: str | os.PathLike, threads: int) -> None:
    """Set genai's intra-op threads in a folder's genai_config.json (fair runs beside torch)."""
    config_file = Path(folder) / "genai_config.json"
    config = json.loads(config_file.read_text())
    config["model"]["decoder"].setdefault("session_options", {})["intra_op_num_threads"] = threads
    config_file.write_text(json.dumps(config, indent=2))
