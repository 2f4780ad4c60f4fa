"""Generate with an aLoRA adapter: the adapter acts only from its invocation tokens on.

aLoRA (PEFT's Activated LoRA, `alora_invocation_tokens`) leaves every position before the
invocation sequence exactly as the base model computes it, so a server can keep the base model's
KV cache for a shared prefix and switch the adapter on mid-conversation. This script saves a tiny
Llama and a PEFT aLoRA adapter as folders, loads both the user's way, generates greedily (eager
and compiled), and prints the tokens beside `PeftModel.generate`'s; it also shows that the
prompt's positions before the invocation give the base model's logits bitwise.
"""

import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import lora_fx
from lora_fx.core.quiet import quiet_libraries

INVOCATION = [7, 11]  # e.g. the token ids of "<|assistant|>" in a real tokenizer


def make_checkpoint(folder: Path) -> None:
    """A model folder and a PEFT aLoRA adapter folder, as a fine-tuning run would leave them."""
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
    cfg = LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "k_proj", "v_proj"],
        alora_invocation_tokens=INVOCATION,
        task_type="CAUSAL_LM",  # PEFT applies aLoRA in its causal-LM model only
        init_lora_weights=False,
    )
    get_peft_model(base, cfg).save_pretrained(folder / "adapter")


def main(tmp: Path) -> None:
    from peft import PeftModel

    make_checkpoint(tmp)
    # Row 0 invokes the adapter at positions 3-4; row 1 (left-padded) never does.
    prompts = torch.tensor([[5, 17, 42, *INVOCATION, 99, 3], [0, 0, 61, 8, 120, 33, 2]])
    mask = torch.tensor([[1] * 7, [0, 0, 1, 1, 1, 1, 1]])

    # --- the path a user takes ---
    model = AutoModelForCausalLM.from_pretrained(tmp / "model").eval()
    gm = lora_fx.capture_for_generation(model, max_batch_size=2, max_cache_len=64)
    lora_fx.load_adapter(gm, tmp / "adapter")  # alora_invocation_tokens comes from the file
    tokens = lora_fx.generate(gm, prompts, mask, max_new_tokens=12)  # offsets from the prompt
    compiled = lora_fx.generate(
        torch.compile(gm, backend="aot_eager"), prompts, mask, max_new_tokens=12
    )

    # --- the prefix is the base model's: capture a plain graph and compare the prompt logits ---
    plain = AutoModelForCausalLM.from_pretrained(tmp / "model").eval()
    flat = lora_fx.capture(plain, (prompts,), {"attention_mask": mask, "use_cache": False})
    with torch.no_grad():
        base_logits = flat(prompts, attention_mask=mask).logits
        lora_fx.load_adapter(flat, tmp / "adapter")
        lora_fx.set_alora_offsets(flat, prompts)
        adapted = flat(prompts, attention_mask=mask).logits
    prefix_equal = torch.equal(adapted[0, :3], base_logits[0, :3])
    unadapted_row_equal = torch.equal(adapted[1], base_logits[1])
    from_invocation_differs = not torch.equal(adapted[0, 3:], base_logits[0, 3:])

    # --- the reference: PEFT on the same folders ---
    peft = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tmp / "model"), tmp / "adapter"
    ).eval()
    with torch.no_grad():
        expected = peft.generate(
            input_ids=prompts, attention_mask=mask, max_new_tokens=12, do_sample=False
        )

    runs = {"lora_fx": tokens[:, 7:], "compiled": compiled[:, 7:]}
    for row in range(prompts.shape[0]):
        for name, out in runs.items():
            print(f"row {row} {name:<9}: {out[row].tolist()}")
        print(f"row {row} {'PEFT':<9}: {expected[row, 7:].tolist()}")
    print("prompt positions before the invocation = base model, bitwise:", prefix_equal)
    print("row without the invocation = base model, bitwise:", unadapted_row_equal)
    same = all(torch.equal(out, expected[:, 7:]) for out in runs.values())
    print("tokens equal PEFT's:", same)
    if not (same and prefix_equal and unadapted_row_equal and from_invocation_differs):
        raise SystemExit(1)


if __name__ == "__main__":
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    with quiet_libraries(), tempfile.TemporaryDirectory() as tmp:
        main(Path(tmp))
