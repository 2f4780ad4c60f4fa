"""QALoRA (PEFT 0.21.2's `use_qalora`, `qalora_group_size`) against PEFT's own code.

PEFT dispatches QALoRA only on GPTQ linears (`peft.tuners.lora.gptq.GPTQLoraLinear`), and no GPTQ
backend runs on this CPU. `GPTQLoraLinear` only calls its base layer, so the oracle here is that
class wrapped around the same dense (or bitsandbytes) linear, registered as a PEFT custom module:
PEFT's init stream, `QALoraLinearVariant.forward`, its state dict and its files, unchanged.
lora_fx takes QALoRA on any linear site; its merge is exact (PEFT has none).
"""

from __future__ import annotations

import copy

import peft
import pytest
import safetensors.torch
import torch
from conftest import assert_close, assert_differs
from helpers import assert_hotswap_refused, assert_mixed_batch_rows, lm_pair, lora_roles
from models import TinyMLP, bnb_copy, tiny_gpt2, tiny_llama
from peft.tuners.lora.gptq import GPTQLoraLinear
from peft.tuners.lora.variants import QALoraLinearVariant
from torch import nn

import lora_fx
from lora_fx import ConfigError, LoraConfig, UnsupportedSiteError
from lora_fx.exporters import export_onnx
from lora_fx.math.qalora import expand_a, qalora_pool

_FEATURES = (16, 24, 12)
_CFG = {
    "target_modules": ["lin0", "lin1"],
    "r": 4,
    "lora_alpha": 8,
    "use_qalora": True,
    "qalora_group_size": 4,
    "init_lora_weights": False,
}


def _peft_model(model: nn.Module, cfg: dict, base: type = nn.Linear):
    """PEFT's QALoRA: `GPTQLoraLinear` (what PEFT puts on a GPTQ linear) around each target."""
    config = peft.LoraConfig(**cfg)
    config._register_custom_module({base: GPTQLoraLinear})
    return peft.get_peft_model(model, config)


def _pair(method: str = "export", cfg: dict = _CFG, *, features=_FEATURES):
    """PEFT and lora_fx on the same MLP weights and seed; A and B random (init False)."""
    torch.manual_seed(0)
    model, x = TinyMLP(features=features).eval(), torch.randn(3, 5, features[0])
    gm = lora_fx.capture(copy.deepcopy(model), (x,), method=method)
    torch.manual_seed(1)
    pm = _peft_model(copy.deepcopy(model), cfg).eval()
    torch.manual_seed(1)
    gm = lora_fx.inject(gm, LoraConfig(**cfg))
    return model, x, gm, pm


def _grads(module: nn.Module, x: torch.Tensor, prefix: str = "") -> dict[str, torch.Tensor]:
    module.zero_grad()
    torch.manual_seed(2)  # the same masks for TinyMLP's own dropout in training
    module(x).sum().backward()
    return {
        n.removeprefix(prefix): p.grad.clone()
        for n, p in module.named_parameters()
        if ".lora_" in n
    }


def test_pool_and_expand_by_hand():
    x = torch.tensor([[1.0, 3.0, 2.0, 6.0, 0.0, 3.0]])  # groups of 2: means 2, 4, 1.5
    assert torch.equal(qalora_pool(x, 2), torch.tensor([[6.0, 12.0, 4.5]]))  # x 3 groups
    a = torch.tensor([[1.0, 2.0, 4.0]])  # [r=1, in/g=3]
    # A_full[:, k] = A[:, k // 2] * 3 / 2
    assert torch.equal(expand_a(a, 2), torch.tensor([[1.5, 1.5, 3.0, 3.0, 6.0, 6.0]]))
    assert torch.equal(x @ expand_a(a, 2).T, qalora_pool(x, 2) @ a.T)  # 40.5 both


@pytest.mark.parametrize("method", ["fx", "export"])
def test_init_outputs_gradients_match_peft(method):
    model, x, gm, pm = _pair(method)
    theirs = pm.state_dict()
    shapes = {}
    for name, value in gm.state_dict().items():
        if ".lora_" in name:  # PEFT's init stream: the same tensors, bit for bit
            assert torch.equal(value, theirs[f"base_model.model.{name}"]), name
            shapes[name] = tuple(value.shape)
    assert shapes == {
        "lin0.lora_A.default.weight": (4, 4),  # [r, in / group_size]
        "lin0.lora_B.default.weight": (24, 4),
        "lin1.lora_A.default.weight": (4, 6),
        "lin1.lora_B.default.weight": (12, 4),
    }
    gm.graph.lint()
    assert sum(n.target is qalora_pool for n in gm.graph.nodes) == 2
    assert lora_roles(gm)["lora_a"] >= 2
    with torch.no_grad():
        expected = pm(x)
        assert_differs(expected, model(x))
        assert_close(gm(x), expected)
    gm.train(), pm.train()
    ours, peft_grads = _grads(gm, x), _grads(pm, x, "base_model.model.")
    assert ours.keys() == peft_grads.keys() and len(ours) == 4
    for name, grad in ours.items():
        assert grad.abs().sum() > 0, name
        assert_close(grad, peft_grads[name])


