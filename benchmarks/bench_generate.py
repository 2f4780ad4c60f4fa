"""Text generation with a LoRA adapter: time to first token and decode tokens/s, side by side.

    python benchmarks/bench_generate.py          # 4-layer Llama-like: prompt 128, 64 new, b 1, 8
    python benchmarks/bench_generate.py --quick  # smoke: 2 layers, prompt 16, 8 new, no inductor

Variants (same model, same PEFT adapter: all-linear, r=8, init_lora_weights=False; greedy):
1. `peft eager`: PeftModel.generate, transformers' dynamic cache.
2. `peft static+compile`: PeftModel.generate with `cache_implementation="static"` and a
   `CompileConfig` (transformers then compiles its decode step with inductor, on CPU too; its
   compile time is left out of the timed runs).
3. `lora_fx eager`: lora_fx.generate on capture_for_generation's graph with the adapter loaded.
4. `lora_fx compiled`: the same graph under torch.compile (inductor); compiles counted.
5. `genai merged` / `genai multi-LoRA`: onnxruntime-genai on export_genai's folders (merged
   weights; and LoRA A/B as inputs fed from the adapter's `.onnx_adapter` file), when
   onnxruntime-genai is installed.

Method: each variant generates `--runs` times (after one untimed warm-up), variants interleaved;
a streamer records when the prompt and each token arrive, so time to first token (TTFT) is
prefill + first token, and decode tokens/s is batch x (new - 1) over the time after the first
token. Medians are quoted. EOS is off so every run makes exactly `--new` tokens. Every variant's
tokens are checked against PEFT's eager tokens. The KV cache's bytes are compared with the theory
(2 x layers x batch x kv_heads x cache length x head_dim x dtype bytes).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import cpu_model, fill_defaults, llama, run_meta, table, write_result
from bench_core import MODEL

import lora_fx

DEFAULT_OUT = Path(__file__).parent / "results" / "bench_generate.json"


class _Clock:
    """A streamer that notes when the prompt and each step's tokens arrive."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, _value: Any) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def _timing(run: Callable[[_Clock], torch.Tensor], batch: int) -> tuple[float, float, torch.Tensor]:
    """(TTFT s, decode tokens/s, tokens) of one generate call."""
    clock = _Clock()
    tokens = run(clock)
    prompt_at, first_at, last_at = clock.times[0], clock.times[1], clock.times[-1]
    steps = len(clock.times) - 2  # tokens after the first
    return first_at - prompt_at, batch * steps / (last_at - first_at), tokens


def _variants(base, args, ids, folder) -> tuple[dict[str, Callable], dict[str, Any]]:
    """name -> run(streamer) for every variant, and facts about them (compile counts, cache)."""
    from peft import LoraConfig, get_peft_model

    facts: dict[str, Any] = {}
    pm = get_peft_model(
        copy.deepcopy(base),
        LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False),
    ).eval()
    pm.generation_config.eos_token_id = None
    pm.generation_config.pad_token_id = 0
    pm.save_pretrained(folder / "adapter")
    mask = torch.ones_like(ids)

    def peft_run(clock, **kw):
        with torch.no_grad():
            return pm.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=args.new,
                do_sample=False,
                streamer=clock,
                **kw,
            )

    gm = lora_fx.capture_for_generation(
        base, max_batch_size=ids.shape[0], max_cache_len=ids.shape[1] + args.new
    )
    lora_fx.load_adapter(gm, folder / "adapter")
    spec = gm.meta["lora_fx_generation"]
    held = sum(b.numel() * b.element_size() for n, b in gm.named_buffers() if "kv_cache" in n)
    facts["kv_cache_bytes"] = held
    facts["kv_cache_bytes_theory"] = (
        2
        * spec.num_layers
        * spec.max_batch_size
        * spec.num_kv_heads
        * spec.max_cache_len
        * spec.head_dim
        * 4
    )

    def fx_run(graph):
        return lambda clock: lora_fx.generate(
            graph, ids, mask, max_new_tokens=args.new, eos_token_id=(), streamer=clock
        )

    variants = {"peft eager": peft_run, "lora_fx eager": fx_run(gm)}
    if args.compile:
        from torch._dynamo.testing import CompileCounterWithBackend

        counter = CompileCounterWithBackend("inductor")
        compiled = torch.compile(gm, backend=counter)
        start = time.perf_counter()
        fx_run(compiled)(_Clock())
        facts["lora_fx compiled: first call s"] = time.perf_counter() - start
        variants["lora_fx compiled"] = fx_run(compiled)
        facts["counter"] = counter
        from transformers import CompileConfig

        # transformers compiles the decode step itself only on GPUs unless told to
        compile_config = CompileConfig(mode="default")
        compile_config._compile_all_devices = True  # transformers' switch for non-GPU devices
        static = {"cache_implementation": "static", "compile_config": compile_config}
        start = time.perf_counter()
        peft_run(_Clock(), **static)
        facts["peft static+compile: first call s"] = time.perf_counter() - start
        variants["peft static+compile"] = lambda clock: peft_run(clock, **static)
    variants.update(_genai_variants(gm, ids, args, folder))
    return variants, facts


