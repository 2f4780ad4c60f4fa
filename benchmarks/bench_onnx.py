"""ONNX Runtime CPU latency of lora_fx exports, side by side in one run, on a Llama-like model.

    python benchmarks/bench_onnx.py               # full run (a few minutes on 2 CPU cores)
    python benchmarks/bench_onnx.py --quick       # smoke mode: 2 layers, few rounds
    python benchmarks/bench_onnx.py --threads 2   # intra-op threads for torch and onnxruntime
    python benchmarks/bench_onnx.py --out x.json  # JSON path (default results/bench_onnx.json)

Variants (one LlamaForCausalLM from config, hidden 256 unless `--hidden`, all-linear r=8,
lora_alpha=16, random nonzero B):
1. base:       `export_onnx` of the captured graph before inject (the reference, ratio 1.00)
2. merged:     `export_onnx(gm)`: the adapter folded in; target ratio 1.00 (same ops as base)
3. unmerged:   `export_onnx(gm, merged=False)`: LoRA branches as initializers; target: no more than
               the branches' extra FLOPs (column "FLOP bound")
4. inputs:     `lora_layout="inputs"`, the adapter chosen per run with `RunOptions` (multi-LoRA)
5. stacked:    `lora_layout="stacked"` with two adapters, every row on the first
6. torch:      the captured graph run eagerly (`torch.no_grad`), unmerged, and the base graph

Method:
1. Every ONNX file goes through the same exporter and optimizer; sessions use the CPU provider with
   onnxruntime's default graph optimizations, the same intra-op threads as torch (default 1: on a
   shared machine, spinning thread pools make multi-threaded figures noise), and no spinning of
   idle threads (which would slow whatever runs next).
2. Outputs are checked first: each variant against the torch graph it came from, and the adapter
   against the base (it must change the output, or the comparison is vacuous).
3. Variants run in interleaved rounds, in a shuffled order per round, one call each, GC off; a
   ratio is the median over rounds of that round's ratio to base, with its 25th-75th percentiles.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from _common import llama, median_ms, ratios, shuffled_rounds, spread, table, timed

import lora_fx
from lora_fx.exporters import export_onnx, ort_run_options, write_ort_adapter

HEADS, KV_HEADS, VOCAB = 4, 2, 1024
BATCH, SEQ = 4, 64
RANK, ALPHA = 8, 16
DEFAULT_OUT = Path(__file__).parent / "results" / "bench_onnx.json"
_ORT = ("base", "merged", "unmerged", "inputs", "stacked")
_TORCH = ("torch_base", "torch_unmerged")


def adapter(gm: torch.fx.GraphModule, name: str, seed: int) -> None:
    """An all-linear adapter with random nonzero B (so outputs differ from the base)."""
    torch.manual_seed(seed)
    cfg = lora_fx.LoraConfig(
        r=RANK, lora_alpha=ALPHA, target_modules="all-linear", init_lora_weights=False
    )
    lora_fx.inject(gm, cfg, name)
    with torch.no_grad():  # PEFT-like magnitudes: B small, so the delta is a perturbation
        for pname, param in gm.named_parameters():
            if f".lora_B.{name}." in pname:
                param.mul_(0.05)


def progress(text: str) -> None:
    print(f"[bench_onnx] {text}", file=sys.stderr, flush=True)


def session(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    # Idle ORT threads spin by default, stealing the cores from whatever runs next (torch here).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def logits(out: Any) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out


def extra_flops(gm: torch.fx.GraphModule, base: nn.Module) -> dict[str, float]:
    """Per-token multiply-add FLOPs of the LoRA branches vs the model's (as bench_core counts)."""
    state = gm.meta["lora_fx"]
    branch = 0
    for site in state.adapters["a"].sites:
        a = gm.get_parameter(f"{site}.lora_A.a.weight")
        b = gm.get_parameter(f"{site}.lora_B.a.weight")
        branch += 2 * a.shape[0] * (a.shape[1] + b.shape[0])
    linears = sum(
        2 * m.in_features * m.out_features for m in base.modules() if isinstance(m, nn.Linear)
    )
    attention = base.config.num_hidden_layers * 2 * 2 * SEQ * base.config.hidden_size
    model = linears + attention
    return {
        "branch_flops_per_token": branch,
        "model_flops_per_token": model,
        "extra": branch / model,
    }