def test_variant_forward_called_directly():
    """`QALoraLinearVariant.forward` on PEFT's layer, with lora_fx's A and B, gives the branch."""
    model, x, gm, pm = _pair()
    layer = pm.base_model.model.lin0
    with torch.no_grad():
        base = layer.base_layer(x)
        theirs = QALoraLinearVariant.forward(layer, active_adapter="default", x=x, result=base)
        a, b = gm.lin0.lora_A["default"].weight, gm.lin0.lora_B["default"].weight
        assert_close(base + 2.0 * qalora_pool(x, 4) @ a.T @ b.T, theirs)


def test_dropout_matches_peft_in_training():
    cfg = {**_CFG, "lora_dropout": 0.3}
    _, x, gm, pm = _pair("export", cfg)
    gm.train(), pm.train()
    torch.manual_seed(5)
    ours = gm(x)
    torch.manual_seed(5)
    assert_close(ours, pm(x))


def test_merge_is_exact_where_peft_has_none():
    model, x, gm, pm = _pair()
    with torch.no_grad():
        expected = pm(x)
        lora_fx.merge(gm)
        assert not lora_roles(gm)
        assert_close(gm(x), expected)
        lora_fx.unmerge(gm)
        assert_close(gm.lin0.weight, model.lin0.weight)
        assert_close(gm(x), expected)
        merged = lora_fx.merge_and_unload(gm)
        assert_close(merged(x), expected)
    with pytest.raises(NotImplementedError):  # PEFT's GPTQ layer has no merge at all
        pm.merge_and_unload()


def test_files_both_ways(tmp_path):
    model, x, gm, pm = _pair()
    with torch.no_grad():
        expected = pm(x)
    pm.save_pretrained(tmp_path / "peft")
    lora_fx.save_adapter(gm, tmp_path / "ours")
    ours = safetensors.torch.load_file(tmp_path / "ours" / "adapter_model.safetensors")
    theirs = safetensors.torch.load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert sorted(ours) == sorted(theirs)
    assert ours["base_model.model.lin1.lora_A.weight"].shape == (4, 6)
    for key, value in ours.items():
        assert torch.equal(value, theirs[key]), key
    cfg = LoraConfig.from_json(tmp_path / "peft" / "adapter_config.json")
    assert (cfg.use_qalora, cfg.qalora_group_size) == (True, 4)
    # PEFT -> lora_fx
    fresh = lora_fx.capture(copy.deepcopy(model), (x,))
    with torch.no_grad():
        assert_close(lora_fx.load_adapter(fresh, tmp_path / "peft")(x), expected)
    # lora_fx -> PEFT (its GPTQ layer on the dense base, as above)
    config = peft.LoraConfig.from_pretrained(tmp_path / "ours")
    assert (config.use_qalora, config.qalora_group_size) == (True, 4)
    back = _peft_model(copy.deepcopy(model), {**_CFG, "init_lora_weights": True}).eval()
    peft.set_peft_model_state_dict(back, ours)
    with torch.no_grad():
        assert_close(back(x), expected)


@pytest.mark.filterwarnings("ignore:MatMul8bitLt. inputs will be cast:UserWarning")
@pytest.mark.parametrize("capture", ["bnb_modules", "quantize_pass"])
@pytest.mark.parametrize("quant_type", ["nf4", "int8"])
def test_bnb_base_matches_peft_gptq_layer_on_it(quant_type, capture):
    """On a bitsandbytes base: lora_fx's branch equals PEFT's QALoRA layer around it.

    The base is either the bitsandbytes modules captured as fx leaves, or `lora_fx.quantize`.
    """
    torch.manual_seed(0)
    dense, x = TinyMLP(features=(64, 64, 32)).eval(), torch.randn(4, 64)
    cfg = {**_CFG, "qalora_group_size": 16}
    quantized = bnb_copy(dense, quant_type)
    for module in quantized.modules():  # bitsandbytes' float32 CPU path, as lora_fx computes
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    if capture == "bnb_modules":
        gm = lora_fx.capture(copy.deepcopy(quantized), (x,), method="fx")
    else:
        gm = lora_fx.quantize(lora_fx.capture(copy.deepcopy(dense), (x,)), quant_type)
    import bitsandbytes as bnb

    torch.manual_seed(1)
    base = bnb.nn.Linear8bitLt if quant_type == "int8" else bnb.nn.Linear4bit
    pm = _peft_model(copy.deepcopy(quantized), cfg, base).eval()
    torch.manual_seed(1)
    gm = lora_fx.inject(gm, LoraConfig(**cfg))
    assert gm.lin0.lora_A["default"].weight.shape == (4, 4)
    theirs = pm.state_dict()
    for name, value in gm.state_dict().items():
        if ".lora_" in name:
            assert torch.equal(value, theirs[f"base_model.model.{name}"]), name
    with torch.no_grad():
        expected = pm(x)
        assert_differs(expected, quantized(x))
        assert_close(gm(x), expected)


