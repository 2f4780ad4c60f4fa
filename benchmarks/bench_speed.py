"""Unmerged LoRA forward vs the base model: lora_fx branch layouts and PEFT, eager, compiled, ORT.

    python benchmarks/bench_speed.py               # 4-layer Llama-like, two timing runs (~6 min)
    python benchmarks/bench_speed.py --quick       # smoke mode: 2 layers, short runs, no inductor
    python benchmarks/bench_speed.py --no-compile  # skip the inductor part

Figures (LlamaForCausalLM from config as in bench_core: hidden 256, intermediate 512,
target_modules="all-linear", r=8, 1 thread, no_grad, eval; 4 x 64, 1 x 128 and 8 x 128 tokens,
`--shapes`):
1. eager: lora_fx graph in layouts plain / fused / weight / auto (default), over the captured
   base graph;
   PEFT unmerged over the eager HF model.
2. compiled (torch.compile, inductor): the same ratios on compiled modules.
3. ONNX Runtime (CPU EP, 1 thread): export_onnx(merged=False) per layout over the base export.
4. The FLOP ratio: 1 + branch FLOPs / model FLOPs per token (bench_core.extra_flops).
5. A torch.profiler table of one default (auto) unmerged eager forward (where the time goes).

Method: every timing section runs `--runs` times (default 2); each run is interleaved rounds, one
call per variant in shuffled order, and a ratio is the median over rounds of that round's ratio.
All lora_fx variants hold PEFT's adapter (init_lora_weights=False, loaded with load_adapter), and
their logits are checked against PEFT's.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import interleaved, llama, logits, median_ms, ratios, run_meta, spread
from bench_core import BATCH, MODEL, SEQ, VOCAB, extra_flops, peft_config

import lora_fx

DEFAULT_OUT = Path(__file__).parent / "results" / "bench_speed.json"
LAYOUTS = ("plain", "fused", "weight", "auto")
# (label, numerator, denominator)
_RATIOS = (
    *((f"fx {lay} / base", f"fx_{lay}", "graph") for lay in LAYOUTS),
    ("peft / base", "peft", "hf"),
)


def timing_runs(variants, pairs, args) -> list[dict[str, Any]]:
    runs = []
    for _ in range(args.runs):
        samples = interleaved(variants, seconds=args.seconds, min_rounds=args.min_rounds)
        runs.append(
            {
                "rounds": len(next(iter(samples.values()))),
                "median_ms": {k: median_ms(v) for k, v in samples.items()},
                "ratios": ratios(samples, pairs),
            }
        )
    return runs


def build(layers: int, batch: int, seq: int):
    """Base HF model, PEFT model, captured base graph and one lora_fx graph per layout."""
    from peft import get_peft_model

    base = llama(layers, seq=seq, **MODEL)
    ids = torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(1))
    gm0 = lora_fx.capture(copy.deepcopy(base), (ids,), {"use_cache": False}).eval()
    torch.manual_seed(2)
    pm = get_peft_model(copy.deepcopy(base), peft_config(init_lora_weights=False)).eval()
    graphs = {}
    with tempfile.TemporaryDirectory() as adapter_dir:
        pm.save_pretrained(adapter_dir)
        for layout in LAYOUTS:
            gm = lora_fx.load_adapter(copy.deepcopy(gm0), adapter_dir)
            graphs[layout] = lora_fx.set_layout(gm, layout).eval()
    return base, pm, gm0, graphs, ids


def checks(modules: dict[str, Callable], ids: torch.Tensor) -> dict[str, float]:
    with torch.no_grad():
        out = {k: logits(f(ids)) for k, f in modules.items()}
    result = {"adapter_changes_output (must be >0)": (out["peft"] - out["hf"]).abs().max().item()}
    for layout in LAYOUTS:
        key = f"fx_{layout}"
        if key in out:
            result[f"{key}_vs_peft"] = (out[key] - out["peft"]).abs().max().item()
    return result


def eager_section(base, pm, gm0, graphs, ids, args) -> dict[str, Any]:
    modules = {"hf": base, "graph": gm0, "peft": pm}
    modules.update({f"fx_{lay}": gm for lay, gm in graphs.items()})
    with torch.no_grad():
        runs = timing_runs({k: (lambda f=f: f(ids)) for k, f in modules.items()}, _RATIOS, args)
    return {"checks": checks(modules, ids), "runs": runs}


def compiled_section(base, pm, gm0, graphs, ids, args) -> dict[str, Any]:
    torch._dynamo.reset()
    modules = {"hf": base, "graph": gm0, "peft": pm}
    modules.update({f"fx_{lay}": graphs[lay] for lay in ("fused", "weight", "auto")})
    compiled, compile_s = {}, {}
    with torch.no_grad():
        for name, module in modules.items():
            fn = torch.compile(module)
            t0 = time.perf_counter()
            fn(ids)
            compile_s[name] = time.perf_counter() - t0
            compiled[name] = fn
            print(f"  compiled {name} in {compile_s[name]:.1f} s", flush=True)
        runs = timing_runs({k: (lambda f=f: f(ids)) for k, f in compiled.items()}, _RATIOS, args)
    return {"checks": checks(compiled, ids), "compile_s": compile_s, "runs": runs}


def ort_section(gm0, graphs, ids, args) -> dict[str, Any]:
    import onnxruntime as ort

    from lora_fx.exporters import export_onnx

    feeds, sessions = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        items = {"graph": gm0, **{f"fx_{lay}": gm for lay, gm in graphs.items()}}
        for name, gm in items.items():
            path = Path(tmp) / f"{name}.onnx"
            export_onnx(gm, (ids,), path, merged=name == "graph")  # the base has no adapter
            options = ort.SessionOptions()
            options.intra_op_num_threads = options.inter_op_num_threads = 1
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            sessions[name] = session
            feeds[name] = {session.get_inputs()[0].name: ids.numpy()}
        outs = {k: torch.from_numpy(s.run(None, feeds[k])[0]) for k, s in sessions.items()}
        with torch.no_grad():
            reference = logits(graphs["fused"](ids))
        check = {f"{k}_vs_torch": (v - reference).abs().max().item() for k, v in outs.items()}
        check["graph_vs_torch_unadapted (must be >0)"] = check.pop("graph_vs_torch")
        variants = {k: (lambda s=s, k=k: s.run(None, feeds[k])) for k, s in sessions.items()}
        runs = timing_runs(variants, _RATIOS[: len(LAYOUTS)], args)
    return {"checks": check, "runs": runs}


def profile_table(gm: torch.fx.GraphModule, ids: torch.Tensor, rows: int = 12) -> str:
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad():
        for _ in range(3):
            gm(ids)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(5):
                gm(ids)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def report(result: dict[str, Any]) -> str:
    flop = 1 + result["flops"]["extra_vs_model"]
    lines = [f"FLOP ratio (unmerged/base, whole model): {flop:.4f}; goal <= {flop + 0.05:.4f}", ""]
    for section in ("eager", "compiled", "ort"):
        if section not in result:
            continue
        runs = result[section]["runs"]
        labels = list(runs[0]["ratios"])
        lines.append(f"{section}: median ratio per round [p25-p75], one column per run")
        lines.append("| ratio | " + " | ".join(f"run {i + 1}" for i in range(len(runs))) + " |")
        lines.append("|---|" + "---|" * len(runs))
        for label in labels:
            cells = " | ".join(spread(run["ratios"][label]) for run in runs)
            lines.append(f"| {label} | {cells} |")
        lines.append(f"checks: {result[section]['checks']}")
        lines.append("")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(1)
    start = time.perf_counter()
    result: dict[str, Any] = {"shapes": {}}
    for shape in args.shapes:
        batch, seq = (int(n) for n in shape.split("x"))
        print(f"== {batch} x {seq} tokens", flush=True)
        result["shapes"][shape] = run_shape(args, batch, seq)
    result["meta"] = run_meta(quick=args.quick, start=start)
    return result


def run_shape(args: argparse.Namespace, batch: int, seq: int) -> dict[str, Any]:
    base, pm, gm0, graphs, ids = build(args.layers, batch, seq)
    result: dict[str, Any] = {
        "config": {"layers": args.layers, "runs": args.runs, "batch": batch, "seq": seq},
        "flops": extra_flops(base, pm, seq=seq),
    }
    print("eager ...", flush=True)
    result["eager"] = eager_section(base, pm, gm0, graphs, ids, args)
    result["profile_auto_eager"] = profile_table(graphs["auto"], ids)
    if not args.no_compile:
        print("compiled (inductor) ...", flush=True)
        result["compiled"] = compiled_section(base, pm, gm0, graphs, ids, args)
    if not args.no_ort:
        print("onnx runtime ...", flush=True)
        result["ort"] = ort_section(gm0, graphs, ids, args)
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--no-ort", action="store_true")
    parser.add_argument(
        "--shapes",
        type=lambda text: text.split(","),
        default=[f"{BATCH}x{SEQ}", "1x128", "8x128"],
        help="BATCHxSEQ token shapes, comma-separated",
    )
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=25.0, help="per timing run")
    parser.add_argument("--min-rounds", type=int, default=20)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if args.quick:
        args.layers, args.seconds, args.min_rounds, args.no_compile = 2, 2.0, 5, True
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    result = run(args)
    for shape, shaped in result["shapes"].items():
        print(f"== {shape} tokens")
        print(shaped["profile_auto_eager"])
        print(report(shaped))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