def _genai_variants(gm, ids, args, folder) -> dict[str, Callable]:
    """onnxruntime-genai runs of export_genai's merged and multi-LoRA folders (when installed)."""
    try:
        import onnxruntime_genai as og
    except ImportError as e:
        print(f"(onnxruntime-genai variants skipped: {e})")
        return {}
    import numpy as np
    from _genai import pin_threads

    from lora_fx.exporters import export_genai

    export_genai(gm, folder / "genai_merged", merged=True)
    export_genai(gm, folder / "genai_lora", merged=False)
    for name in ("genai_merged", "genai_lora"):  # the same thread count as torch's
        pin_threads(folder / name, args.threads)
    merged = og.Model(str(folder / "genai_merged"))
    unmerged = og.Model(str(folder / "genai_lora"))
    adapters = og.Adapters(unmerged)
    adapters.load(str(folder / "genai_lora" / "default.onnx_adapter"), "default")
    prompt = ids.numpy().astype(np.int32)
    length = prompt.shape[1] + args.new

    def run(model, with_adapter):
        def go(clock):
            params = og.GeneratorParams(model)
            # min_length: EOS is off, as in the torch variants
            params.set_search_options(
                max_length=length, min_length=length, do_sample=False, batch_size=prompt.shape[0]
            )
            generator = og.Generator(model, params)
            if with_adapter:
                generator.set_active_adapter(adapters, "default")
            clock.put(prompt)
            generator.append_tokens(prompt)
            while not generator.is_done():
                generator.generate_next_token()
                clock.put(None)
            rows = [np.asarray(generator.get_sequence(i)) for i in range(prompt.shape[0])]
            return torch.from_numpy(np.stack(rows).astype(np.int64))

        return go

    return {"genai merged": run(merged, False), "genai multi-LoRA": run(unmerged, True)}


def bench_batch(base, args, batch: int) -> dict[str, Any]:
    """Every variant at one batch size: medians of TTFT and decode tokens/s, token checks."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, base.config.vocab_size, (batch, args.prompt), generator=gen)
    with tempfile.TemporaryDirectory() as tmp:
        variants, facts = _variants(base, args, ids, Path(tmp))
        for run in variants.values():  # warm-up
            _timing(run, batch)
        samples: dict[str, list[tuple[float, float]]] = {n: [] for n in variants}
        tokens: dict[str, torch.Tensor] = {}
        for _ in range(args.runs):
            for name, run in variants.items():
                ttft, rate, out = _timing(run, batch)
                samples[name].append((ttft, rate))
                tokens[name] = out
    reference = tokens["peft eager"]
    counter = facts.pop("counter", None)
    rows = {
        name: {
            "ttft_ms": 1e3 * statistics.median(t for t, _ in values),
            "decode_tok_s": statistics.median(r for _, r in values),
            "tokens_equal_peft": bool(torch.equal(tokens[name].cpu(), reference.cpu())),
        }
        for name, values in samples.items()
    }
    if counter is not None:
        facts["lora_fx compiled: graphs compiled"] = counter.frame_count
    return {"batch": batch, "variants": rows, **facts}


def report(result: dict[str, Any]) -> str:
    """The table of every batch size, with ratios to PEFT eager."""
    lines = [
        f"Llama-like {result['layers']} layers, hidden {MODEL['hidden']}, prompt {result['prompt']}"
        f", {result['new']} new tokens, {result['meta']['threads']} thread(s), "
        f"CPU: {result['cpu']}"
    ]
    for entry in result["batches"]:
        base = entry["variants"]["peft eager"]["decode_tok_s"]
        rows = [
            [
                name,
                f"{v['ttft_ms']:.1f}",
                f"{v['decode_tok_s']:.1f}",
                f"{v['decode_tok_s'] / base:.2f}x",
                "yes" if v["tokens_equal_peft"] else "NO",
            ]
            for name, v in entry["variants"].items()
        ]
        lines.append(f"\nbatch {entry['batch']}")
        lines.append(
            table(["variant", "TTFT ms", "decode tok/s", "vs peft eager", "tokens = peft"], rows)
        )
        extras = {k: v for k, v in entry.items() if k not in ("batch", "variants")}
        lines += [
            f"  {k}: {v:.3g}" if isinstance(v, float) else f"  {k}: {v}" for k, v in extras.items()
        ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke mode")
    parser.add_argument("--layers", type=int)
    parser.add_argument("--prompt", type=int)
    parser.add_argument("--new", type=int)
    parser.add_argument("--batches", type=int, nargs="+")
    parser.add_argument("--runs", type=int)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if args.quick:
        args.compile = False
    return fill_defaults(
        args,
        quick={"layers": 2, "prompt": 16, "new": 8, "batches": [1, 2], "runs": 1},
        full={"layers": 4, "prompt": 128, "new": 64, "batches": [1, 8], "runs": 3},
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    start = time.perf_counter()
    torch.set_num_threads(args.threads)
    base = llama(args.layers, seq=args.prompt + args.new, **MODEL)
    base.generation_config.eos_token_id = None
    result = {
        "layers": args.layers,
        "prompt": args.prompt,
        "new": args.new,
        "cpu": cpu_model(),
        "batches": [bench_batch(base, args, b) for b in args.batches],
    }
    result["meta"] = run_meta(quick=args.quick, start=start)
    write_result(result, args.out, report)
    return result


if __name__ == "__main__":
    main()
