"""Quickstart: capture a tiny Llama, inject LoRA, train a few steps, save, merge (the README's snippet)."""

import tempfile
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import lora_fx
from lora_fx import LoraConfig

model = LlamaForCausalLM(
    LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
)
ids = torch.randint(0, 256, (1, 16))
gm = lora_fx.capture(model, (ids,), {"use_cache": False})  # torch.export -> GraphModule
gm = lora_fx.inject(gm, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
lora_fx.print_trainable_parameters(gm)

optimizer = torch.optim.AdamW(lora_fx.trainable_parameters(gm).values(), lr=1e-3)
gm.train()
for step in range(3):
    loss = gm(ids).logits.square().mean()  # your loss here
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    print(f"step {step}: loss {loss.item():.4f}")

gm.eval()
trained = gm(ids).logits.detach()
with tempfile.TemporaryDirectory() as out_dir:  # your adapter folder here
    lora_fx.save_adapter(gm, out_dir)  # PEFT layout
    saved = sorted(p.name for p in Path(out_dir).iterdir())
lora_fx.merge_and_unload(gm)  # plain graph, zero LoRA overhead
print(
    f"adapter files {saved}; merged vs trained max |diff| = {(gm(ids).logits - trained).abs().max():.2e}"
)
