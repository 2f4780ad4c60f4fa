"""Export a LoRA graph to ONNX three ways and run each in ONNX Runtime against torch.

1. merged: the adapter folded into the weights (the base model's ONNX ops, fastest);
2. unmerged: LoRA branches kept, A/B initializers named after their PEFT keys;
3. multi-LoRA: one ONNX Runtime session, the adapter chosen per run from `.onnx_adapter` files
   (here: one trained in lora_fx and one read straight from a PEFT folder, of another rank).
"""

import tempfile
from pathlib import Path

import torch
from torch.export import Dim
from transformers import LlamaConfig, LlamaForCausalLM

import lora_fx
from lora_fx import LoraConfig
from lora_fx.core.quiet import quiet_libraries
from lora_fx.exporters import (
    export_onnx,
    ort_run_options,
    ort_session,
    write_ort_adapter,
)


def main(out: Path) -> None:
    # PEFT imports bitsandbytes when it is installed: inside quiet_libraries (see the end).
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 256, (2, 16))

    # Capture with dynamic batch and sequence axes; the export keeps them.
    dims = {"input_ids": {0: Dim("batch"), 1: Dim("seq")}, "use_cache": None}
    gm = lora_fx.capture(model, (ids,), {"use_cache": False}, dynamic_shapes=dims)
    gm = lora_fx.inject(
        gm, LoraConfig(r=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    gm.eval()
    other = torch.randint(0, 256, (3, 7))  # another batch size and length
    with torch.no_grad():
        expected = gm(other).logits.numpy()

    for merged in (True, False):
        result = export_onnx(gm, (ids,), out / f"merged_{merged}.onnx", merged=merged)
        logits = ort_session(result.path).run(None, {"input_ids": other.numpy()})[0]
        print(
            f"{result.layout:>12}: {sum(result.op_counts.values())} ONNX nodes, "
            f"{len(result.lora_tensors)} LoRA tensors, max |diff| vs torch = "
            f"{abs(logits - expected).max():.2e}"
        )

    # Multi-LoRA: A PEFT adapter of rank 4 on other sites joins the graph's adapter.
    peft_dir = out / "peft_adapter"
    peft_cfg = PeftLoraConfig(r=4, target_modules=["q_proj", "o_proj"], init_lora_weights=False)
    get_peft_model(LlamaForCausalLM(config), peft_cfg).save_pretrained(peft_dir)
    lora_fx.load_adapter(gm, peft_dir, "peft")
    multi = export_onnx(gm, (ids,), out / "multi.onnx", merged=False, lora_layout="inputs")
    write_ort_adapter(gm, out / "ours.onnx_adapter", "default", model=multi.path)
    write_ort_adapter(peft_dir, out / "peft.onnx_adapter", model=multi.path)  # from the folder

    session = ort_session(multi.path)  # one session for every adapter
    for name, file in [("default", "ours.onnx_adapter"), ("peft", "peft.onnx_adapter")]:
        lora_fx.set_adapter(gm, name)
        with torch.no_grad():
            expected = gm(other).logits.numpy()
        logits = session.run(None, {"input_ids": other.numpy()}, ort_run_options(out / file))[0]
        print(f"multi-LoRA {name!r:>9}: max |diff| vs torch = {abs(logits - expected).max():.2e}")
    print("files:", ", ".join(sorted(p.name for p in out.iterdir())))


if __name__ == "__main__":
    # quiet_libraries: library notices a reader cannot act on, as lora_fx's commands do.
    with quiet_libraries(), tempfile.TemporaryDirectory() as tmp:
        main(Path(tmp))
