"""Initialisations from the base weight: PiSSA, OLoRA, LoftQ, orthogonal.

PEFT parity is exact where the init is deterministic (and for the random ones, PiSSA's
`svd_lowrank` and orthogonal, when both draw from the same seed in the same order). PiSSA and
OLoRA promise base + adapter == the original weight; LoftQ promises an approximation that beats
plain quantization; orthogonal promises B @ A == 0.
"""

from __future__ import annotations

import copy
import inspect

import peft.utils.loftq_utils as peft_loftq_utils
import pytest
import torch
from conftest import assert_close
from helpers import peft_and_lora_fx, peft_param_name
from models import TinyConv, TinyMLP, tiny_gpt2, tiny_llama

import lora_fx
from lora_fx import LoftQConfig, LoraConfig, UnsupportedSiteError
from lora_fx.math import inits, quant

pytestmark = pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)`:FutureWarning")
_NO_CACHE = {"use_cache": False}
_INITS = ["pissa", "pissa_niter_4", "olora", "orthogonal"]


def _out(output):
    return output.logits if hasattr(output, "logits") else output


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    model, ids = tiny_llama().eval(), torch.randint(0, 256, (2, 8))
    return model, ids, lora_fx.capture(copy.deepcopy(model), (ids,), _NO_CACHE)


@pytest.mark.parametrize("init", _INITS)
def test_llama_matches_peft_exactly(init, llama):
    model, ids, gm0 = llama
    cfg = {
        "target_modules": ["q_proj", "o_proj"],
        "r": 4,
        "lora_alpha": 8,
        "init_lora_weights": init,
    }
    pm, gm = peft_and_lora_fx(model, copy.deepcopy(gm0), cfg)
    theirs = pm.state_dict()
    compared = 0
    for name, value in gm.state_dict().items():
        if peft_param_name(name) in theirs and ("q_proj" in name or "o_proj" in name):
            assert torch.equal(value, theirs[peft_param_name(name)]), name
            compared += 1
    assert compared == 12  # 4 sites x (A, B, residual base weight)
    lora_fx.set_layout(gm, "plain")  # PEFT's order of operations: bitwise equal outputs
    with torch.no_grad():
        assert torch.equal(gm(ids).logits, pm(ids).logits)


@pytest.mark.parametrize("method", ["export", "fx"])
@pytest.mark.parametrize("init", _INITS)
def test_base_plus_adapter_is_the_original(init, method):
    torch.manual_seed(0)
    model, x = TinyMLP().eval(), torch.randn(4, 10)
    original = model.lin0.weight.detach().clone()
    gm = lora_fx.capture(copy.deepcopy(model), (x,), method=method)
    lora_fx.inject(gm, LoraConfig(target_modules=["lin0"], r=4, init_lora_weights=init))
    residual = gm.get_parameter("lin0.weight").detach().clone()
    if inits.changes_base(init):
        assert (residual - original).abs().max() > 1e-2  # documented: the base weight changes
    else:
        assert torch.equal(residual, original)
    with torch.no_grad():
        assert_close(gm(x), model(x))
    lora_fx.merge(gm)
    assert_close(gm.get_parameter("lin0.weight"), original)
    lora_fx.unmerge(gm)
    assert_close(gm.get_parameter("lin0.weight"), residual)


def test_gpt2_conv1d_sites_decompose_out_in():
    torch.manual_seed(0)
    model, ids = tiny_gpt2().eval(), torch.randint(0, 256, (2, 8))
    original = model.transformer.h[0].attn.c_attn.weight.detach().clone()  # [in, out]
    for init in ("pissa", "olora"):  # PEFT's OLoRA fails here (factors of the [in, out] matrix)
        gm = lora_fx.capture(copy.deepcopy(model), (ids,), _NO_CACHE)
        lora_fx.inject(gm, LoraConfig(target_modules=["c_attn"], r=4, init_lora_weights=init))
        lora_a = gm.get_parameter("transformer.h.0.attn.c_attn.lora_A.default.weight")
        assert lora_a.shape == (4, 32)  # [r, in], in = 32 (PEFT's OLoRA would give [4, 96])
        with torch.no_grad():
            assert_close(gm(ids).logits, model(ids).logits)
        lora_fx.merge(gm)
        assert_close(gm.get_parameter("transformer.h.0.attn.c_attn.weight"), original)


def test_orthogonal_factors_multiply_to_zero():
    torch.manual_seed(0)
    a, b = inits.orthogonal(8, in_features=12, out_features=6)
    assert a.shape == (8, 12) and b.shape == (6, 8)
    assert a.abs().sum() > 0 and b.abs().sum() > 0
    torch.testing.assert_close(b @ a, torch.zeros(6, 12), atol=1e-7, rtol=0)


def test_pissa_and_olora_by_hand():
    w = torch.diag(torch.tensor([4.0, 1.0]))  # singular values 4, 1
    residual, a, b = inits.pissa(w, 1, scale=1.0)
    torch.testing.assert_close(b @ a, torch.tensor([[4.0, 0.0], [0.0, 0.0]]))
    torch.testing.assert_close(residual, torch.tensor([[0.0, 0.0], [0.0, 1.0]]))
    residual, a, b = inits.pissa(w, 1, scale=2.0)  # A, B carry S / scale; scale * B @ A is S
    torch.testing.assert_close(2.0 * b @ a, torch.tensor([[4.0, 0.0], [0.0, 0.0]]))
    residual, a, b = inits.olora(torch.tensor([[3.0, 1.0], [4.0, 2.0]]), 1, scale=1.0)
    torch.testing.assert_close(b.abs(), torch.tensor([[0.6], [0.8]]))  # Q's first column
    torch.testing.assert_close(residual + b @ a, torch.tensor([[3.0, 1.0], [4.0, 2.0]]))


# ------------------------------------------------------------------------------- LoftQ


def _peft_loftq_on_cpu():
    """PEFT's own `loftq_init`, with its hard-coded CUDA / XPU compute device set to the CPU."""
    source = inspect.getsource(peft_loftq_utils.loftq_init)
    line = 'compute_device = "xpu" if is_xpu_available() else "cuda"'
    assert line in source
    namespace = dict(vars(peft_loftq_utils))
    exec(compile(source.replace(line, 'compute_device = "cpu"'), "peft_loftq", "exec"), namespace)
    return namespace["loftq_init"]


@pytest.mark.parametrize(("bits", "steps"), [(4, 1), (4, 3), (8, 2)])
def test_loftq_matches_peft_and_beats_plain_quantization(bits, steps, llama):
    model, _, gm0 = llama
    original = model.model.layers[1].self_attn.q_proj.weight.detach().clone()
    qweight, lora_a, lora_b = _peft_loftq_on_cpu()(
        original, num_bits=bits, reduced_rank=4, num_iter=steps
    )
    gm = copy.deepcopy(gm0)
    cfg = LoraConfig(
        target_modules=["q_proj"],
        r=4,
        lora_alpha=4,  # scale 1: LoftQ's A, B ignore the scale (as PEFT's)
        init_lora_weights="loftq",
        loftq_config=LoftQConfig(loftq_bits=bits, loftq_iter=steps),
    )
    lora_fx.inject(gm, cfg)
    site = "model.layers.1.self_attn.q_proj"
    assert torch.equal(gm.get_parameter(f"{site}.weight"), qweight)
    assert torch.equal(gm.get_parameter(f"{site}.lora_A.default.weight"), lora_a)
    assert torch.equal(gm.get_parameter(f"{site}.lora_B.default.weight"), lora_b)
    approx = (qweight + lora_b @ lora_a - original).norm() / original.norm()
    quantized_only = (qweight - original).norm() / original.norm()
    assert approx < 0.9 * quantized_only


def test_loftq_then_quantize_stores_the_planned_codes_and_warns_on_scale(llama):
    _, ids, gm0 = llama
    gm = copy.deepcopy(gm0)
    cfg = LoraConfig(
        target_modules=["v_proj"],
        r=4,
        init_lora_weights="loftq",
        loftq_config={"loftq_bits": 4, "loftq_iter": 1},
    )
    with pytest.warns(UserWarning, match=r"LoftQ on .*: scale lora_alpha / r = 2"):
        lora_fx.inject(gm, cfg)
    site = "model.layers.0.self_attn.v_proj"
    planned = gm.get_parameter(f"{site}.weight").detach().clone()
    with torch.no_grad():
        before = gm(ids).logits
    lora_fx.quantize(gm, "nf4", target_modules=["v_proj"], compress_statistics=False)
    stored = gm.get_parameter(f"{site}.weight")
    assert quant.is_quantized(stored)
    assert torch.equal(quant.dequantize(stored), planned)  # re-quantizing W_q changes nothing
    with torch.no_grad():
        assert_close(gm(ids).logits, before)


# ------------------------------------------------------------------------------- loading, errors


def test_loading_a_pissa_adapter_does_not_run_pissa_again(tmp_path):
    torch.manual_seed(0)
    model, x = TinyMLP().eval(), torch.randn(4, 10)
    gm = lora_fx.capture(copy.deepcopy(model), (x,))
    lora_fx.inject(gm, LoraConfig(target_modules=["lin0"], r=4, init_lora_weights="pissa"))
    lora_fx.save_adapter(gm, tmp_path)
    residual = copy.deepcopy(gm)
    lora_fx.unload(residual)  # the residual model: what PiSSA users save as their new base
    loaded = lora_fx.load_adapter(residual, tmp_path)
    assert loaded.state_dict()["lin0.weight"].equal(gm.state_dict()["lin0.weight"])
    with torch.no_grad():
        assert_close(loaded(x), model(x))
    state = loaded.meta["lora_fx"]
    assert state.adapters["default"].config.init_lora_weights == "pissa"  # the file's config


def test_inits_name_the_site_they_cannot_handle():
    gm = lora_fx.capture(TinyConv().eval(), (torch.randn(1, 3, 6, 6),))
    with pytest.raises(
        UnsupportedSiteError, match=r"'pissa' needs a linear site; 'conv0' is a conv"
    ):
        lora_fx.inject(gm, LoraConfig(target_modules=["conv0"], init_lora_weights="pissa"))
    gm = lora_fx.capture(TinyMLP().eval(), (torch.randn(2, 10),))
    with pytest.raises(UnsupportedSiteError, match=r"site 'lin1' \(2x20\) has only 2, r=4"):
        lora_fx.inject(gm, LoraConfig(target_modules=["lin1"], r=4, init_lora_weights="olora"))
    with pytest.raises(UnsupportedSiteError, match=r"needs an even rank; site 'lin0' has r=3"):
        lora_fx.inject(gm, LoraConfig(target_modules=["lin0"], r=3, init_lora_weights="orthogonal"))
    lora_fx.quantize(gm, "nf4", target_modules=["lin0"])
    with pytest.raises(UnsupportedSiteError, match=r"full-precision weight of site 'lin0'"):
        lora_fx.inject(gm, LoraConfig(target_modules=["lin0"], r=4, init_lora_weights="pissa"))
