"""PEFT 0.21.2's BD-LoRA (`use_bdlora`) against PEFT itself.

Each case builds PEFT and lora_fx on the same weights and seed, checks the tensors the init wrote,
then makes the adapter non-trivial with the same values on both sides and checks outputs,
gradients, merge and files both ways.
"""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from conftest import assert_close, assert_differs
from helpers import peft_param_name
from models import TinyMLP

import lora_fx
from lora_fx import BdLoraConfig, ConfigError, LoraConfig, UnsupportedSiteError
from lora_fx.math import ops

_FEATURES = (16, 24, 12)
_TARGETS = ["lin0", "lin1"]
# lin0's A and lin1's B are block-diagonal (PEFT: patterns are substrings of the module name)
_BD = {"target_modules_bd_a": ["in0"], "target_modules_bd_b": ["lin1"], "nblocks": 2}
_CFG = {"target_modules": _TARGETS, "r": 4, "lora_alpha": 8}


def _mlp():
    torch.manual_seed(0)
    model = TinyMLP(features=_FEATURES).eval()
    x = torch.randn(5, _FEATURES[0])
    return model, x, lora_fx.capture(copy.deepcopy(model), (x,))


def _bd_pair(bd=None):
    """PEFT and lora_fx with BD-LoRA, same seed; then the same random A and B on both sides."""
    model, x, gm = _mlp()
    bd = _BD if bd is None else bd
    torch.manual_seed(1)
    pm = peft.get_peft_model(
        copy.deepcopy(model), peft.LoraConfig(**_CFG, use_bdlora=peft.BdLoraConfig(**bd))
    ).eval()
    torch.manual_seed(1)
    gm = lora_fx.inject(gm, LoraConfig(**_CFG, use_bdlora=BdLoraConfig(**bd)))
    return model, x, gm, pm


def _randomise(gm, pm):
    theirs = dict(pm.named_parameters())
    with torch.no_grad():
        for name, param in gm.named_parameters():
            if ".lora_" in name:
                param.copy_(torch.randn_like(param))
                theirs[peft_param_name(name)].copy_(param)


def test_block_diag_linear_by_hand():
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, 0.0]])  # blocks [2, 2] x 2
    # block 0 reads x[:2] = (1, 2): (1, 2); block 1 reads x[2:] = (3, 4): (7, 6)
    assert torch.equal(ops.block_diag_linear(x, w, 2), torch.tensor([[1.0, 2.0, 7.0, 6.0]]))
    assert torch.equal(x @ ops.block_diag_matrix(w, 2).T, torch.tensor([[1.0, 2.0, 7.0, 6.0]]))


def test_bdlora_init_shapes_and_values_match_peft():
    _, x, gm, pm = _bd_pair()
    theirs = pm.state_dict()
    shapes = {}
    for name, value in gm.state_dict().items():
        if ".lora_" in name:
            torch.testing.assert_close(value, theirs[peft_param_name(name)], atol=0, rtol=0)
            shapes[name] = tuple(value.shape)
    assert shapes == {
        "lin0.lora_A.default.weight": (4, 8),  # [r, in / nblocks]
        "lin0.lora_B.default.weight": (24, 4),
        "lin1.lora_A.default.weight": (4, 24),
        "lin1.lora_B.default.weight": (12, 2),  # [out, r / nblocks], zeros
    }
    assert not gm.lin1.lora_B["default"].weight.any()
    roles = [n.target for n in gm.graph.nodes if n.target is ops.block_diag_linear]
    assert len(roles) == 2
    gm.graph.lint()


def test_bdlora_outputs_gradients_merge_match_peft():
    model, x, gm, pm = _bd_pair()
    _randomise(gm, pm)
    with torch.no_grad():
        expected = pm(x)
        assert_differs(expected, model(x))
        assert_close(gm(x), expected)
    gm(x).sum().backward()
    pm(x).sum().backward()
    theirs = dict(pm.named_parameters())
    for name, param in gm.named_parameters():
        if ".lora_" in name:
            assert_close(param.grad, theirs[peft_param_name(name)].grad)
    with torch.no_grad():
        lora_fx.merge(gm)
        assert_close(gm(x), expected)
        assert_close(gm.lin0.weight, pm.merge_and_unload().lin0.weight)
        lora_fx.unmerge(gm)
        assert_close(gm.lin0.weight, model.lin0.weight)
        assert_close(gm(x), expected)


def test_bdlora_files_both_ways(tmp_path):
    model, x, gm, pm = _bd_pair()
    _randomise(gm, pm)
    with torch.no_grad():
        expected = pm(x)
    pm.save_pretrained(tmp_path / "peft")
    loaded = lora_fx.load_adapter(_mlp()[2], tmp_path / "peft")
    with torch.no_grad():
        assert_close(loaded(x), expected)
    cfg = LoraConfig.from_json(tmp_path / "peft" / "adapter_config.json")
    assert cfg.use_bdlora == {**_BD, "match_strict": True}
    lora_fx.save_adapter(gm, tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "ours").eval()
    with torch.no_grad():
        assert_close(back(x), expected)


def test_bdlora_match_strict_false_leaves_plain_lora():
    bd = {"target_modules_bd_b": ["lin1"], "nblocks": 4, "match_strict": False}
    _, x, gm, pm = _bd_pair(bd)
    _randomise(gm, pm)
    assert gm.lin0.lora_A["default"].weight.shape == (4, 16)
    with torch.no_grad():
        assert_close(gm(x), pm(x))


def test_bdlora_bad_inputs_are_refused():
    with pytest.raises(ConfigError, match="use_bdlora target_modules_bd_a and .* overlap"):
        LoraConfig(
            target_modules=_TARGETS,
            use_bdlora={"target_modules_bd_a": ["lin0"], "target_modules_bd_b": ["lin0"]},
        )
    with pytest.raises(ConfigError, match="use_bdlora nblocks=0"):
        LoraConfig(target_modules=_TARGETS, use_bdlora={"nblocks": 0})
    _, _, gm = _mlp()
    strict = LoraConfig(target_modules=_TARGETS, use_bdlora={"target_modules_bd_a": ["lin0"]})
    with pytest.raises(UnsupportedSiteError, match="'lin1' matches neither"):
        lora_fx.inject(gm, strict)
    odd = LoraConfig(**_CFG, use_bdlora={**_BD, "nblocks": 3})  # r=4 in 3 blocks
    with pytest.raises(UnsupportedSiteError, match="nblocks=3 does not divide"):
        lora_fx.inject(gm, odd)
    assert "lora_fx" not in gm.meta
