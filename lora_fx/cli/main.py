"""The `lora-fx` command line (also `python -m lora_fx`).

    lora-fx [--debug] [-v] <command> [options]
    lora-fx merge --model MODEL_DIR --adapter ADAPTER_DIR --out OUT_DIR [--dtype ...] [--safe]
                  [--allow-non-finite]
    lora-fx inspect --model MODEL_DIR [--target-modules ...] [--r R] [--json]
    lora-fx demo [--out DIR] [--steps N]
    lora-fx export-onnx --out model.onnx [--model DIR] [--adapter [NAME=]DIR] [--layout ...]

Rules:
1. A command is one function `_add_<name>(subparsers, common)` listed in `COMMANDS`: it adds its
   parser (with `parents=[common]`, so `--debug` and `-v` also work after the command name) and
   sets `run=_lazy("<module>", "<function>")`. The function takes the parsed arguments and returns
   the exit code; it lives beside the code it drives (`lora_fx/exporters/command.py` for
   `export-onnx`) and is imported only when its command runs, so a command whose optional
   dependencies (onnx, onnxruntime) are missing does not break the others.
2. Errors print one line, `lora-fx <command>: error: <message>`, and exit with code 2; `--debug`
   prints the traceback too. Interrupted runs exit with 130.
3. Output is a short summary on stdout; `-v` adds lora_fx's INFO log lines on stderr. Library
   messages a user cannot act on are dropped while a command runs (`lora_fx/_quiet.py`).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import traceback
from collections.abc import Callable, Sequence

from lora_fx.core.quiet import quiet_libraries

__all__ = ["COMMANDS", "build_parser", "main"]

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130

_Registrar = Callable[[argparse._SubParsersAction, argparse.ArgumentParser], None]


def build_parser() -> argparse.ArgumentParser:
    """The `lora-fx` parser with every command in `COMMANDS`."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks"
    )
    common.add_argument(
        "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log INFO lines"
    )
    parser = argparse.ArgumentParser(
        prog="lora-fx",
        description="LoRA as torch.fx graph passes: capture, inject, merge, export.",
        parents=[common],
    )
    sub = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    for add in COMMANDS:
        add(sub, common)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code.

    Args:
        argv: Arguments without the program name (default: `sys.argv[1:]`).

    Returns:
        0 on success, 2 on an error (one line on stderr), 130 when interrupted.

    Example:
        >>> main(["export-onnx", "--out", "model.onnx"])
        0
    """
    args = build_parser().parse_args(argv)
    debug = getattr(args, "debug", False)
    if getattr(args, "verbose", False):
        logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
        logging.getLogger("lora_fx").setLevel(logging.INFO)
    try:
        with quiet_libraries():
            return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print(f"lora-fx {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:
        if debug:
            traceback.print_exc()
        hint = "" if debug else " (--debug shows the traceback)"
        print(f"lora-fx {args.command}: error: {_one_line(e)}{hint}", file=sys.stderr)
        return EXIT_ERROR


def _lazy(module: str, function: str) -> Callable[[argparse.Namespace], int]:
    """A command's run function, imported when the command runs (rule 1)."""

    def run(args: argparse.Namespace) -> int:
        return getattr(importlib.import_module(module), function)(args)

    return run


def _one_line(e: BaseException) -> str:
    """The exception's message on one line, prefixed with its type unless it is lora_fx's own."""
    text = " ".join(str(e).split()) or type(e).__name__
    if type(e).__module__.startswith("lora_fx"):
        return text
    return f"{type(e).__name__}: {text}"


_EXPORT_ONNX_EPILOG = """\
examples:
  lora-fx export-onnx --out model.onnx                         embedded tiny Llama, merged
  lora-fx export-onnx --model llama_dir --adapter sql=peft_dir --out model.onnx
  lora-fx export-onnx --model llama_dir --adapter a=dir_a --adapter b=dir_b \\
      --layout inputs --out model.onnx         + model.a.onnx_adapter, model.b.onnx_adapter
  lora-fx export-onnx --model llama_dir --adapter a=dir_a --adapter b=dir_b \\
      --layout inputs --genai out_dir          onnxruntime-genai folder + a/b.onnx_adapter

layouts:
  merged        adapters folded into the weights: the base model's graph (default)
  initializers  LoRA branches kept; A/B are initializers named <site>.lora_A.<adapter>.weight
  inputs        A/B are graph inputs <site>.lora_A.weight (zero-rank default: the base model);
                one .onnx_adapter per adapter for onnxruntime's RunOptions.add_active_adapter
  stacked       every adapter in one graph; input adapter_index[batch] picks one per row
"""


