"""Generate text with a LoRA adapter: a checkpoint folder -> capture with a KV cache -> generate.

The embedded tiny Llama (random weights, the one `lora-fx export-onnx` uses) is saved as a
checkpoint folder with an adapter PEFT wrote; lora_fx loads both the way it would load a real
model, generates greedily (eager and compiled), exports the same graph for onnxruntime-genai
(merged, and unmerged with the adapter as an `.onnx_adapter` file), and prints the tokens of both
runtimes beside PeftModel.generate's.
"""

import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import lora_fx
from lora_fx.core.quiet import quiet_libraries
from lora_fx.exporters import export_genai


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


def genai_greedy(folder: Path, prompts, mask, new: int, adapter: str | None = None):
    """Greedy tokens of onnxruntime-genai, one request per row (padding stripped)."""
    import numpy as np
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    adapters = None
    if adapter is not None:
        adapters = og.Adapters(model)
        adapters.load(str(folder / f"{adapter}.onnx_adapter"), adapter)
    rows = []
    for ids, keep in zip(prompts, mask.bool(), strict=True):
        prompt = ids[keep].numpy().astype(np.int32)[None]
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=prompt.shape[1] + new, do_sample=False)
        generator = og.Generator(model, params)
        if adapters is not None:
            generator.set_active_adapter(adapters, adapter)  # chosen per request
        generator.append_tokens(prompt)
        while not generator.is_done():
            generator.generate_next_token()
        rows.append(list(generator.get_sequence(0))[prompt.shape[1] :])
    return torch.tensor(rows)


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

    # --- the same model and adapter in onnxruntime-genai: merged, and as a LoRA adapter file ---
    export_genai(gm, tmp / "genai_merged")
    export_genai(gm, tmp / "genai_multi", merged=False)  # writes default.onnx_adapter
    served = {
        "genai merged": genai_greedy(tmp / "genai_merged", prompts, mask, 16),
        "genai LoRA": genai_greedy(tmp / "genai_multi", prompts, mask, 16, "default"),
    }

    runs = {"lora_fx": tokens[:, 6:], "compiled": compiled[:, 6:], **served}
    for row in range(prompts.shape[0]):
        for name, out in runs.items():
            print(f"row {row} {name:<12}: {out[row].tolist()}")
        print(f"row {row} {'PEFT':<12}: {expected[row, 6:].tolist()}")
    same = all(torch.equal(out, expected[:, 6:]) for out in runs.values())
    print("tokens equal PEFT's:", same)
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # save/load bars of the throwaway folders
    # quiet_libraries: library notices a reader cannot act on, as lora_fx's commands do.
    with quiet_libraries(), tempfile.TemporaryDirectory() as tmp:
        main(Path(tmp))
