"""prepare_for_kbit_training against PEFT's prepare_model_for_kbit_training: dtypes, frozen
parameters, the input-embedding `requires_grad_` node, and one training step's LoRA gradients."""

from __future__ import annotations

import copy

import bitsandbytes as bnb
import peft
import pytest
import torch
from conftest import assert_close
from models import TinyMLP, bnb_copy, tiny_llama

import lora_fx
from lora_fx.core.state import INPUT_GRAD_META

pytestmark = [
    pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)`:FutureWarning"),
    pytest.mark.filterwarnings("ignore:MatMul8bitLt. inputs will be cast:UserWarning"),
    # PEFT's gradient_checkpointing_enable on the reference model
    pytest.mark.filterwarnings("ignore:torch.utils.checkpoint. the use_reentrant:UserWarning"),
]
_CFG = {"target_modules": "all-linear", "r": 4, "lora_alpha": 8, "init_lora_weights": False}


@pytest.fixture(autouse=True)
def _plain_cpu_path(monkeypatch):
    """bitsandbytes' plain CPU path for the references' `Linear4bit`s (test_qlora's `cpu_path`
    explains the packed one, which needs AVX512-BF16 and computes in bfloat16)."""
    if hasattr(bnb.nn.modules, "has_avx512bf16"):
        monkeypatch.setattr(bnb.nn.modules, "has_avx512bf16", lambda: False)


def _peft_prepared(model, tmp_path):
    """PEFT's pipeline: prepare, get_peft_model; the adapter saved for lora_fx to load."""
    dtypes = {n: (p.dtype, p.requires_grad) for n, p in model.named_parameters()}
    prepared = peft.prepare_model_for_kbit_training(model)
    after = {n: (p.dtype, p.requires_grad) for n, p in prepared.named_parameters()}
    pm = peft.get_peft_model(prepared, peft.LoraConfig(**_CFG))
    pm.save_pretrained(tmp_path)
    return dtypes, after, pm


def _grads(named) -> dict[str, torch.Tensor]:
    return {
        n.removeprefix("base_model.model.").replace(".default", ""): p.grad
        for n, p in named
        if p.grad is not None
    }


def _marks(gm) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.meta.get(INPUT_GRAD_META)]


@pytest.mark.parametrize("quant_type", ["nf4", "int8", None], ids=["nf4", "int8", "bf16"])
def test_matches_peft_dtypes_flags_and_gradients(quant_type, tmp_path):
    torch.manual_seed(0)
    model, ids = tiny_llama().to(torch.bfloat16), torch.randint(0, 256, (2, 16))
    reference = bnb_copy(model, quant_type) if quant_type else copy.deepcopy(model)
    before, expected, pm = _peft_prepared(reference, tmp_path)

    gm = lora_fx.capture(copy.deepcopy(model), (ids,), {"use_cache": False})
    if quant_type:
        lora_fx.quantize(gm, quant_type)
    ours_before = {n: p.dtype for n, p in gm.named_parameters()}
    assert ours_before == {n: dtype for n, (dtype, _) in before.items()}  # same start
    assert lora_fx.prepare_for_kbit_training(gm) is gm

    assert {n: (p.dtype, p.requires_grad) for n, p in gm.named_parameters()} == expected
    assert torch.float32 in {dtype for dtype, _ in expected.values()}  # casts happened
    gm.graph.lint()
    # PEFT hooks the input embeddings only for a k-bit base with checkpointing on
    marks = _marks(gm)
    assert len(marks) == (1 if quant_type else 0)
    if marks:
        assert marks[0].target == "requires_grad_" and marks[0].args == (marks[0].args[0], True)

    lora_fx.load_adapter(gm, tmp_path)
    assert len(_marks(gm)) == len(marks)  # sync keeps the node
    pm.train()
    gm.train()
    pm(ids).logits.float().square().mean().backward()
    gm(ids).logits.float().square().mean().backward()
    expected_grads, grads = _grads(pm.named_parameters()), _grads(gm.named_parameters())
    assert grads.keys() == expected_grads.keys() and len(grads) == 28
    for name, grad in grads.items():
        assert grad.dtype == torch.float32 and grad.abs().max() > 0, name
        if quant_type == "int8":
            # As test_qlora: int8 quantizes activations per row at run time; last-bit input
            # differences flip some roundings.
            error = (grad - expected_grads[name]).norm() / expected_grads[name].norm()
            assert error < 0.05, (name, error.item())
        else:
            # bfloat16 row: 4-bit matmuls compute in the bfloat16 compute dtype on both sides.
            assert_close(grad, expected_grads[name], torch.bfloat16)


def test_embedding_output_requires_grad_and_second_call_adds_nothing():
    torch.manual_seed(0)
    model, ids = tiny_llama(), torch.randint(0, 256, (2, 8))
    gm = lora_fx.quantize(lora_fx.capture(model, (ids,), {"use_cache": False}), "nf4")
    lora_fx.prepare_for_kbit_training(gm)
    lora_fx.prepare_for_kbit_training(gm)
    (mark,) = _marks(gm)
    assert mark.args[0].target == torch.ops.aten.embedding.default
    assert ".requires_grad_(True)" in gm.code
    out = gm(ids)  # the embedding's frozen output still requires grad: checkpointing gets grads
    assert not any(p.requires_grad for p in gm.parameters())
    assert out.logits.requires_grad
    lora_fx.prepare_for_kbit_training(gm, use_gradient_checkpointing=False)
    assert len(_marks(gm)) == 1


def test_without_quantized_base_only_casts_and_freezes():
    model = TinyMLP().to(torch.float16)
    gm = lora_fx.capture(model, (torch.randn(2, 10, dtype=torch.float16),))
    lora_fx.prepare_for_kbit_training(gm)
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in gm.parameters())
    assert not _marks(gm)
