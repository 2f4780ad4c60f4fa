"""lora_fx's onnxruntime-genai export vs the folder genai's own model builder writes, same model.

    python benchmarks/bench_genai_builder.py                      # 4 layers, hidden 512 (~2 min)
    python benchmarks/bench_genai_builder.py --layers 2 --hidden 128 --runs 3   # smoke

A random LlamaForCausalLM (hidden/64 heads, K/V heads hidden/256) is saved with a tiny tokenizer
(the builder reads one), then:
1. `ours`: capture_for_generation + export_genai (merged; no adapter).
2. `builder`: `python -m onnxruntime_genai.models.builder -p fp32 -e cpu` on the same folder
   (hand-written Llama graph: fused GroupQueryAttention, shared KV buffer).
3. `ours + LoRA`: an r=16 all-linear adapter, unmerged, fed from its `.onnx_adapter` file.
Each folder greedy-decodes one prompt `--runs` times after a warm-up, runs interleaved; medians of
time to first token and decode tokens/s. genai's session uses `--threads` intra-op threads.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from _common import run_meta, table, write_result
from _genai import build_reference, genai_decode, pin_threads

DEFAULT_OUT = Path(__file__).parent / "results" / "bench_genai_builder.json"


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Build the three folders, time them interleaved, check the greedy tokens."""
    import onnxruntime_genai as og
    import torch
    from models import save_tiny_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    import lora_fx
    from lora_fx.exporters import export_genai

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 4,
        num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden // 64),
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
        build_reference(root / "hf", root / "builder")
        cfg = lora_fx.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear")
        lora_fx.inject(gm, cfg, "bench")
        export_genai(gm, root / "lora", merged=False)
        folders = {
            "ours": (root / "ours", None),
            "builder": (root / "builder", None),
            "ours + LoRA": (root / "lora", root / "lora" / "bench.onnx_adapter"),
        }
        for folder, _ in folders.values():
            pin_threads(folder, args.threads)
        models = {name: og.Model(str(folder)) for name, (folder, _) in folders.items()}
        prompt = torch.randint(3, args.vocab, (1, args.prompt))
        samples: dict[str, list[tuple[float, float]]] = {name: [] for name in folders}
        tokens: dict[str, list[int]] = {}
        for name, (folder, adapter) in folders.items():  # warm-up
            genai_decode(folder, prompt, 4, adapter, model=models[name])
        for _ in range(args.runs):
            for name, (folder, adapter) in folders.items():
                out, ttft, rate = genai_decode(
                    folder, prompt, args.new, adapter, model=models[name]
                )
                samples[name].append((ttft, rate))
                tokens[name] = out
    rows = {
        name: {
            "ttft_ms": 1e3 * statistics.median(t for t, _ in values),
            "decode_tok_s": statistics.median(r for _, r in values),
        }
        for name, values in samples.items()
    }
    return {
        "model": f"llama {args.layers} layers, hidden {args.hidden}, vocab {args.vocab}",
        "prompt": args.prompt,
        "new": args.new,
        "variants": rows,
        "same_greedy_tokens_ours_builder": tokens["ours"] == tokens["builder"],
    }


def report(result: dict[str, Any]) -> str:
    """The table, decode speed relative to the builder's."""
    ref = result["variants"]["builder"]["decode_tok_s"]
    rows = [
        [name, f"{v['ttft_ms']:.2f}", f"{v['decode_tok_s']:.1f}", f"{v['decode_tok_s'] / ref:.2f}x"]
        for name, v in result["variants"].items()
    ]
    head = (
        f"{result['model']}, prompt {result['prompt']}, {result['new']} new tokens, "
        f"{result['meta']['threads']} thread(s), CPU: {result['meta']['cpu']}"
    )
    same = f"same greedy tokens (ours, builder): {result['same_greedy_tokens_ours_builder']}"
    return "\n".join([head, table(["folder", "TTFT ms", "decode tok/s", "vs builder"], rows), same])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    result = run(args)
    result["meta"] = run_meta(quick=False, start=start)
    result["meta"]["threads"] = args.threads
    write_result(result, args.out, report)
    return result


if __name__ == "__main__":
    main()
