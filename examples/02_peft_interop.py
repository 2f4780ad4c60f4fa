"""Move an adapter PEFT -> lora_fx -> PEFT and check the outputs agree at each step."""

import copy
import tempfile

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import lora_fx
from lora_fx.core.quiet import quiet_libraries


def main(tmp: str) -> None:
    # PEFT imports bitsandbytes when it is installed: inside quiet_libraries (see the end).
    from peft import LoraConfig as PeftLoraConfig
    from peft import PeftModel, get_peft_model

    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    ).eval()
    ids = torch.randint(0, 256, (1, 16))

    # 1. An adapter trained (here: randomly initialised) with PEFT.
    peft_model = get_peft_model(
        copy.deepcopy(model),
        PeftLoraConfig(r=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    ).eval()
    reference = peft_model(input_ids=ids, use_cache=False).logits
    peft_dir = f"{tmp}/peft_adapter"
    peft_model.save_pretrained(peft_dir)

    # 2. lora_fx loads it into a captured graph.
    gm = lora_fx.capture(model, (ids,), {"use_cache": False})
    gm = lora_fx.load_adapter(gm, peft_dir)
    print(f"PEFT -> lora_fx: max |diff| = {(gm(ids).logits - reference).abs().max():.2e}")

    # 3. lora_fx saves it; PEFT loads it back.
    ours_dir = f"{tmp}/lora_fx_adapter"
    lora_fx.save_adapter(gm, ours_dir)
    back = PeftModel.from_pretrained(copy.deepcopy(model), ours_dir).eval()
    print(
        f"lora_fx -> PEFT: max |diff| = {(back(input_ids=ids, use_cache=False).logits - reference).abs().max():.2e}"
    )


if __name__ == "__main__":
    # quiet_libraries: library notices a reader cannot act on, as lora_fx's commands do.
    with quiet_libraries(), tempfile.TemporaryDirectory() as tmp:
        main(tmp)