def build(
    layers: int, hidden: int, folder: Path
) -> tuple[dict[str, Callable[[], Any]], dict[str, Any]]:
    """Export every variant; returns the run functions and the export/check figures."""
    base_model = llama(
        layers,
        hidden=hidden,
        intermediate=2 * hidden,
        heads=HEADS,
        kv_heads=KV_HEADS,
        vocab=VOCAB,
        seq=SEQ,
    )
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    gm_base = lora_fx.capture(base_model, (ids,), {"use_cache": False}).eval()
    gm = lora_fx.capture(base_model, (ids,), {"use_cache": False})  # shares the weights
    adapter(gm, "a", seed=2)
    adapter(gm, "b", seed=3)
    lora_fx.set_adapter(gm, "a")
    gm.eval()
    info: dict[str, Any] = {"export_s": {}, "nodes": {}, "checks": {}}

    def export(name: str, graph: torch.fx.GraphModule, **kwargs: Any):
        seconds, result = timed(
            lambda: export_onnx(graph, (ids,), folder / f"{name}.onnx", **kwargs)
        )
        info["export_s"][name] = seconds
        info["nodes"][name] = sum(result.op_counts.values())
        return result

    files = {
        "base": export("base", gm_base),
        "merged": export("merged", gm),
        "unmerged": export("unmerged", gm, merged=False),
        "inputs": export("inputs", gm, merged=False, lora_layout="inputs"),
        "stacked": export("stacked", gm, merged=False, lora_layout="stacked"),
    }
    info["merged_op_counts_equal_base"] = files["merged"].op_counts == files["base"].op_counts
    write_ort_adapter(gm, folder / "a.onnx_adapter", "a", model=files["inputs"].path)
    threads = torch.get_num_threads()
    progress(f"exported {len(files)} files in {sum(info['export_s'].values()):.0f} s")
    sessions = {name: session(f.path, threads) for name, f in files.items()}
    feed = {"input_ids": ids.numpy()}
    stacked_feed = {**feed, "adapter_index": files["stacked"].adapter_index(["a"] * BATCH)}
    options = ort_run_options(folder / "a.onnx_adapter")
    runs: dict[str, Callable[[], Any]] = {
        "base": lambda: sessions["base"].run(None, feed),
        "merged": lambda: sessions["merged"].run(None, feed),
        "unmerged": lambda: sessions["unmerged"].run(None, feed),
        "inputs": lambda: sessions["inputs"].run(None, feed, options),
        "stacked": lambda: sessions["stacked"].run(None, stacked_feed),
        "torch_base": lambda: gm_base(ids),
        "torch_unmerged": lambda: gm(ids),
    }
    with torch.no_grad():
        want, want_base = logits(gm(ids)).numpy(), logits(gm_base(ids)).numpy()
        got = {name: runs[name]()[0] for name in _ORT}
    info["checks"] = {
        "adapter_changes_output (must be >0)": float(np.abs(want - want_base).max()),
        "base_vs_torch": float(np.abs(got["base"] - want_base).max()),
        **{f"{n}_vs_torch": float(np.abs(got[n] - want).max()) for n in _ORT[1:]},
    }
    info["flops"] = extra_flops(gm, base_model)
    info["threads"] = threads
    return runs, info


def bench(runs: dict[str, Callable[[], Any]], *, budget_s: float, min_rounds: int) -> dict:
    """Interleaved rounds of one call per variant; medians of times and of ratios to base."""
    with torch.no_grad():
        for _ in range(3):  # warm-up: allocator, first-call paths, ORT's prepacking
            for fn in runs.values():
                fn()
        round_s, _ = timed(lambda: [fn() for fn in runs.values()])
        rounds = max(min_rounds, min(500, int(budget_s / round_s)))
        progress(f"timing {rounds} rounds of {round_s:.2f} s")
        samples = shuffled_rounds(runs, rounds)
    return {
        "rounds": rounds,
        "median_ms": {n: median_ms(s) for n, s in samples.items()},
        "ratio_to_base": ratios(samples, [(name, name, "base") for name in runs]),
    }


_TARGET = {
    "base": "1.00",
    "merged": "1.00",
    "unmerged": "<= FLOP bound",
    "inputs": "",
    "stacked": "",
    "torch_base": "",
    "torch_unmerged": "",
}


def report(result: dict[str, Any]) -> str:
    meta, row = result["meta"], result["row"]
    bound = 1 + row["flops"]["extra"]
    out = [
        f"bench_onnx: onnxruntime {meta['onnxruntime']} (CPU) | torch {meta['torch']} | "
        f"{row['threads']} thread(s) | {meta['machine']}",
        f"LlamaForCausalLM {row['layers']} layers, hidden {row['hidden']}, "
        f"intermediate {2 * row['hidden']}, "
        f"vocab {VOCAB} | all-linear r={RANK} alpha={ALPHA} | input {BATCH}x{SEQ} | "
        f"{row['timing']['rounds']} rounds",
        "",
        table(
            ["variant", "median ms", "ratio to base [p25-p75]", "target", "ONNX nodes", "export s"],
            [
                [
                    name,
                    f"{row['timing']['median_ms'][name]:.2f}",
                    spread(row["timing"]["ratio_to_base"][name]),
                    _TARGET[name].replace("FLOP bound", f"{bound:.3f}"),
                    str(row["nodes"].get(name, "")),
                    f"{row['export_s'][name]:.1f}" if name in row["export_s"] else "",
                ]
                for name in row["timing"]["median_ms"]
            ],
        ),
        "",
        f"merged ONNX op counts equal the base export's: {row['merged_op_counts_equal_base']}; "
        f"LoRA extra FLOPs: {100 * row['flops']['extra']:.2f}% of the model's",
        "checks (max |logit| difference): "
        + ", ".join(f"{k} {v:.1e}" for k, v in row["checks"].items()),
    ]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 layers, few rounds")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256, help="hidden size (intermediate: 2x)")
    parser.add_argument("--seconds", type=float, default=60.0, help="timing budget")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    layers, budget, min_rounds = (2, 3.0, 5) if args.quick else (args.layers, args.seconds, 30)
    torch.set_num_threads(args.threads)

    import onnxruntime

    with tempfile.TemporaryDirectory() as folder:
        runs, info = build(layers, args.hidden, Path(folder))
        info["layers"], info["hidden"] = layers, args.hidden
        info["timing"] = bench(runs, budget_s=budget, min_rounds=min_rounds)
    result = {
        "meta": {
            "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__,
            "lora_fx": lora_fx.__version__,
            "machine": f"{platform.machine()} {platform.processor() or platform.system()}",
            "quick": args.quick,
        },
        "row": info,
    }
    print(report(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.out}")
    return result


if __name__ == "__main__":
    main()