def test_llama_export_matches_peft():
    torch.manual_seed(0)
    model, ids = tiny_llama(layers=2, hidden=64).eval(), torch.randint(0, 256, (2, 12))
    cfg = {**_CFG, "target_modules": ["q_proj", "v_proj", "down_proj"], "qalora_group_size": 16}
    gm, pm, _ = lm_pair(model, ids, cfg, lambda m: _peft_model(m, cfg))
    down = gm.get_submodule("model.layers.0.mlp.down_proj").lora_A["default"].weight
    assert down.shape == (4, 128 // 16)
    gm.train(), pm.train()
    gm.zero_grad()
    gm(ids).logits.square().mean().backward()
    pm(ids, use_cache=False).logits.square().mean().backward()
    theirs = dict(pm.named_parameters())
    for name, param in gm.named_parameters():
        if ".lora_" in name:
            assert_close(param.grad, theirs[f"base_model.model.{name}"].grad)


def test_gpt2_conv1d_sites_match_peft_merge_and_weight_layout():
    """Conv1D sites (`addmm` on a weight stored [in, out]): PEFT's GPTQ layer around Conv1D."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    model, ids = tiny_gpt2().eval(), torch.randint(0, 100, (2, 8))
    cfg = {**_CFG, "target_modules": ["c_attn", "c_fc"], "qalora_group_size": 16}
    peft_cfg = {**cfg, "fan_in_fan_out": True}
    gm, _, expected = lm_pair(model, ids, cfg, lambda m: _peft_model(m, peft_cfg, Conv1D))
    with torch.no_grad():
        lora_fx.set_layout(gm, "weight")  # QALoRA's sites keep the fused layout
        assert_close(gm(ids).logits, expected)
        lora_fx.merge(gm)
        assert_close(gm(ids).logits, expected)


@pytest.mark.parametrize("method", ["fx", "export"])
def test_compiled_matches_eager(method):
    _, x, gm, _ = _pair(method, {**_CFG, "lora_dropout": 0.2})
    compiled = torch.compile(gm, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        assert_close(compiled(x), gm(x))
    gm.train()
    outputs, grads = [], []
    for module in (gm, compiled):  # aot_eager draws dropout masks from the eager stream
        gm.zero_grad()
        torch.manual_seed(3)
        out = module(x)
        out.square().sum().backward()
        outputs.append(out.detach())
        grads.append({n: p.grad.clone() for n, p in gm.named_parameters() if ".lora_" in n})
    assert_close(outputs[1], outputs[0])
    assert len(grads[0]) == 4
    for name, grad in grads[0].items():
        assert_close(grads[1][name], grad)


def test_group_size_must_divide_in_features_graph_unchanged():
    torch.manual_seed(0)
    model, x = TinyMLP(features=_FEATURES).eval(), torch.randn(3, 16)
    gm = lora_fx.capture(model, (x,))
    code, params = gm.code, dict(gm.named_parameters())
    with pytest.raises(
        UnsupportedSiteError, match="'lin1' has in_features=24, qalora_group_size=16"
    ):
        lora_fx.inject(gm, LoraConfig(**{**_CFG, "qalora_group_size": 16}))
    with pytest.raises(ValueError, match="in_features=16, qalora_group_size=3"):  # lin0 first
        lora_fx.inject(gm, LoraConfig(**{**_CFG, "qalora_group_size": 3}))
    assert gm.code == code and dict(gm.named_parameters()).keys() == params.keys()
    assert "lora_fx" not in gm.meta


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"qalora_group_size": 0}, "qalora_group_size=0"),
        ({"qalora_group_size": 2.5}, "qalora_group_size=2.5"),
        ({"use_qalora": "yes"}, "use_qalora='yes'"),
        ({"use_dora": True}, "use_qalora is not supported with use_dora"),
        ({"use_bdlora": {"nblocks": 2}}, "use_qalora is not supported with use_bdlora"),
        ({"init_lora_weights": "pissa"}, "init_lora_weights True, False or 'gaussian'"),
        ({"lora_bias": True}, "drops lora_B's bias"),
    ],
)
def test_bad_qalora_config_is_refused(fields, match):
    with pytest.raises(ConfigError, match=match):
        LoraConfig(**{**_CFG, **fields})


def test_unsupported_operations_are_refused(tmp_path):
    _, x, gm, _ = _pair()
    with pytest.raises(ValueError, match="QALoRA"):
        lora_fx.add_weighted_adapter(gm, ["default"], [1.0], "mix")
    with pytest.raises(ValueError, match="QALoRA"):  # merged and "initializers" export it
        export_onnx(gm, (x,), tmp_path / "m.onnx", merged=False, lora_layout="inputs")


def test_hotswap_is_refused(tmp_path):
    assert_hotswap_refused(_pair()[2], tmp_path, "QALoRA")


def test_mixed_batch_rows_take_their_adapter():
    _, x, gm, _ = _pair()
    assert_mixed_batch_rows(gm, x)
