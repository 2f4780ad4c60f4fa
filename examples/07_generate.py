"""Generate text with a LoRA adapter: a checkpoint folder -> capture with a KV cache -> generate.

The embedded tiny Llama (random weights, the one `lora-fx export-onnx` uses) is saved as a
checkpoint folder with an adapter PEFT wrote; lora_fx loads both the way it would load a real
model, generates greedily (eager and compiled), and checks the tokens against PeftModel.generate.
"""

import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import lora_fx
from lora_fx.core.quiet import quiet_libraries


def make_checkpoint(folder: Path) -> None:
    """A model folder and a PEFT adapter folder, as a fine-tuning run would leave them."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    LlamaForCausalLM(config).save_pretrained(folder / "model")
    base = AutoModelForCausalLM.from_pretrained(folder / "model")
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False)
    get_peft_model(base, cfg).save_pretrained(folder / "adapter")


def main(tmp: Path) -> None:
    from peft import PeftModel

    make_checkpoint(tmp)

    # --- the path a user takes ---
    model = AutoModelForCausalLM.from_pretrained(tmp / "model").eval()
    gm = lora_fx.capture_for_generation(model, max_batch_size=2, max_cache_len=64)
    lora_fx.load_adapter(gm, tmp / "adapter")
    prompts = torch.tensor([[5, 17, 42, 99, 7, 3], [0, 0, 61, 8, 120, 33]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])  # left-padded
    tokens = lora_fx.generate(gm, prompts, mask, max_new_tokens=16)
    compiled = lora_fx.generate(
        torch.compile(gm, backend="aot_eager"), prompts, mask, max_new_tokens=16
    )

    # --- the reference: PEFT on the same folders ---
    peft = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tmp / "model"), tmp / "adapter"
    ).eval()
    with torch.no_grad():
        expected = peft.generate(
            input_ids=prompts, attention_mask=mask, max_new_tokens=16, do_sample=False
        )

    for row in range(prompts.shape[0]):
        print(f"row {row} lora_fx : {tokens[row, 6:].tolist()}")
        print(f"row {row} compiled: {compiled[row, 6:].tolist()}")
        print(f"row {row} PEFT    : {expected[row, 6:].tolist()}")
    same = torch.equal(tokens, expected) and torch.equal(compiled, expected)
    print("tokens equal PEFT's:", same)
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # save/load bars of the throwaway folders
    # quiet_libraries: library notices a reader cannot act on, as lora_fx's commands do.
    with quiet_libraries(), tempfile.TemporaryDirectory() as tmp:
        main(Path(tmp))
