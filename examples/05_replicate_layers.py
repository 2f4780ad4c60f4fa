"""Layer replication: grow a 4-layer Llama to 6 layers that share base weights, train LoRA on every
copy, hand the adapter to PEFT, and merge exactly."""

import copy
import tempfile
import warnings
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import lora_fx
from lora_fx import LoraConfig
from lora_fx.core.quiet import quiet_libraries


def base_bytes(gm):
    """Bytes of the distinct base-weight storages (LoRA parameters left out)."""
    params = {p.data_ptr(): p for n, p in gm.named_parameters() if ".lora_" not in n}
    return sum(p.numel() * p.element_size() for p in params.values())


def main(out_dir: Path) -> None:
    # PEFT imports bitsandbytes when it is installed: inside quiet_libraries (see the end).
    from peft import PeftModel

    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    ).eval()
    ids = torch.randint(0, 256, (1, 16))

    gm = lora_fx.capture(copy.deepcopy(model), (ids,), {"use_cache": False})
    before = base_bytes(gm)
    cfg = LoraConfig(
        r=8, lora_alpha=16, target_modules="all-linear", layer_replication=[[0, 4], [2, 4]]
    )
    gm = lora_fx.inject(gm, cfg)  # layers [0, 1, 2, 3, 2, 3] renumbered 0..5, as PEFT does
    print("layers:", list(gm.get_submodule("model.layers")._modules))
    print(f"base weights: {before:,d} bytes before, {base_bytes(gm):,d} after (shared, not copied)")
    lora_fx.print_trainable_parameters(gm)  # one A/B per copy: model.layers.4.* is its own adapter

    optimizer = torch.optim.AdamW(lora_fx.trainable_parameters(gm).values(), lr=1e-2)
    gm.train()
    for step in range(3):
        loss = gm(ids).logits.square().mean()  # your loss here
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        print(f"step {step}: loss {loss.item():.4f}")
    gm.eval()
    trained = gm(ids).logits.detach()

    # PEFT reads the adapter (its config carries layer_replication) and gives the same outputs.
    lora_fx.save_adapter(gm, out_dir)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(model), out_dir).eval()
    with torch.no_grad():
        peft_logits = peft_model(input_ids=ids, use_cache=False).logits
    print(f"lora_fx -> PEFT: max |diff| = {(peft_logits - trained).abs().max():.2e}")

    # Merging gives each repeated use of a layer a private weight, so it is exact (PEFT's is not).
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lora_fx.merge_and_unload(gm)
    print(f"merge: {len(caught)} weights made private, base weights now {base_bytes(gm):,d} bytes")
    print(f"merged vs unmerged: max |diff| = {(gm(ids).logits - trained).abs().max():.2e}")
    with torch.no_grad():
        peft_merged = peft_model.merge_and_unload()(input_ids=ids, use_cache=False).logits
    print(f"PEFT merged vs unmerged: max |diff| = {(peft_merged - peft_logits).abs().max():.2e}")


if __name__ == "__main__":
    # quiet_libraries: library notices a reader cannot act on, as lora_fx's commands do.
    with quiet_libraries(), tempfile.TemporaryDirectory() as tmp:
        main(Path(tmp))
