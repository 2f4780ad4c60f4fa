"""`lora-fx merge` versus PEFT's from_pretrained + merge_and_unload + save_pretrained.

Each side runs in its own fresh process (so peak RSS is its own), alternately, on the same model
folder and adapter; prints a table and writes JSON
(default benchmarks/results/bench_merge_folder.json).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

PEFT_SCRIPT = """
import sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], local_files_only=True)
merged = PeftModel.from_pretrained(model, sys.argv[2]).merge_and_unload()
merged.save_pretrained(sys.argv[3])
"""


def _make_folders(root: Path, layers: int, hidden: int) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=4096,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=4,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(root / "model")
    pm = get_peft_model(
        model, LoraConfig(r=16, target_modules="all-linear", init_lora_weights=False)
    )
    pm.save_pretrained(root / "adapter")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="2 layers, hidden 128, 1 repeat")
    parser.add_argument("--out", default="benchmarks/results/bench_merge_folder.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.layers, args.hidden, args.repeats = 2, 128, 1
    root = Path(tempfile.mkdtemp(prefix="bench_merge_folder_"))
    _make_folders(root, args.layers, args.hidden)
    size_mb = sum(p.stat().st_size for p in (root / "model").glob("*.safetensors")) / 2**20
    ours, theirs = [], []
    for i in range(args.repeats):
        lf = [
            sys.executable,
            "-m",
            "lora_fx",
            "merge",
            "--model",
            str(root / "model"),
            "--adapter",
            str(root / "adapter"),
            "--out",
            str(root / f"lf{i}"),
            "-q",
        ]
        pf = [
            sys.executable,
            "-c",
            PEFT_SCRIPT,
            str(root / "model"),
            str(root / "adapter"),
            str(root / f"pf{i}"),
        ]
        # Each run is measured in its own probe process, so peak RSS is that side's alone.
        ours.append(_measure(lf))
        theirs.append(_measure(pf))
    result = {
        "config": {"layers": args.layers, "hidden": args.hidden, "model_mb": round(size_mb, 1)},
        "lora_fx": {
            "wall_s": statistics.median(w for w, _ in ours),
            "peak_mb": max(m for _, m in ours),
        },
        "peft": {
            "wall_s": statistics.median(w for w, _ in theirs),
            "peak_mb": max(m for _, m in theirs),
        },
    }
    result["ratio_wall"] = result["lora_fx"]["wall_s"] / result["peft"]["wall_s"]
    result["ratio_peak"] = result["lora_fx"]["peak_mb"] / result["peft"]["peak_mb"]
    print(
        f"model folder: {args.layers} layers, hidden {args.hidden}, {size_mb:.1f} MB safetensors; "
        f"adapter all-linear r=16; median of {args.repeats} fresh-process runs each"
    )
    print(f"{'side':<8} {'wall s':>8} {'peak RSS MB':>12}")
    for side in ("lora_fx", "peft"):
        print(f"{side:<8} {result[side]['wall_s']:>8.2f} {result[side]['peak_mb']:>12.1f}")
    print(f"lora_fx/peft: wall {result['ratio_wall']:.2f}, peak {result['ratio_peak']:.2f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    return result


def _measure(cmd: list[str]) -> tuple[float, float]:
    """Run `cmd` under /usr/bin/time-like accounting: wall seconds and its own peak RSS (MB)."""
    probe = (
        "import resource, subprocess, sys, time; s = time.perf_counter(); "
        "subprocess.run(sys.argv[1:], check=True, capture_output=True); "
        "print(time.perf_counter() - s, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe, *cmd], check=True, capture_output=True, text=True
    )
    wall, rss_kb = out.stdout.split()
    return float(wall), float(rss_kb) / 1024


if __name__ == "__main__":
    main()
