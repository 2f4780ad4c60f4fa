"""Mixed-batch inference: one forward, one adapter per row, compared with PEFT and per-sample runs."""

import copy

import pytest
import torch
from conftest import assert_close
from models import TinyMLP, tiny_gpt2, tiny_llama
from peft import LoraConfig as PeftConfig
from peft import get_peft_model

import lora_fx
from lora_fx import AdapterError

ROWS = ["cat", "dog", "__base__", "cat"]


def _setup(tmp_path, which):
    if which == "mlp":
        model, x, kw, targets = TinyMLP().eval(), torch.randn(4, 10), None, ["lin0", "lin1"]
    elif which == "gpt2":  # addmm sites see [batch * seq, in] rows
        model, x, kw, targets = (
            tiny_gpt2().eval(),
            torch.randint(0, 256, (4, 6)),
            {"use_cache": False},
            ["c_attn", "c_fc"],
        )
    else:
        model, x, kw, targets = (
            tiny_llama().eval(),
            torch.randint(0, 256, (4, 6)),
            {"use_cache": False},
            ["q_proj", "down_proj"],
        )
    pm = get_peft_model(
        copy.deepcopy(model),
        PeftConfig(r=4, target_modules=targets, init_lora_weights=False),
        "cat",
    )
    pm.add_adapter(
        "dog", PeftConfig(r=2, lora_alpha=5, target_modules=targets[:1], init_lora_weights=False)
    )
    pm.eval()
    pm.save_pretrained(tmp_path)
    gm = lora_fx.capture(model, (x,), kw)
    lora_fx.load_adapter(gm, tmp_path / "cat", "cat")
    lora_fx.load_adapter(gm, tmp_path / "dog", "dog")
    return pm, gm, x, kw is not None


def _logits(out):
    return out if isinstance(out, torch.Tensor) else out.logits


@pytest.mark.parametrize("which", ["mlp", "gpt2", "llama"])
def test_mixed_batch_equals_peft_and_per_sample(tmp_path, which):
    pm, gm, x, hf = _setup(tmp_path, which)
    with torch.no_grad():
        expected = _logits(
            pm(input_ids=x, adapter_names=ROWS, use_cache=False)
            if hf
            else pm(x, adapter_names=ROWS)
        )
        with lora_fx.adapter_batch(gm, ROWS):
            mixed = _logits(gm(x))
        assert_close(mixed, expected)
        for row, name in enumerate(ROWS):
            if name == "__base__":
                with lora_fx.disable_adapters(gm):
                    alone = _logits(gm(x))[row]
            else:
                lora_fx.set_adapter(gm, name)
                alone = _logits(gm(x))[
                    row
                ]  # the graph is shape-specialised: run the batch, keep the row
            assert_close(mixed[row], alone)
    assert not hasattr(gm, "lora_fx_batch_mask")


def test_new_composition_does_not_recompile(tmp_path):
    _, gm, x, _ = _setup(tmp_path, "mlp")
    reference = {}
    for rows in (ROWS, ["dog", "dog", "cat", "__base__"]):
        with torch.no_grad(), lora_fx.adapter_batch(gm, rows):
            reference[tuple(rows)] = gm(x)
    lora_fx.set_adapter_batch(gm, ROWS)
    compiled = torch.compile(gm, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        assert_close(compiled(x), reference[tuple(ROWS)])
        torch._dynamo.config.error_on_recompile = True
        try:
            lora_fx.set_adapter_batch(gm, ["dog", "dog", "cat", "__base__"])
            assert_close(compiled(x), reference[("dog", "dog", "cat", "__base__")])
        finally:
            torch._dynamo.config.error_on_recompile = False
    lora_fx.set_adapter_batch(gm, None)
    torch._dynamo.reset()


def test_bad_mixed_batches(tmp_path):
    _, gm, x, _ = _setup(tmp_path, "mlp")
    code = gm.code
    with pytest.raises(
        AdapterError,
        match=r"unknown adapter\(s\) \['cow'\] in the batch; adapters on this graph: \['cat', 'dog'\]",
    ):
        lora_fx.set_adapter_batch(gm, ["cat", "cow"])
    gm.train()
    with pytest.raises(AdapterError, match="mixed-batch adapters are for inference"):
        lora_fx.set_adapter_batch(gm, ["cat"])
    gm.eval()
    lora_fx.merge(gm)
    code = gm.code
    with pytest.raises(AdapterError, match=r"adapters \['cat'\] are merged"):
        lora_fx.set_adapter_batch(gm, ["cat"])
    assert gm.code == code
    lora_fx.unmerge(gm)
    lora_fx.set_adapter_batch(gm, ["cat", "dog", "cat", "dog"])
    with pytest.raises(AdapterError, match="mixed-batch mode is on"):
        lora_fx.set_adapter(gm, "dog")


def test_batch_and_name_list_must_have_the_same_length(tmp_path):
    _, gm, x, _ = _setup(tmp_path, "mlp")  # 4 rows
    for names in (["cat", "dog"], ["cat", "dog", "cat"]):
        with (
            pytest.raises(
                RuntimeError,
                match="mixed batch: the batch and the adapter name list differ in length",
            ),
            torch.no_grad(),
            lora_fx.adapter_batch(gm, names),
        ):
            gm(x)
