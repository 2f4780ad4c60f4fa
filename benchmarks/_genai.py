"""onnxruntime-genai timing for `bench_generate.py`: greedy decode speed of a genai folder, and the
reference folder genai's own model builder writes for the same Hugging Face model.

    tokens, ttft_s, tok_per_s = genai_decode("genai_out", prompt_ids, 64)             # merged
    genai_decode("genai_out", prompt_ids, 64, adapter="genai_out/cat.onnx_adapter")   # multi-LoRA
    build_reference("hf_model_dir", "genai_ref")      # python -m onnxruntime_genai.models.builder

Run as a script to compare lora_fx's export with the builder's on a small random Llama:
    python benchmarks/_genai.py [--layers 4 --hidden 512 --new 64]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

__all__ = ["build_reference", "genai_decode"]


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


def _compare(args: argparse.Namespace) -> None:
    """Build a random Llama, export it with lora_fx and with genai's builder, time both."""
    import onnxruntime_genai as og
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import lora_fx
    from lora_fx.exporters import export_genai

    sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
    from models import save_tiny_tokenizer

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 4,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=max(1, args.hidden // 256),
        max_position_embeddings=args.context,
    )
    model = LlamaForCausalLM(config).eval()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model.save_pretrained(root / "hf")
        save_tiny_tokenizer(root / "hf", args.vocab)
        gm = lora_fx.capture_for_generation(model, max_batch_size=1, max_cache_len=args.context)
        export_genai(gm, root / "ours")
        build_reference(root / "hf", root / "ref")
        cfg = lora_fx.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear")
        lora_fx.inject(gm, cfg, "bench")
        export_genai(gm, root / "lora", merged=False)
        prompt = torch.randint(3, args.vocab, (1, args.prompt))
        rows = []
        for name, folder, adapter in (
            ("ours", "ours", None),
            ("ref", "ref", None),
            ("ours+lora", "lora", root / "lora" / "bench.onnx_adapter"),
        ):
            loaded = og.Model(str(root / folder))
            genai_decode(root / folder, prompt, 4, adapter, model=loaded)  # warm-up
            runs = [
                genai_decode(root / folder, prompt, args.new, adapter, model=loaded)
                for _ in range(3)
            ]
            rows.append((name, min(r[1] for r in runs), max(r[2] for r in runs), runs[0][0]))
        same = rows[0][3] == rows[1][3]
        print(f"llama {args.layers}x{args.hidden}, prompt {args.prompt}, {args.new} new tokens")
        for name, ttft, rate, _ in rows:
            print(f"  {name:9s} ttft {ttft * 1e3:7.2f} ms   decode {rate:8.1f} tok/s")
        print(f"  same greedy tokens (ours, ref): {same}; ours+lora: r=16 all-linear, unmerged")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new", type=int, default=64)
    _compare(parser.parse_args())