def _add_export_onnx(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """`lora-fx export-onnx`: see `lora_fx/exporters/command.py`."""
    parser = sub.add_parser(
        "export-onnx",
        parents=[common],
        help="export a transformers model with PEFT adapters to ONNX",
        description="Export a transformers model folder (or an embedded tiny Llama) with "
        "optional PEFT adapters to ONNX, merged or with the LoRA tensors kept.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_EXPORT_ONNX_EPILOG,
    )
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("-o", "--out", help="the .onnx file to write")
    target.add_argument(
        "--genai",
        metavar="OUT_DIR",
        help="write a folder onnxruntime-genai loads (KV-cache decoder, genai_config.json, "
        "tokenizer files of --model; --layout merged or inputs)",
    )
    parser.add_argument(
        "--context-length",
        type=int,
        default=256,
        help="with --genai: the most tokens (prompt + new) per request (default 256)",
    )
    parser.add_argument(
        "--force", action="store_true", help="replace an existing --out (and its adapter files)"
    )
    parser.add_argument(
        "--model", help="local transformers model folder (default: embedded tiny Llama)"
    )
    parser.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="[NAME=]DIR",
        help="PEFT adapter folder; repeatable (NAME: default the folder name)",
    )
    parser.add_argument(
        "--layout",
        choices=("merged", "initializers", "inputs", "stacked"),
        help="see below (default: merged)",
    )
    parser.add_argument(
        "--unmerged", action="store_true", help="keep the LoRA branches (--layout initializers)"
    )
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    parser.add_argument("--batch", type=int, default=2, help="example batch size (default 2)")
    parser.add_argument("--seq-len", type=int, default=16, help="example length (default 16)")
    parser.add_argument("--static", action="store_true", help="fixed batch and sequence sizes")
    parser.add_argument("--opset", type=int, help="ONNX opset (default: torch's)")
    parser.add_argument("--no-optimize", action="store_true", help="skip the ONNX optimizer")
    parser.add_argument(
        "--external-data", action="store_true", help="tensors in <out>.data (auto above 1.8 GB)"
    )
    parser.add_argument(
        "--no-check", action="store_true", help="skip the onnxruntime vs torch check"
    )
    parser.set_defaults(run=_lazy("lora_fx.cli.export_command", "run_export_onnx"))


def _add_merge(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """`lora-fx merge`: see `lora_fx/folder_commands.py`."""
    parser = sub.add_parser(
        "merge",
        parents=[common],
        help="merge a PEFT adapter into a transformers model folder",
        description="Load a transformers model folder (offline), load a PEFT LoRA adapter, merge "
        "it into the weights and save the merged model with save_pretrained (tokenizer files "
        "copied). MODEL_DIR is never written; a non-empty OUT_DIR is refused unless --force.",
        epilog="example:\n  lora-fx merge --model llama --adapter sql_adapter --out llama-sql "
        "--dtype bfloat16",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True, metavar="MODEL_DIR", help="model folder")
    parser.add_argument("--adapter", required=True, metavar="ADAPTER_DIR", help="PEFT adapter")
    parser.add_argument("--out", required=True, metavar="OUT_DIR", help="merged model folder")
    parser.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), help="load dtype")
    parser.add_argument("--safe", action="store_true", help="check merged weights are finite")
    parser.add_argument("--force", action="store_true", help="replace a non-empty OUT_DIR")
    parser.add_argument(
        "--allow-non-finite",
        action="store_true",
        help="write the model even if the adapter's NaN/Inf made merged weights non-finite",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary")
    parser.set_defaults(run=_lazy("lora_fx.cli.folder_commands", "run_merge"))


def _add_inspect(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """`lora-fx inspect`: see `lora_fx/folder_commands.py`."""
    parser = sub.add_parser(
        "inspect",
        parents=[common],
        help="show the sites a LoRA config would adapt in a model folder",
        description="List the sites (path, kind, shape, LoRA parameters) that a config would "
        "adapt, with totals and PEFT's trainable figures.",
    )
    parser.add_argument("--model", required=True, metavar="MODEL_DIR", help="model folder")
    parser.add_argument(
        "--target-modules",
        nargs="+",
        default=["all-linear"],
        help="names (exact or dotted suffix), 'all-linear' (default), or one regex with --regex",
    )
    parser.add_argument("--regex", action="store_true", help="treat the one target as a regex")
    parser.add_argument("--exclude-modules", nargs="+", help="names to skip")
    parser.add_argument("--r", type=int, default=8, help="rank (default 8)")
    parser.add_argument("--lora-alpha", type=float, help="alpha (default: r)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.set_defaults(run=_lazy("lora_fx.cli.folder_commands", "run_inspect"))


def _add_demo(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """`lora-fx demo`: see `lora_fx/cli/demo.py`."""
    parser = sub.add_parser(
        "demo",
        parents=[common],
        help="the main job on an embedded tiny Llama: capture, inject, train, merge, export",
        description="Capture a tiny Llama built from a config, inject LoRA, train a few steps, "
        "merge, check, export to ONNX (when installed) and save the adapter; prints timings.",
    )
    parser.add_argument("--out", help="output folder (default: a temporary folder)")
    parser.add_argument("--steps", type=int, default=30, help="training steps (default 30)")
    parser.add_argument("--no-export", action="store_true", help="skip the ONNX export")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar or report")
    parser.set_defaults(run=_lazy("lora_fx.cli.demo", "run_command"))


# One registrar per command, in `lora-fx --help` order.
COMMANDS: tuple[_Registrar, ...] = (_add_merge, _add_inspect, _add_demo, _add_export_onnx)
