"""The main job on an embedded default: `python -m lora_fx.demo`.

A tiny Llama built from a config (random weights, nothing downloaded) is captured with torch.export,
given LoRA on every linear layer, trained for a few steps to copy a repeating token pattern, merged,
checked against the unmerged outputs, and its adapter saved in PEFT's layout.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

import lora_fx
from lora_fx import LoraConfig

__all__ = ["main", "run_demo"]


def run_demo(out_dir: str, *, steps: int = 30, quiet: bool = False) -> dict[str, float]:
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
    # A learnable task: each sequence repeats a random 4-token motif; predict the next token.
    motif = torch.randint(0, 256, (8, 4))
    ids = motif.repeat(1, 4)  # [8, 16]
    timings: dict[str, float] = {}

    start = time.perf_counter()
    gm = lora_fx.capture(model, (ids,), {"use_cache": False})
    timings["capture_s"] = time.perf_counter() - start
    start = time.perf_counter()
    gm = lora_fx.inject(gm, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    timings["inject_s"] = time.perf_counter() - start
    if not quiet:
        lora_fx.print_trainable_parameters(gm)

    optimizer = torch.optim.AdamW(lora_fx.trainable_parameters(gm).values(), lr=1e-2)
    gm.train()
    losses = []
    start = time.perf_counter()
    for _ in (bar := tqdm(range(steps), desc="train", disable=quiet)):
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
    if not quiet:
        print(f"loss: {losses[0]:.3f} -> {losses[-1]:.3f} in {steps} steps")
        print(f"merged vs trained logits: max |diff| = {max_diff:.2e}")
        print(f"adapter saved to {adapter_dir} (PEFT layout)")
        print("timings: " + ", ".join(f"{k} {v:.2f}" for k, v in timings.items()))
    if max_diff > 1e-4:
        raise RuntimeError(f"merged graph differs from the trained one by {max_diff:.2e}")
    return figures


def main(argv: list[str] | None = None) -> None:
    """Command line entry: `python -m lora_fx.demo [--out DIR] [--steps N]`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="output folder (default: a temporary folder)")
    parser.add_argument("--steps", type=int, default=30, help="training steps")
    args = parser.parse_args(argv)
    out = args.out or tempfile.mkdtemp(prefix="lora_fx_demo_")
    run_demo(out, steps=args.steps)


if __name__ == "__main__":
    main()
