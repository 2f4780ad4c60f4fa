"""PEFT adapters on Gemma (tied, scaled embeddings), Falcon (`x @ W.T`) and Mixtral (MoE experts).

Each model is built from a tiny config (random weights); PEFT makes an `all-linear` adapter, and
lora_fx loads it into the captured graph, merges it, and saves its own that PEFT reads back.
"""

import copy
import tempfile
import warnings

import torch
import transformers

import lora_fx
from lora_fx.core.quiet import quiet_libraries

_SMALL = {
    "vocab_size": 128,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
MODELS = {
    "gemma": {"head_dim": 8},
    "falcon": {},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
}


def main(tmp: str) -> None:
    from peft import LoraConfig, PeftModel, get_peft_model

    # PEFT's own false alarm on MoE models: it applies its `.*\.gate_up_proj` rank pattern to the
    # expert parameters but checks the pattern against module names only, and warns.
    warnings.filterwarnings("ignore", r"The following (rank|alpha)_pattern keys", RuntimeWarning)

    ids = torch.randint(3, 128, (2, 8))
    for name, extra in MODELS.items():
        torch.manual_seed(0)
        config = transformers.AutoConfig.for_model(name, **_SMALL, **extra)
        model = transformers.AutoModelForCausalLM.from_config(config).eval()
        peft_model = get_peft_model(
            copy.deepcopy(model),
            LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False),
        ).eval()
        with torch.no_grad():
            reference = peft_model(ids).logits
        peft_model.save_pretrained(f"{tmp}/{name}-peft")

        gm = lora_fx.load_adapter(lora_fx.capture(model, (ids,)), f"{tmp}/{name}-peft")
        with torch.no_grad():
            loaded = (gm(ids).logits - reference).abs().max()
            lora_fx.save_adapter(gm, f"{tmp}/{name}-lora_fx")
            back = PeftModel.from_pretrained(copy.deepcopy(model), f"{tmp}/{name}-lora_fx").eval()
            returned = (back(ids).logits - reference).abs().max()
            merged = (lora_fx.merge_and_unload(gm)(ids).logits - reference).abs().max()
        print(
            f"{name:8s} PEFT -> lora_fx max |diff| = {loaded:.1e}, merged {merged:.1e}, "
            f"lora_fx -> PEFT {returned:.1e}"
        )


if __name__ == "__main__":
    with quiet_libraries(), tempfile.TemporaryDirectory() as tmp:
        main(tmp)
