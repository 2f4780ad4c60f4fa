"""Several adapters on one graph: switching, disabling and deleting, with PEFT as the oracle."""

import copy
import warnings

import pytest
import torch
from conftest import assert_close, assert_differs
from helpers import lora_adds, lora_roles
from models import TinyMLP, tiny_llama
from peft import LoraConfig as PeftConfig
from peft import get_peft_model

import lora_fx
from lora_fx import AdapterError


def _pair(tmp_path, model, x, kwargs=None, targets_a=("lin0",), targets_b=("lin0", "lin1")):
    """The same two adapters in PEFT and in lora_fx (loaded from PEFT's files)."""
    pm = get_peft_model(
        copy.deepcopy(model),
        PeftConfig(r=4, lora_alpha=8, target_modules=list(targets_a), init_lora_weights=False),
        adapter_name="cat",
    )
    pm.add_adapter("dog", PeftConfig(r=2, target_modules=list(targets_b), init_lora_weights=False))
    pm.eval()
    pm.save_pretrained(tmp_path)
    gm = lora_fx.capture(model, (x,), kwargs)
    lora_fx.load_adapter(gm, tmp_path / "cat", "cat")
    lora_fx.load_adapter(gm, tmp_path / "dog", "dog")
    return pm, gm


def _peft_out(pm, x):
    out = (
        pm(x)
        if isinstance(x, torch.Tensor) and x.is_floating_point()
        else pm(input_ids=x, use_cache=False)
    )
    return out if isinstance(out, torch.Tensor) else out.logits


def _ours(gm, x):
    out = gm(x)
    return out if isinstance(out, torch.Tensor) else out.logits


@pytest.mark.parametrize("which", ["mlp", "llama"])
def test_switching_matches_peft(tmp_path, which):
    if which == "mlp":
        model, x, kw, ta, tb = (
            TinyMLP().eval(),
            torch.randn(4, 10),
            None,
            ("lin0",),
            ("lin0", "lin1"),
        )
    else:
        model, x, kw = tiny_llama().eval(), torch.randint(0, 256, (1, 8)), {"use_cache": False}
        ta, tb = ("q_proj", "v_proj"), ("v_proj", "down_proj")
    with torch.no_grad():
        base = _ours(lora_fx.capture(copy.deepcopy(model), (x,), kw), x)
        pm, gm = _pair(tmp_path, model, x, kw, ta, tb)
        assert lora_fx.active_adapters(gm) == ["cat"] and pm.active_adapters == ["cat"]
        assert_differs(_ours(gm, x), base)
        assert_close(_ours(gm, x), _peft_out(pm, x))
        pm.set_adapter("dog")
        lora_fx.set_adapter(gm, "dog")
        assert_close(_ours(gm, x), _peft_out(pm, x))
        pm.base_model.set_adapter(["cat", "dog"])
        lora_fx.set_adapter(gm, ["cat", "dog"])
        assert_close(_ours(gm, x), _peft_out(pm, x))
        with pm.disable_adapter(), lora_fx.disable_adapters(gm):
            assert_close(_ours(gm, x), base)
            assert_close(_ours(gm, x), _peft_out(pm, x))
        assert_close(_ours(gm, x), _peft_out(pm, x))


def test_inactive_adapter_costs_nothing_and_is_frozen(tmp_path):
    model, x = TinyMLP().eval(), torch.randn(4, 10)
    _, gm = _pair(tmp_path, model, x)
    assert lora_roles(gm, "cat") and not lora_roles(gm, "dog")
    assert gm.lin0.lora_A.cat.weight.requires_grad and not gm.lin1.lora_A.dog.weight.requires_grad
    lora_fx.set_adapter(gm, "dog")
    assert not lora_roles(gm, "cat") and lora_adds(gm, "dog") == 2
    assert not gm.lin0.lora_A.cat.weight.requires_grad and gm.lin1.lora_A.dog.weight.requires_grad


def test_disable_restores_even_when_the_body_raises(tmp_path):
    model, x = TinyMLP().eval(), torch.randn(4, 10)
    _, gm = _pair(tmp_path, model, x)
    lora_fx.set_adapter(gm, ["cat", "dog"])
    before = gm(x).detach()
    with pytest.raises(RuntimeError, match="boom"), lora_fx.disable_adapters(gm):
        assert not lora_roles(gm)
        raise RuntimeError("boom")
    assert lora_fx.active_adapters(gm) == ["cat", "dog"]
    assert_close(gm(x), before)


def test_disable_with_merged_adapter_unmerges_for_the_block(tmp_path):
    model, x = TinyMLP().eval(), torch.randn(4, 10)
    _, gm = _pair(tmp_path, model, x)
    base = TinyMLP().eval()
    adapted = gm(x).detach()
    lora_fx.merge(gm)
    with pytest.warns(UserWarning, match="unmerging"), lora_fx.disable_adapters(gm):
        assert_differs(gm(x), adapted)
    del base
    assert_close(gm(x), adapted)


def test_delete_follows_peft(tmp_path):
    model, x = TinyMLP().eval(), torch.randn(4, 10)
    pm, gm = _pair(tmp_path, model, x)
    with pytest.warns(UserWarning, match="was active which is now deleted"):
        pm.delete_adapter("cat")
    with pytest.warns(
        UserWarning, match=r"adapter 'cat' was active and is deleted; adapter 'dog' is now active"
    ):
        lora_fx.delete_adapter(gm, "cat")
    assert lora_fx.active_adapters(gm) == pm.active_adapters == ["dog"]
    assert not [k for k in gm.state_dict() if ".cat." in k or k.endswith(".cat")]
    assert_close(gm(x), _peft_out(pm, x).detach())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pm.delete_adapter("dog")
        lora_fx.delete_adapter(gm, "dog")
    assert lora_fx.active_adapters(gm) == pm.active_adapters == []
    assert not [k for k in gm.state_dict() if "lora_" in k]
    assert_close(gm(x), model(x))


def test_bad_names_and_states_leave_graph_unchanged(tmp_path):
    model, x = TinyMLP().eval(), torch.randn(4, 10)
    _, gm = _pair(tmp_path, model, x)
    code = gm.code
    with pytest.raises(
        AdapterError,
        match=r"unknown adapter\(s\) \['c'\]; adapters on this graph: \['cat', 'dog'\]",
    ):
        lora_fx.set_adapter(gm, ["cat", "c"])
    with pytest.raises(AdapterError, match=r"unknown adapter\(s\) \['c'\]"):
        lora_fx.delete_adapter(gm, "c")
    lora_fx.merge(gm)
    code = gm.code
    with pytest.raises(AdapterError, match="adapter 'cat' is merged; unmerge it before deleting"):
        lora_fx.delete_adapter(gm, "cat")
    assert gm.code == code


def test_merge_and_unmerge_per_adapter(tmp_path):
    model, x = TinyMLP().eval(), torch.randn(4, 10)
    pm, gm = _pair(tmp_path, model, x)
    lora_fx.set_adapter(gm, ["cat", "dog"])
    pm.base_model.set_adapter(["cat", "dog"])
    both = _peft_out(pm, x).detach()
    lora_fx.merge(gm, ["dog"])
    assert lora_roles(gm, "cat") and not lora_roles(gm, "dog")
    assert_close(gm(x), both)
    lora_fx.unmerge(gm, ["dog"])
    assert lora_roles(gm, "dog")
    assert_close(gm(x), both)
