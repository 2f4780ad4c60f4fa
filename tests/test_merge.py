import copy
import math

import peft
import pytest
import torch
from conftest import assert_close, assert_differs
from helpers import capture_case, lora_adds, lora_roles
from models import METHODS, SITE_CASES, TinyMLP, tiny_gpt2

import lora_fx
from lora_fx import AdapterError, LoraConfig, MergeError


def _adapted(case, method, **cfg):
    gm, x, targets = capture_case(case, method)
    base = gm(x).detach()
    lora_fx.inject(gm, LoraConfig(target_modules=targets, init_lora_weights=False, **cfg))
    return gm, x, base


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", list(SITE_CASES))
def test_merge_equals_unmerged_and_unmerge_restores(case, method):
    gm, x, base = _adapted(case, method, lora_bias=case != "embedding")
    adapted = gm(x).detach()
    assert_differs(adapted, base)
    weights = {n: p.detach().clone() for n, p in gm.named_parameters()}
    lora_fx.merge(gm)
    assert not lora_roles(gm), "a merged graph runs exactly the base ops"
    gm.graph.lint()
    assert_close(gm(x), adapted)
    lora_fx.unmerge(gm)
    for name, before in weights.items():
        assert_close(dict(gm.named_parameters())[name], before)
    assert lora_adds(gm) == len(SITE_CASES[case].targets)
    assert_close(gm(x), adapted)


def test_merging_twice_warns_and_does_nothing():
    gm, x, _ = _adapted("mlp", "export")
    lora_fx.merge(gm)
    merged = gm(x).detach()
    with pytest.warns(UserWarning, match="adapter 'default' is already merged"):
        lora_fx.merge(gm, ["default"])
    assert_close(gm(x), merged)


def test_safe_merge_refuses_non_finite_and_writes_nothing():
    gm, x, _ = _adapted("mlp", "export")
    with torch.no_grad():
        gm.lin1.lora_B.default.weight[0, 0] = float("inf")
    before = {n: p.detach().clone() for n, p in gm.named_parameters()}
    code = gm.code
    with pytest.raises(
        MergeError, match=r"safe_merge: merging adapter 'default' into site 'lin1' gives non-finite"
    ):
        lora_fx.merge(gm, safe_merge=True)
    assert gm.code == code
    for name, param in gm.named_parameters():
        assert torch.equal(param, before[name]), name


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_plain_merge_of_a_non_finite_adapter_warns_and_reports_nan(bad):
    gm, x, _ = _adapted("mlp", "export")
    with torch.no_grad():
        gm.lin1.lora_B.default.weight[0, 0] = bad
    with pytest.warns(
        UserWarning,
        match=r"merge wrote non-finite weights \(NaN or Inf in the adapter\) into 1 sites: "
        r"\['default:lin1'\]; .* safe_merge=True to refuse",
    ):
        lora_fx.merge(gm)
    report = lora_fx.merge_report(gm)
    assert report["default:lin0"] == 0.0 and math.isnan(report["default:lin1"])
    assert not torch.isfinite(gm.lin1.weight).all()


def test_bf16_merge_reports_rounding_loss():
    model = TinyMLP().eval().to(torch.bfloat16)
    x = torch.randn(4, 10, dtype=torch.bfloat16)
    gm = lora_fx.capture(model, (x,))
    lora_fx.inject(gm, LoraConfig(target_modules=["lin0", "lin1"], init_lora_weights="gaussian"))
    with torch.no_grad():
        for name, p in lora_fx.trainable_parameters(gm).items():
            if "lora_B" in name:
                p.normal_(std=1e-3)  # a small delta, as after short training: bf16 drops much of it
    with pytest.warns(UserWarning, match=r"merge lost up to .* to rounding"):
        lora_fx.merge(gm)
    report = lora_fx.merge_report(gm)
    assert set(report) == {"default:lin0", "default:lin1"}
    assert max(report.values()) > 0.01
    fp32 = lora_fx.capture(TinyMLP().eval(), (x.float(),))
    lora_fx.inject(fp32, LoraConfig(target_modules=["lin0"], init_lora_weights=False))
    lora_fx.merge(fp32)
    assert lora_fx.merge_report(fp32) == {"default:lin0": 0.0}


