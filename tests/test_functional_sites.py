"""Sites reached by functional calls on parameters, in both graph flavours (issue 18, cause 5).

`ModuleNet` is made of modules PEFT can wrap (nn.Embedding, transformers' Conv1D, nn.Linear,
nn.Conv2d); `FunctionalNet` computes the same thing with the same Parameter objects through
functional calls (`F.embedding`, `torch.addmm`, `x @ W.T`, `torch.matmul(x, W.t())`,
`F.linear`, `F.conv2d`), the parameters living in plain modules at PEFT's paths. PEFT adapts
`ModuleNet`; lora_fx adapts either net's graph (fx or export) and must give PEFT's outputs,
PEFT's merged outputs, and files each can read. Also: `target_parameters` on a parameter that
an fx graph reads inside a leaf module call (the call is opened into its functional op).
"""

from __future__ import annotations

import copy

import peft
import pytest
import safetensors.torch
import torch
from conftest import assert_close, assert_differs
from helpers import lora_roles
from models import TinyMLP
from torch import nn
from torch.nn import functional as F
from transformers.pytorch_utils import Conv1D

import lora_fx
from lora_fx import LoraConfig
from lora_fx.sites import all_sites

_D, _VOCAB = 8, 20
_TARGETS = ["emb", "c1d", "fal", "mm", "lin", "conv"]
pytestmark = pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)`:FutureWarning")


class ModuleNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(_VOCAB, _D)
        self.c1d = Conv1D(2 * _D, _D)  # [in, out] storage
        self.fal = nn.Linear(2 * _D, _D, bias=False)
        self.mm = nn.Linear(_D, _D)
        self.lin = nn.Linear(_D, _D)
        self.conv = nn.Conv2d(1, 2, 3, padding=1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.lin(self.mm(self.fal(self.c1d(self.emb(ids)))))
        return self.conv(h.unsqueeze(1))


class _Holder(nn.Module):
    """Parameters at a module path, read by functional calls (not a site module)."""

    def __init__(self, source: nn.Module) -> None:
        super().__init__()
        for name, param in source.named_parameters(recurse=False):
            self.register_parameter(name, param)


class FunctionalNet(nn.Module):
    def __init__(self, source: ModuleNet) -> None:
        super().__init__()
        for name in _TARGETS:
            setattr(self, name, _Holder(getattr(source, name)))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = F.embedding(ids, self.emb.weight)
        flat = torch.addmm(self.c1d.bias, h.view(-1, _D), self.c1d.weight)  # Conv1D's own call
        h = flat.view(h.shape[0], h.shape[1], 2 * _D) @ self.fal.weight.T  # Falcon's FalconLinear
        h = torch.matmul(h, self.mm.weight.t()) + self.mm.bias
        h = F.linear(h, self.lin.weight, self.lin.bias)
        return F.conv2d(h.unsqueeze(1), self.conv.weight, self.conv.bias, padding=1)


def _nets() -> tuple[ModuleNet, FunctionalNet, torch.Tensor]:
    torch.manual_seed(0)
    modules = ModuleNet().eval()
    return modules, FunctionalNet(copy.deepcopy(modules)).eval(), torch.randint(0, _VOCAB, (2, 5))


@pytest.fixture(scope="module")
def peft_run(tmp_path_factory):
    modules, _, ids = _nets()
    pm = peft.get_peft_model(
        copy.deepcopy(modules),
        peft.LoraConfig(target_modules=_TARGETS, r=2, init_lora_weights=False),
    ).eval()
    folder = tmp_path_factory.mktemp("peft")
    with torch.no_grad():
        base, out = modules(ids), pm(ids)
        pm.save_pretrained(folder)
        merged = pm.merge_and_unload()(ids)
    assert_differs(out, base)
    return {"out": out, "merged": merged, "folder": folder}


def _assert_matches_peft(gm, ids, expected):
    """The default "auto" layout runs these tiny linear sites with W + s·B@A at this many
    tokens: merged-weight rounding (1.3e-5 on one of 160 values). The branch layout is held to
    the table's tolerance."""
    with torch.no_grad():
        torch.testing.assert_close(gm(ids), expected, atol=3e-5, rtol=1e-4)
        assert_close(lora_fx.set_layout(copy.deepcopy(gm), "fused")(ids), expected)


@pytest.mark.parametrize("net", ["modules", "functional"])
@pytest.mark.parametrize("method", ["fx", "export"])
def test_every_site_kind_matches_peft_in_both_flavours(net, method, peft_run, tmp_path):
    modules, functional, ids = _nets()
    model = modules if net == "modules" else functional
    gm = lora_fx.capture(model, (ids,), method=method)
    assert set(all_sites(gm)) >= set(_TARGETS)
    loaded = lora_fx.load_adapter(copy.deepcopy(gm), peft_run["folder"])
    _assert_matches_peft(loaded, ids, peft_run["out"])
    assert lora_roles(loaded)  # branches in the graph
    # lora_fx -> PEFT: the same keys, readable by PeftModel on the module net
    ours = lora_fx.inject(
        copy.deepcopy(gm), LoraConfig(target_modules=_TARGETS, r=2, init_lora_weights=False)
    )
    lora_fx.save_adapter(ours, tmp_path)
    file = tmp_path / "adapter_model.safetensors"
    theirs = peft_run["folder"] / "adapter_model.safetensors"
    assert set(safetensors.torch.load_file(file)) == set(safetensors.torch.load_file(theirs))
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(_nets()[0]), tmp_path).eval()
    with torch.no_grad():
        _assert_matches_peft(ours, ids, pm(ids))
        merged = lora_fx.merge_and_unload(loaded)
        assert_close(merged(ids), peft_run["merged"])


def test_functional_sites_are_not_all_linear_but_conv1d_is():
    """PEFT's all-linear takes Linear / Conv1D modules; a functional op elsewhere is no module."""
    modules, functional, ids = _nets()
    for method in ("fx", "export"):
        sites = all_sites(lora_fx.capture(functional, (ids,), method=method))
        assert not any(s.module for s in sites.values()), method
        sites = all_sites(lora_fx.capture(modules, (ids,), method=method))
        assert {n for n, s in sites.items() if s.module} == set(_TARGETS), method


@pytest.mark.parametrize("method", ["fx", "export"])
def test_target_parameters_on_a_leaf_module_weight_match_peft(method, tmp_path):
    torch.manual_seed(0)
    model, x = TinyMLP().eval(), torch.randn(4, 10)
    cfg = {"target_modules": [], "target_parameters": ["lin0.weight"], "r": 2, "lora_alpha": 4}
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**cfg, init_lora_weights=False))
    pm.eval()
    pm.save_pretrained(tmp_path)
    gm = lora_fx.capture(copy.deepcopy(model), (x,), method=method)
    gm = lora_fx.load_adapter(gm, tmp_path)
    with torch.no_grad():
        expected = pm(x)
        assert_differs(expected, model(x))
        assert_close(gm(x), expected)
        assert_close(lora_fx.merge_and_unload(gm)(x), pm.merge_and_unload()(x))


def test_a_failed_request_leaves_the_leaf_call_in_place():
    gm = lora_fx.capture(TinyMLP().eval(), (torch.randn(2, 10),), method="fx")
    code = gm.code
    with pytest.raises(lora_fx.UnsupportedSiteError, match="lora_dropout"):
        lora_fx.inject(gm, LoraConfig(target_parameters=["lin0.weight"], lora_dropout=0.1))
    assert gm.code == code  # the opened call was put back
