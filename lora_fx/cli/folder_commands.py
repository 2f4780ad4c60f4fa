"""`lora-fx merge` and `lora-fx inspect`: the command-line side of `model_folder.py`."""

from __future__ import annotations

import argparse
import json

from lora_fx.cli.model_folder import inspect_model_folder, merge_model_folder
from lora_fx.config import LoraConfig

__all__ = ["run_inspect", "run_merge"]


def run_merge(args: argparse.Namespace) -> int:
    """Merge `--adapter` into `--model`, write `--out`, print a short summary."""
    summary = merge_model_folder(
        args.model,
        args.adapter,
        args.out,
        dtype=args.dtype,
        safe_merge=args.safe,
        force=args.force,
        progress=not args.quiet,
        allow_non_finite=args.allow_non_finite,
    )
    if not args.quiet:
        timings = ", ".join(f"{k} {v:.2f}s" for k, v in summary.seconds.items())
        print(f"merged {summary.sites} sites into {summary.out_dir}")
        print(f"worst rounding loss of a folded delta: {summary.worst_rounding_loss:.2e}")
        print(f"timings: {timings}")
    return 0


def run_inspect(args: argparse.Namespace) -> int:
    """Print the sites a config would adapt (a table, or JSON with `--json`)."""
    targets = args.target_modules
    if targets and len(targets) == 1 and (targets[0] == "all-linear" or args.regex):
        targets = targets[0]
    cfg = LoraConfig(
        r=args.r,
        lora_alpha=args.lora_alpha if args.lora_alpha is not None else args.r,
        target_modules=targets,
        exclude_modules=args.exclude_modules,
    )
    report = inspect_model_folder(args.model, cfg)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    rows = report["sites"]
    width = max(len(row["path"]) for row in rows)
    print(
        f"{'site':<{width}}  {'kind':<9}  {'shape (in -> out)':>18}  {'r':>4}  {'LoRA params':>11}"
    )
    for row in rows:
        shape = f"{row['in']} -> {row['out']}"
        print(
            f"{row['path']:<{width}}  {row['kind']:<9}  {shape:>18}  {row['r']:>4}  "
            f"{row['lora_params']:>11,d}"
        )
    t = report["totals"]
    print(f"{t['sites']} sites, {t['lora_params']:,d} LoRA parameters")
    print(
        f"trainable params: {t['trainable_params']:,d} || all params: {t['all_params']:,d} || "
        f"trainable%: {t['trainable_percent']:.4f}"
    )
    return 0
