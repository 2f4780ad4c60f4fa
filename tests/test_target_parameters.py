"""`target_parameters`: LoRA on parameters read directly by ops (MoE expert stacks in bmm / einsum).

The rewrite sits on the parameter's read (`W -> W + delta`), so every consuming op sees the adapted
weight. PEFT (`ParamWrapper`) is the oracle for outputs, names, file keys and merging.
"""

from __future__ import annotations

import copy

import peft
import pytest
import safetensors.torch
import torch
from conftest import assert_close, assert_differs
from helpers import assert_no_lora, lora_roles
from models import TinyMoE, tiny_llama
from torch import nn

import lora_fx
from lora_fx import LoraConfig, NoTargetMatchedError, UnsupportedSiteError
from lora_fx.math import ops

pytestmark = pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)`:FutureWarning")
_TARGETS = {
    "gate_up": ["experts.gate_up_proj"],
    "both": ["experts.gate_up_proj", "experts.down_proj"],  # nested on one module, as PEFT
}


def _moe():
    torch.manual_seed(0)
    return TinyMoE().eval(), torch.randn(6, 8)


@pytest.mark.parametrize("method", ["export", "fx"])
@pytest.mark.parametrize("targets", list(_TARGETS), ids=list(_TARGETS))
def test_moe_matches_peft(targets, method, tmp_path):
    model, x = _moe()
    cfg = {"target_modules": [], "target_parameters": _TARGETS[targets], "r": 2, "lora_alpha": 4}
    pm = peft.get_peft_model(
        copy.deepcopy(model), peft.LoraConfig(**cfg, init_lora_weights=False)
    ).eval()
    pm.save_pretrained(tmp_path / "peft")
    with torch.no_grad():
        expected, merged = pm(x), copy.deepcopy(pm).merge_and_unload()(x)
        assert_differs(expected, model(x))

    gm = lora_fx.capture(copy.deepcopy(model), (x,), method=method)
    lora_fx.load_adapter(gm, tmp_path / "peft")
    gm.graph.lint()
    assert lora_roles(gm)["add"] == len(_TARGETS[targets])
    with torch.no_grad():
        assert_close(gm(x), expected)
    assert lora_fx.count_parameters(gm) == pm.get_nb_trainable_parameters()
    ours = {n for n in gm.state_dict() if ".lora_" in n}
    theirs = {n.removeprefix("base_model.model.") for n in pm.state_dict() if ".lora_" in n}
    assert ours == theirs  # experts.base_layer.lora_A.default.weight, ... (PEFT's nesting)

    lora_fx.save_adapter(gm, tmp_path / "ours")
    files = [tmp_path / d / "adapter_model.safetensors" for d in ("ours", "peft")]
    assert set(safetensors.torch.load_file(str(files[0]))) == set(
        safetensors.torch.load_file(str(files[1]))
    )
    pm2 = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "ours").eval()
    with torch.no_grad():
        assert_close(pm2(x), expected)

    lora_fx.merge(gm)
    assert lora_roles(gm) == {}
    with torch.no_grad():
        assert_close(gm(x), merged)
    lora_fx.merge_and_unload(lora_fx.unmerge(gm))
    assert_no_lora(gm)
    with torch.no_grad():
        assert_close(gm(x), merged)


def test_unmerge_and_unload_restore_the_expert_weights():
    model, x = _moe()
    gm = lora_fx.capture(copy.deepcopy(model), (x,))
    cfg = LoraConfig(target_parameters=_TARGETS["both"], r=2, init_lora_weights=False)
    lora_fx.inject(gm, cfg)
    base = {k: v.clone() for k, v in gm.state_dict().items() if ".lora_" not in k}
    with torch.no_grad():
        adapted = gm(x)
    lora_fx.merge(gm)
    lora_fx.unmerge(gm)
    for key, value in base.items():
        assert_close(gm.state_dict()[key], value)
    with torch.no_grad():
        assert_close(gm(x), adapted)
    lora_fx.unload(gm)
    with torch.no_grad():
        assert_close(gm(x), model(x))


def test_every_consumer_of_the_parameter_sees_the_adapted_weight():
    class Shared(nn.Module):
        """One [E, in, out] stack read by bmm, by einsum and by an indexing op."""

        def __init__(self):
            super().__init__()
            self.block = nn.Module()
            self.block.w = nn.Parameter(torch.randn(3, 4, 5))

        def forward(self, x):  # x [3, 2, 4]
            w = self.block.w
            return torch.bmm(x, w).sum(0) + torch.einsum("eti,eio->to", x, w) + x[0] @ w[1]

    torch.manual_seed(0)
    model, x = Shared().eval(), torch.randn(3, 2, 4)
    for method in ("export", "fx"):
        gm = lora_fx.capture(copy.deepcopy(model), (x,), method=method)
        cfg = LoraConfig(target_parameters=["w"], r=2, lora_alpha=3, init_lora_weights=False)
        lora_fx.inject(gm, cfg)
        readers = [n for n in gm.graph.nodes if n.op == "get_attr" and n.target == "block.w"]
        assert all(
            set(n.users) <= {n for n in gm.graph.nodes if "lora_fx" in n.meta} for n in readers
        )
        a = gm.get_parameter("block.lora_A.default.weight")
        b = gm.get_parameter("block.lora_B.default.weight")
        reference = copy.deepcopy(model)
        with torch.no_grad():
            reference.block.w += ops.param_delta(a, b, 3 / 2, (3, 4, 5))
            assert_close(gm(x), reference(x))
    with pytest.raises(UnsupportedSiteError, match=r"'weight', a parameter of the root module"):
        root = nn.Linear(2, 2)
        lora_fx.inject(
            lora_fx.capture(root, (torch.randn(1, 2),)), LoraConfig(target_parameters=["weight"])
        )


def test_llama_linear_weights_as_parameters_match_peft(tmp_path):
    torch.manual_seed(0)
    model, ids = tiny_llama().eval(), torch.randint(0, 256, (2, 8))
    cfg = {"target_modules": [], "target_parameters": ["q_proj.weight", "mlp.down_proj.weight"]}
    pm = peft.get_peft_model(
        copy.deepcopy(model), peft.LoraConfig(**cfg, r=4, init_lora_weights=False)
    ).eval()
    pm.save_pretrained(tmp_path)
    gm = lora_fx.capture(copy.deepcopy(model), (ids,), {"use_cache": False})
    lora_fx.load_adapter(gm, tmp_path)
    with torch.no_grad():
        assert_close(gm(ids).logits, pm(ids).logits)
    gm.train()
    gm(ids).logits.square().mean().backward()
    grads = {n for n, p in gm.named_parameters() if p.grad is not None}
    assert grads == set(lora_fx.trainable_parameters(gm)) and len(grads) == 8


def test_param_delta_by_hand():
    # 2 experts, r = 1: A rows are per expert, B columns interleave experts (PEFT's layout)
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])  # [E * r, in]: expert 0 row 0, expert 1 row 1
    b = torch.tensor([[1.0, 10.0], [3.0, 30.0]])  # [out, r * E]: expert 0 col 0, expert 1 col 1
    delta = ops.param_delta(a, b, 0.5, (2, 2, 2))
    expected = 0.5 * torch.stack(
        [torch.tensor([[1.0], [3.0]]) @ a[:1], torch.tensor([[10.0], [30.0]]) @ a[1:]]
    )
    torch.testing.assert_close(delta, expected)
    torch.testing.assert_close(ops.param_delta(a, b[:, :2], 2.0, (2, 2)), 2.0 * b @ a)


def test_bad_requests_name_the_site():
    model, x = _moe()
    gm = lora_fx.capture(copy.deepcopy(model), (x,))
    code = gm.code
    for kwargs, match in (
        ({"lora_dropout": 0.1}, r"lora_dropout=0.1 is not supported on target_parameters site"),
        ({"use_dora": True}, r"use_dora=True is not supported on target_parameters site 'experts'"),
        ({"init_lora_weights": "pissa"}, r"init_lora_weights='pissa' is not supported"),
    ):
        with pytest.raises(UnsupportedSiteError, match=match):
            lora_fx.inject(gm, LoraConfig(target_parameters=["gate_up_proj"], **kwargs))
    with pytest.raises(NoTargetMatchedError, match=r"target_parameters=\['nope'\] matched no"):
        lora_fx.inject(gm, LoraConfig(target_parameters=["nope"]))
    assert gm.code == code
    # A leaf fx keeps whose call has no functional form here (nn.Bilinear): named, not crashed.
    bilinear = nn.Sequential(nn.Bilinear(3, 3, 2)).eval()
    leaf = lora_fx.capture(bilinear, (torch.randn(2, 3), torch.randn(2, 3)), method="fx")
    with pytest.raises(UnsupportedSiteError, match=r"no op in the graph reads '0.weight'"):
        lora_fx.inject(leaf, LoraConfig(target_parameters=["0.weight"]))


def test_transformers_mixtral_experts_match_peft(tmp_path):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
    )
    model, ids = MixtralForCausalLM(config).eval(), torch.randint(0, 128, (1, 8))
    cfg = {"target_modules": [], "target_parameters": ["experts.gate_up_proj", "experts.down_proj"]}
    pm = peft.get_peft_model(
        copy.deepcopy(model), peft.LoraConfig(**cfg, r=2, init_lora_weights=False)
    ).eval()
    pm.save_pretrained(tmp_path)
    gm = lora_fx.capture(copy.deepcopy(model), (ids,), {"use_cache": False})
    lora_fx.load_adapter(gm, tmp_path)
    with torch.no_grad():
        expected = pm(ids).logits
        assert_differs(expected, model(ids).logits)
        assert_close(gm(ids).logits, expected)
        lora_fx.merge_and_unload(gm)
        assert_close(gm(ids).logits, expected)


@pytest.mark.parametrize("method", ["export", "fx"])
def test_onnx_export_of_parameter_sites_runs_in_onnxruntime(method, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    from lora_fx.exporters import export_onnx

    model, x = _moe()
    cfg = LoraConfig(target_parameters=_TARGETS["both"], r=2, init_lora_weights=False)
    gm = lora_fx.inject(lora_fx.capture(copy.deepcopy(model), (x,), method=method), cfg)
    with torch.no_grad():
        expected = gm(x)
        assert_differs(expected, model(x))
    for merged in (True, False):
        path = tmp_path / f"merged_{merged}.onnx"
        export_onnx(gm, (x,), path, merged=merged)
        session = ort.InferenceSession(str(path))
        (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        assert_close(torch.from_numpy(out), expected)
    with pytest.raises(
        UnsupportedSiteError, match=r"site 'experts(.base_layer)?'.*lora_layout='stacked'"
    ):
        export_onnx(gm, (x,), tmp_path / "stacked.onnx", merged=False, lora_layout="stacked")
