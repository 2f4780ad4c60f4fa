"""The main job on an embedded default: `python -m lora_fx.demo`.

A tiny Llama built from a config (random weights, nothing downloaded) is captured with torch.export,
given LoRA on every linear layer, trained for a few steps on a tiny language (fresh random
strings of four 8-token motifs), merged, checked against the unmerged outputs, and its adapter
saved in PEFT's layout. LoRA goes on `lm_head` too: a freshly initialised head (std 0.02) caps the
logits near ±1.3, so without it the loss cannot fall far whatever the hidden states learn.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

import lora_fx
from lora_fx import LoraConfig
from lora_fx.core.quiet import quiet_libraries

__all__ = ["main", "run_command", "run_demo"]

_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]


def run_demo(
    out_dir: str, *, steps: int = 30, quiet: bool = False, export: bool = True
) -> dict[str, float]:
    """Capture -> inject -> train -> merge -> check -> save; returns the figures it printed."""
    from tqdm.auto import tqdm
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = LlamaForCausalLM(config)
    # The task: next token in fresh random strings of four fixed 8-token motifs.
    generator = torch.Generator().manual_seed(0)
    motifs = torch.randperm(256, generator=generator)[:32].view(4, 8)

    def batch() -> torch.Tensor:  # [8, 16]: two motifs per sequence
        return motifs[torch.randint(0, 4, (8, 2), generator=generator)].reshape(8, 16)

    ids = batch()
    timings: dict[str, float] = {}

    start = time.perf_counter()
    gm = lora_fx.capture(model, (ids,), {"use_cache": False})
    timings["capture_s"] = time.perf_counter() - start
    start = time.perf_counter()
    gm = lora_fx.inject(gm, LoraConfig(r=8, lora_alpha=16, target_modules=_TARGETS))
    timings["inject_s"] = time.perf_counter() - start
    if not quiet:
        lora_fx.print_trainable_parameters(gm)

    optimizer = torch.optim.AdamW(lora_fx.trainable_parameters(gm).values(), lr=1e-2)
    gm.train()
    losses = []
    start = time.perf_counter()
    for _ in (bar := tqdm(range(steps), desc="train", disable=quiet)):
        ids = batch()
        logits = gm(ids).logits
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, 256), ids[:, 1:].reshape(-1)
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
    timings["train_s"] = time.perf_counter() - start

    gm.eval()
    with torch.no_grad():
        trained = gm(ids).logits
        adapter_dir = Path(out_dir) / "adapter"
        lora_fx.save_adapter(gm, adapter_dir)
        start = time.perf_counter()
        lora_fx.merge_and_unload(gm)
        timings["merge_and_unload_s"] = time.perf_counter() - start
        merged = gm(ids).logits
    max_diff = (merged - trained).abs().max().item()
    figures = {
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "merged_max_abs_diff": max_diff,
        **timings,
    }
    onnx_path = _export(gm, ids, Path(out_dir) / "model.onnx", figures) if export else None
    if not quiet:
        print(f"loss: {losses[0]:.3f} -> {losses[-1]:.3f} in {steps} steps")
        print(f"merged vs trained logits: max |diff| = {max_diff:.2e}")
        print(f"adapter saved to {adapter_dir} (PEFT layout)")
        if onnx_path is not None:
            diff = figures["onnx_max_abs_diff"]
            print(f"merged ONNX model: {onnx_path} (onnxruntime vs torch max |diff| {diff:.2e})")
        elif export:
            print("ONNX export skipped: pip install 'lora_fx[onnx]' for it")
        print("timings: " + ", ".join(f"{k} {v:.2f}" for k, v in timings.items()))
    if max_diff > 1e-4:
        raise RuntimeError(f"merged graph differs from the trained one by {max_diff:.2e}")
    return figures


def _export(gm, ids: torch.Tensor, path: Path, figures: dict) -> Path | None:
    """Export the merged graph to ONNX and check it in onnxruntime, when onnx is installed."""
    try:
        import onnxruntime

        from lora_fx.exporters import export_onnx
    except ImportError:
        return None
    start = time.perf_counter()
    export_onnx(gm, (ids,), path)
    figures["export_onnx_s"] = time.perf_counter() - start
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: ids.numpy()})[0])
    with torch.no_grad():
        figures["onnx_max_abs_diff"] = (got - gm(ids).logits).abs().max().item()
    return path


def run_command(args) -> int:
    """`lora-fx demo`: the main job, with `--out`, `--steps`, `--quiet`, `--no-export`."""
    with _out_folder(args.out, quiet=args.quiet) as out:
        run_demo(out, steps=args.steps, quiet=args.quiet, export=not args.no_export)
    return 0


def main(argv: list[str] | None = None) -> None:
    """Command line entry: `python -m lora_fx.demo [--out DIR] [--steps N]`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="output folder (default: a temporary folder)")
    parser.add_argument("--steps", type=int, default=30, help="training steps")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (tiny model: 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    with quiet_libraries(), _out_folder(args.out, quiet=False) as out:
        run_demo(out, steps=args.steps)


@contextlib.contextmanager
def _out_folder(out: str | None, *, quiet: bool) -> Iterator[str]:
    """`out`, or a temporary folder that is removed afterwards (and a line that says so)."""
    if out is not None:
        yield out
        return
    with tempfile.TemporaryDirectory(prefix="lora_fx_demo_") as tmp:
        yield tmp
    if not quiet:
        print(f"removed the temporary folder {tmp}; --out DIR keeps the files")


if __name__ == "__main__":
    main()