def test_merge_report_outlives_merge_and_unload():
    model = TinyMLP().eval().to(torch.bfloat16)
    x = torch.randn(4, 10, dtype=torch.bfloat16)
    gm = lora_fx.capture(model, (x,))
    lora_fx.inject(gm, LoraConfig(target_modules=["lin0", "lin1"], init_lora_weights=False))
    lora_fx.merge_and_unload(gm)
    report = lora_fx.merge_report(gm)
    assert set(report) == {"default:lin0", "default:lin1"} and min(report.values()) > 0


def test_tied_weight_site_gets_private_copy_on_merge():
    model = tiny_gpt2().eval()
    ids = torch.randint(0, 256, (1, 8))
    gm = lora_fx.capture(model, (ids,), {"use_cache": False})
    lora_fx.inject(gm, LoraConfig(target_modules=["wte", "c_attn"], init_lora_weights=False))
    adapted = gm(ids).logits.detach()
    lm_head = model.lm_head.weight.detach().clone()
    with pytest.warns(
        UserWarning, match=r"site 'transformer.wte' shares its weight .* private copy"
    ):
        lora_fx.merge(gm)
    assert_close(gm(ids).logits, adapted)
    assert torch.equal(model.lm_head.weight, lm_head), "lm_head must keep the base weight"
    lora_fx.unmerge(gm)
    assert_close(gm(ids).logits, adapted)


def test_merge_errors():
    gm = lora_fx.capture(TinyMLP().eval(), (torch.randn(2, 10),))
    with pytest.raises(AdapterError, match=r"this graph has no LoRA adapter; call lora_fx.inject"):
        lora_fx.merge(gm)
    lora_fx.inject(gm, LoraConfig(target_modules=["lin0"]))
    with pytest.raises(
        AdapterError,
        match=r"unknown adapter\(s\) \['nope'\]; adapters on this graph: \['default'\]",
    ):
        lora_fx.merge(gm, ["nope"])


class NoBias(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4, bias=False)

    def forward(self, x):
        return self.lin(x)


def test_lora_bias_without_base_bias_cannot_merge():
    gm = lora_fx.capture(NoBias(), (torch.randn(2, 4),))
    lora_fx.inject(gm, LoraConfig(target_modules=["lin"], lora_bias=True))
    with pytest.raises(MergeError, match="site 'lin' has lora_bias=True but no base bias"):
        lora_fx.merge(gm)


@pytest.mark.parametrize("method", METHODS)
def test_lora_bias_folds_scale_times_bias_into_the_base_bias(method, tmp_path):
    # scale = alpha / r = 4: a fold that forgot the scale would be off by 3 * b_B
    torch.manual_seed(0)
    model, x = TinyMLP().eval(), torch.randn(4, 10)
    cfg = {"target_modules": ["lin0", "lin1"], "r": 4, "lora_alpha": 16, "lora_bias": True}
    pm = peft.get_peft_model(
        copy.deepcopy(model), peft.LoraConfig(**cfg, init_lora_weights=False)
    ).eval()
    with torch.no_grad():
        for name, param in pm.named_parameters():
            if name.endswith("lora_B.default.bias"):
                param.normal_()
    pm.save_pretrained(tmp_path)
    gm = lora_fx.load_adapter(lora_fx.capture(copy.deepcopy(model), (x,), method=method), tmp_path)
    with torch.no_grad():
        expected = pm(x)
        assert_close(gm(x), expected)
    b_bias = gm.get_parameter("lin0.lora_B.default.bias").detach().clone()
    lora_fx.merge(gm)
    assert_close(gm.get_parameter("lin0.bias"), model.lin0.bias.detach() + 4 * b_bias)
    with torch.no_grad():
        assert_close(gm(x), expected)
        assert_close(gm(x), pm.merge_and_unload()(x))
    lora_fx.unmerge(gm)
    assert_close(gm.get_parameter("lin0.bias"), model.lin0.bias.detach())
