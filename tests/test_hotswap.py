"""Hot-swapping adapter weights under torch.compile without recompiling."""

import copy

import pytest
import torch
from conftest import assert_close
from models import TinyMLP, tiny_llama
from peft import LoraConfig as PeftConfig
from peft import PeftModel, get_peft_model

import lora_fx
from lora_fx import AdapterError


def _peft_adapter(model, path, **cfg):
    pm = get_peft_model(copy.deepcopy(model), PeftConfig(init_lora_weights=False, **cfg)).eval()
    pm.save_pretrained(path)
    return pm


def _out(m, x):
    """PEFT models take HF kwargs; captured graphs bound use_cache=False at capture."""
    hf = not x.is_floating_point() and isinstance(m, PeftModel)
    out = m(input_ids=x, use_cache=False) if hf else m(x)
    return out if isinstance(out, torch.Tensor) else out.logits


@pytest.mark.parametrize("which", ["mlp", "llama"])
def test_hotswap_under_compile_never_recompiles(tmp_path, which):
    if which == "mlp":
        model, x, kw, targets = TinyMLP().eval(), torch.randn(4, 10), None, ["lin0", "lin1"]
    else:
        model, x, kw, targets = (
            tiny_llama().eval(),
            torch.randint(0, 256, (1, 8)),
            {"use_cache": False},
            ["q_proj", "v_proj"],
        )
    first = _peft_adapter(model, tmp_path / "first", r=4, lora_alpha=8, target_modules=targets)
    smaller = _peft_adapter(model, tmp_path / "smaller", r=2, lora_alpha=16, target_modules=targets)
    rslora = _peft_adapter(
        model, tmp_path / "rslora", r=8, lora_alpha=3, use_rslora=True, target_modules=targets
    )
    gm = lora_fx.load_adapter(lora_fx.capture(model, (x,), kw), tmp_path / "first")
    lora_fx.prepare_for_hotswap(gm, target_rank=8)
    with torch.no_grad():
        assert_close(_out(gm, x), _out(first, x))  # padding changes nothing
        compiled = torch.compile(gm, backend="aot_eager", fullgraph=True)
        assert_close(_out(compiled, x), _out(first, x))
        torch._dynamo.config.error_on_recompile = True
        try:
            for name, reference in (("smaller", smaller), ("rslora", rslora), ("first", first)):
                lora_fx.load_adapter(gm, tmp_path / name, hotswap=True)
                assert_close(_out(compiled, x), _out(reference, x))
        finally:
            torch._dynamo.config.error_on_recompile = False
    torch._dynamo.reset()


def test_hotswapped_slot_saves_a_valid_peft_adapter(tmp_path):
    model, x = TinyMLP().eval(), torch.randn(4, 10)
    _peft_adapter(model, tmp_path / "first", r=4, target_modules=["lin0"])
    other = _peft_adapter(model, tmp_path / "other", r=2, lora_alpha=7, target_modules=["lin0"])
    gm = lora_fx.load_adapter(lora_fx.capture(model, (x,)), tmp_path / "first")
    lora_fx.prepare_for_hotswap(gm, target_rank=6)
    lora_fx.load_adapter(gm, tmp_path / "other", hotswap=True)
    lora_fx.save_adapter(gm, tmp_path / "saved")
    back = PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "saved").eval()
    with torch.no_grad():
        assert_close(_out(back, x), _out(other, x))


def test_hotswap_errors_change_nothing(tmp_path):
    model, x = TinyMLP().eval(), torch.randn(4, 10)
    _peft_adapter(model, tmp_path / "first", r=4, target_modules=["lin0"])
    _peft_adapter(model, tmp_path / "wider", r=8, target_modules=["lin0"])
    _peft_adapter(model, tmp_path / "elsewhere", r=4, target_modules=["lin1"])
    gm = lora_fx.load_adapter(lora_fx.capture(model, (x,)), tmp_path / "first")
    before = {n: p.detach().clone() for n, p in gm.named_parameters()}
    with pytest.raises(
        AdapterError,
        match=r"targets differ; only in the file: \['lin1'\], only in the slot: \['lin0'\]",
    ):
        lora_fx.load_adapter(gm, tmp_path / "elsewhere", hotswap=True)
    with pytest.raises(
        AdapterError, match=r"rank 8 exceeds the slot's rank 4; call lora_fx.prepare_for_hotswap"
    ):
        lora_fx.load_adapter(gm, tmp_path / "wider", hotswap=True)
    with pytest.raises(AdapterError, match=r"unknown adapter\(s\) \['other'\]"):
        lora_fx.load_adapter(gm, tmp_path / "first", "other", hotswap=True)
    with pytest.raises(AdapterError, match=r"ranks above target_rank=2"):
        lora_fx.prepare_for_hotswap(gm, target_rank=2)
    for name, param in gm.named_parameters():
        assert torch.equal(param, before[name])
