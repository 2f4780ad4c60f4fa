import pytest
import torch
from conftest import assert_close, assert_differs
from helpers import assert_no_lora, capture_case
from models import METHODS, SITE_CASES, TinyMLP, tiny_llama

import lora_fx
from lora_fx import LoraConfig


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", list(SITE_CASES))
def test_unload_restores_base_bitwise(case, method):
    gm, x, targets = capture_case(case, method)
    base_out = gm(x).detach()
    base_weights = {n: p.detach().clone() for n, p in gm.named_parameters()}
    lora_fx.inject(
        gm, LoraConfig(target_modules=targets, init_lora_weights=False, lora_dropout=0.1)
    )
    assert_differs(gm(x), base_out)
    lora_fx.unload(gm)
    assert_no_lora(gm)
    assert set(dict(gm.named_parameters())) == set(base_weights)
    for name, param in gm.named_parameters():
        assert torch.equal(param, base_weights[name]), name
    assert torch.equal(gm(x), base_out)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", list(SITE_CASES))
def test_merge_and_unload_leaves_plain_graph_with_adapter_outputs(case, method):
    gm, x, targets = capture_case(case, method)
    n_nodes = len(gm.graph.nodes)
    lora_fx.inject(gm, LoraConfig(target_modules=targets, init_lora_weights=False))
    adapted = gm(x).detach()
    assert lora_fx.merge_and_unload(gm) is gm
    assert_no_lora(gm)
    assert len(gm.graph.nodes) == n_nodes
    assert_close(gm(x), adapted)


def test_unload_after_merge_unmerges_with_warning():
    model = TinyMLP().eval()
    x = torch.randn(4, 10)
    gm = lora_fx.capture(model, (x,))
    base_out = gm(x).detach()
    lora_fx.inject(gm, LoraConfig(target_modules=["lin0"], init_lora_weights=False))
    lora_fx.merge(gm)
    with pytest.warns(UserWarning, match="merged adapters are unmerged first"):
        lora_fx.unload(gm)
    assert_no_lora(gm)
    assert_close(gm(x), base_out)


def test_unload_keeps_trained_modules_to_save_as_peft():
    model = TinyMLP().eval()
    x = torch.randn(4, 10)
    gm = lora_fx.capture(model, (x,))
    lora_fx.inject(gm, LoraConfig(target_modules=["lin0"], modules_to_save=["lin1"]))
    with torch.no_grad():
        gm.lin1.modules_to_save.default.weight.add_(torch.randn(2, 20))
    trained = gm(x).detach()
    original = model.lin1.weight.detach().clone()
    lora_fx.unload(gm)
    assert_no_lora(gm)
    assert not [n for n in gm.state_dict() if "modules_to_save" in n]
    assert_close(gm(x), trained)
    assert torch.equal(model.lin1.weight, original), "the user's own module is not overwritten"


def test_merge_and_unload_on_llama_has_base_op_counts():
    model = tiny_llama().eval()
    ids = torch.randint(0, 256, (1, 8))
    gm = lora_fx.capture(model, (ids,), {"use_cache": False})
    ops_before = sorted(str(n.target) for n in gm.graph.nodes)
    lora_fx.inject(gm, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    adapted = gm(ids).logits.detach()
    lora_fx.merge_and_unload(gm)
    assert sorted(str(n.target) for n in gm.graph.nodes) == ops_before
    assert_close(gm(ids).logits, adapted)


def test_merge_and_unload_names_the_failed_step():
    gm = lora_fx.capture(TinyMLP().eval(), (torch.randn(2, 10),))
    lora_fx.inject(gm, LoraConfig(target_modules=["lin0"], init_lora_weights=False))
    with torch.no_grad():
        gm.lin0.lora_A.default.weight[0, 0] = float("nan")
    with pytest.raises(
        lora_fx.MergeError, match=r"merge_and_unload failed in step 'merge': safe_merge"
    ):
        lora_fx.merge_and_unload(gm, safe_merge=True)
