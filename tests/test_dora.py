"""DoRA (`use_dora=True`): PEFT parity per site kind, merge / unmerge identities, math, errors.

PEFT is the oracle: its adapter (random B, `init_lora_weights=False`, magnitudes moved off their
initial norms so the rescaling matters) is loaded into the captured graph; outputs, merged outputs,
gradients, parameter counts and file keys must agree, and PEFT must read what lora_fx saves.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import peft
import pytest
import safetensors.torch
import torch
from conftest import assert_close, assert_differs
from helpers import assert_no_lora, lora_roles
from models import Case, TinyConv, TinyEmbedding, TinyMLP, tiny_gpt2, tiny_llama
from torch import nn

import lora_fx
from lora_fx import (
    ConfigError,
    LoraConfig,
    MergeError,
    UnsupportedSiteError,
)
from lora_fx.math import dora

pytestmark = pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)`:FutureWarning")
_NO_CACHE = {"use_cache": False}


CASES = [
    Case("mlp-fx", TinyMLP, lambda: torch.randn(4, 10), {"target_modules": ["lin0", "lin1"]}, "fx"),
    Case("mlp-export", TinyMLP, lambda: torch.randn(4, 10), {"target_modules": ["lin0", "lin1"]}),
    Case(
        "mlp-dropout",
        TinyMLP,
        lambda: torch.randn(4, 10),
        {"target_modules": ["lin0", "lin1"], "lora_dropout": 0.2},
    ),
    Case(
        "conv2d",
        TinyConv,
        lambda: torch.randn(2, 3, 6, 6),
        {"target_modules": ["conv0", "conv1", "lin0"], "r": 4},
    ),
    Case(
        "conv2d-fx-dropout",
        TinyConv,
        lambda: torch.randn(2, 3, 6, 6),
        {"target_modules": ["conv0"], "r": 4, "lora_dropout": 0.1},
        "fx",
    ),
    Case(
        "embedding",
        TinyEmbedding,
        lambda: torch.randint(0, 100, (2, 8)),
        {"target_modules": ["emb", "lin0"], "r": 4},
    ),
    Case(
        "gpt2-conv1d",
        tiny_gpt2,
        lambda: torch.randint(0, 256, (2, 8)),
        {"target_modules": ["c_attn", "c_fc"], "r": 4},
        kwargs=_NO_CACHE,
    ),
    Case(
        "llama",
        tiny_llama,
        lambda: torch.randint(0, 256, (2, 8)),
        {"target_modules": ["q_proj", "v_proj", "down_proj"], "r": 4, "lora_alpha": 16},
        kwargs=_NO_CACHE,
    ),
]


def _out(output: Any) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output


@dataclass
class Oracle:
    model: nn.Module
    x: torch.Tensor
    base: torch.Tensor
    peft: torch.Tensor
    peft_merged: torch.Tensor
    counts: tuple[int, int]
    folder: Any
    gm: torch.fx.GraphModule  # the base capture; deep-copy before use


@pytest.fixture(scope="module")
def oracle(tmp_path_factory) -> Callable[[Case], Oracle]:
    cache: dict[str, Oracle] = {}

    def get(case: Case) -> Oracle:
        if case.id not in cache:
            torch.manual_seed(0)
            model, x = case.model().eval(), case.inputs()
            pm = peft.get_peft_model(
                copy.deepcopy(model),
                peft.LoraConfig(**case.cfg, use_dora=True, init_lora_weights=False),
            ).eval()
            with torch.no_grad():
                for name, param in pm.named_parameters():
                    if "lora_magnitude_vector" in name:
                        param.mul_(1 + 0.2 * torch.randn_like(param))
            folder = tmp_path_factory.mktemp(case.id)
            pm.save_pretrained(folder)
            with torch.no_grad():
                base, out = _out(model(x)), _out(pm(x))
                merged = _out(copy.deepcopy(pm).merge_and_unload()(x))
            assert_differs(out, base)
            gm = lora_fx.capture(copy.deepcopy(model), (x,), case.kwargs, method=case.method)
            counts = pm.get_nb_trainable_parameters()
            cache[case.id] = Oracle(model, x, base, out, merged, counts, folder, gm)
        return cache[case.id]

    return get


def _loaded(o: Oracle) -> torch.fx.GraphModule:
    return lora_fx.load_adapter(copy.deepcopy(o.gm), o.folder)


# ------------------------------------------------------------------------------- PEFT parity


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_peft_dora_adapter_gives_peft_outputs(case, oracle):
    o = oracle(case)
    gm = _loaded(o)
    gm.graph.lint()
    assert lora_roles(gm)["dora"] > 0
    with torch.no_grad():
        assert_close(_out(gm(o.x)), o.peft)
    assert lora_fx.count_parameters(gm) == o.counts


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_merge_unmerge_and_unload(case, oracle):
    o = oracle(case)
    gm = _loaded(o)
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    lora_fx.merge(gm)
    assert lora_roles(gm) == {}  # a merged graph runs exactly the base ops
    with torch.no_grad():
        assert_close(_out(gm(o.x)), o.peft)
        assert_close(_out(gm(o.x)), o.peft_merged)
    lora_fx.unmerge(gm)
    for key, value in gm.state_dict().items():
        assert_close(value, before[key])
    with torch.no_grad():
        assert_close(_out(gm(o.x)), o.peft)
    lora_fx.merge_and_unload(gm)
    assert_no_lora(gm)
    with torch.no_grad():
        assert_close(_out(gm(o.x)), o.peft_merged)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_saved_files_round_trip_with_peft(case, oracle, tmp_path):
    o = oracle(case)
    gm = _loaded(o)
    lora_fx.save_adapter(gm, tmp_path)
    ours = safetensors.torch.load_file(str(tmp_path / "adapter_model.safetensors"))
    theirs = safetensors.torch.load_file(str(o.folder / "adapter_model.safetensors"))
    assert set(ours) == set(theirs)
    assert any(k.endswith(".lora_magnitude_vector") for k in ours)
    for key, value in theirs.items():
        assert ours[key].shape == value.shape
        assert_close(ours[key], value)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(o.model), tmp_path).eval()
    with torch.no_grad():
        assert_close(_out(pm(o.x)), o.peft)


def test_gradients_match_peft_and_norm_is_detached(oracle):
    case = next(c for c in CASES if c.id == "llama")
    o = oracle(case)
    gm = _loaded(o).train()
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(o.model), o.folder, is_trainable=True).train()
    _out(gm(o.x)).square().mean().backward()
    _out(pm(o.x)).square().mean().backward()
    theirs = {
        n.removeprefix("base_model.model."): p.grad
        for n, p in pm.named_parameters()
        if p.requires_grad
    }
    ours = {n: p.grad for n, p in gm.named_parameters() if p.requires_grad}
    assert set(ours) == set(theirs)
    assert any("lora_magnitude_vector" in n for n in ours)
    for name, grad in ours.items():
        assert_close(grad, theirs[name])


def test_fresh_dora_adapter_is_the_base_and_trains_the_magnitude():
    torch.manual_seed(0)
    model, x = TinyMLP().eval(), torch.randn(4, 10)
    gm = lora_fx.capture(copy.deepcopy(model), (x,))
    lora_fx.inject(gm, LoraConfig(target_modules=["lin0", "lin1"], use_dora=True))
    with torch.no_grad():
        assert_close(gm(x), model(x))
        magnitude = gm.get_parameter("lin0.lora_magnitude_vector.default.weight")
        assert_close(magnitude, model.lin0.weight.norm(dim=1))  # B = 0: ||W|| per output row
    assert magnitude.requires_grad and "lin0.lora_magnitude_vector.default.weight" in (
        lora_fx.trainable_parameters(gm)
    )


def test_dropout_recomputes_the_base_term_from_the_dropped_input():
    gm = lora_fx.capture(TinyMLP().eval(), (torch.randn(4, 10),))
    lora_fx.inject(gm, LoraConfig(target_modules=["lin0"], use_dora=True, lora_dropout=0.3))
    targets = [n.target for n in gm.graph.nodes if (n.meta.get("lora_fx") or {}).get("role")]
    assert dora.base_output in targets and dora.branch_norm in targets
    gm2 = lora_fx.capture(TinyMLP().eval(), (torch.randn(4, 10),))
    lora_fx.inject(gm2, LoraConfig(target_modules=["lin0"], use_dora=True))
    assert dora.base_output not in [n.target for n in gm2.graph.nodes]


# ------------------------------------------------------------------------------- math


def test_weight_norm_per_output_channel_by_hand():
    w = torch.tensor([[3.0, 0.0], [0.0, 1.0]])  # [out=2, in=2]
    delta = torch.tensor([[0.0, 4.0], [0.0, 0.0]])
    torch.testing.assert_close(dora.weight_norm(w, delta, kind="linear"), torch.tensor([5.0, 1.0]))
    # stored [in, out]: the same channels are the columns
    torch.testing.assert_close(
        dora.weight_norm(w.T, delta.T, kind="linear", transposed=True), torch.tensor([5.0, 1.0])
    )
    # embedding [num, dim]: one norm per dimension (column)
    torch.testing.assert_close(
        dora.weight_norm(w, delta, kind="embedding"), torch.tensor([3.0, 17**0.5])
    )
    conv = torch.tensor([[[[3.0]], [[4.0]]]])  # [out=1, in=2, 1, 1]
    got = dora.weight_norm(conv, torch.zeros_like(conv), kind="conv")
    torch.testing.assert_close(got, torch.tensor([[[[5.0]]]]))  # [1, out, 1, 1]


def test_merged_and_unmerged_weight_by_hand():
    w = torch.tensor([[3.0, 0.0], [0.0, 1.0]])
    delta = torch.tensor([[0.0, 4.0], [0.0, 0.0]])
    magnitude, norm = torch.tensor([10.0, 2.0]), torch.tensor([5.0, 1.0])
    merged = dora.merged_weight(w, delta, magnitude, norm, kind="linear")
    torch.testing.assert_close(merged, torch.tensor([[6.0, 8.0], [0.0, 2.0]]))  # rows * [2, 2]
    back = dora.unmerged_weight(merged, delta, magnitude, norm, kind="linear")
    torch.testing.assert_close(back, w)


# ------------------------------------------------------------------------------- errors


def test_dora_on_grouped_conv_names_the_site():
    class Grouped(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, groups=2)

        def forward(self, x):
            return self.conv(x)

    gm = lora_fx.capture(Grouped().eval(), (torch.randn(1, 4, 5, 5),))
    with pytest.raises(
        UnsupportedSiteError, match=r"use_dora=True is not supported on site 'conv'"
    ):
        lora_fx.inject(gm, LoraConfig(target_modules=["conv"], r=2, use_dora=True))


def test_dora_with_lora_bias_is_a_config_error():
    with pytest.raises(ConfigError, match=r"lora_bias=True is not supported with use_dora"):
        LoraConfig(target_modules=["lin0"], use_dora=True, lora_bias=True)


def test_two_dora_adapters_on_one_site_cannot_both_be_merged():
    gm = lora_fx.capture(TinyMLP().eval(), (torch.randn(4, 10),))
    cfg = LoraConfig(target_modules=["lin0"], use_dora=True, init_lora_weights=False)
    lora_fx.inject(gm, cfg, "a")
    lora_fx.inject(gm, cfg, "b")
    lora_fx.set_adapter(gm, ["a", "b"])
    code = gm.code
    with pytest.raises(MergeError, match=r"site 'lin0' would hold 2 merged DoRA adapters"):
        lora_fx.merge(gm)
    assert gm.code == code


def test_hotswap_and_mixed_batch_carry_the_magnitude(tmp_path):
    torch.manual_seed(0)
    model, x = TinyMLP().eval(), torch.randn(4, 10)
    peft_models = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        pm = peft.get_peft_model(
            copy.deepcopy(model),
            peft.LoraConfig(target_modules=["lin0"], use_dora=True, init_lora_weights=False),
        ).eval()
        with torch.no_grad():
            pm.base_model.model.lin0.lora_magnitude_vector["default"].weight.mul_(1.3)
        pm.save_pretrained(tmp_path / str(seed))
        peft_models.append(pm)
    with torch.no_grad():
        outs = [pm(x) for pm in peft_models]
    gm = lora_fx.load_adapter(lora_fx.capture(copy.deepcopy(model), (x,)), tmp_path / "1", "a")
    lora_fx.load_adapter(gm, tmp_path / "2", "b")
    with lora_fx.adapter_batch(gm, ["a", "b", "__base__", "b"]), torch.no_grad():
        mixed = gm(x)
    with torch.no_grad():
        expected = torch.stack([outs[0][0], outs[1][1], model(x)[2], outs[1][3]])
    assert_close(mixed, expected)
    lora_fx.load_adapter(gm, tmp_path / "2", "a", hotswap=True)
    with torch.no_grad():
        assert_close(gm(x), outs[1])
