"""QLoRA: LoRA on bitsandbytes bases (NF4 / FP4 with and without double quant, int8).

Two ways to a quantized graph, both checked against PEFT on the same quantized model
(`models.bnb_copy`: the float model with its nn.Linear layers swapped for bitsandbytes ones):
1. `capture(bnb_model, method="fx")`: bitsandbytes linears are leaf `call_module` sites;
2. `quantize(capture(float_model))`: the pass that swaps the base matmuls for bitsandbytes ops.

Every test runs on both of bitsandbytes' CPU paths for `Linear4bit` (the `cpu_path` fixture):
"packed", what CPUs with AVX512-BF16 do in eval (weight packed in place, bfloat16 compute), and
"plain", what the others do (`lora_fx/quant.py` lists the rules).
"""

from __future__ import annotations

import copy
import gc
import subprocess
import sys
import warnings
import weakref

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import peft
import pytest
import safetensors.torch
import torch
from conftest import assert_close, assert_differs
from helpers import assert_no_lora, lora_roles
from models import TinyConv, TinyMLP, bnb_copy, tiny_gpt2, tiny_llama

import lora_fx
from lora_fx import ConfigError, LoraConfig, UnsupportedSiteError
from lora_fx.math import quant

pytestmark = [
    pytest.mark.filterwarnings("ignore:MatMul8bitLt. inputs will be cast:UserWarning"),
    pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)`:FutureWarning"),
    pytest.mark.filterwarnings("ignore:Merge lora module to:UserWarning"),
]
_QUANT = [("nf4", True), ("nf4", False), ("fp4", True), ("int8", False)]
_QUANT_IDS = ["nf4-double", "nf4", "fp4-double", "int8"]
_MLP_CFG = {"target_modules": ["lin0", "lin1"], "r": 4, "lora_alpha": 8}
# TinyMLP features whose layers bitsandbytes can pack: out % 32 == 0 and in % blocksize (64) == 0.
# TinyMLP's own (10 -> 20 -> 2) break both rules.
_PACKABLE = (64, 64, 32)


@pytest.fixture(autouse=True, params=["plain", "packed"])
def cpu_path(request, monkeypatch):
    """Force bitsandbytes' CPU path for every `Linear4bit` a test builds (the references too).

    `Linear4bit.__init__` stores `has_avx512bf16()` in `support_avx512bf16_for_cpu`; patching the
    name it reads picks the path on any CPU. Only the packed kernel needs the hardware.
    """
    packed = request.param == "packed"
    if not hasattr(bnb.nn.modules, "has_avx512bf16"):
        if packed:
            pytest.skip(f"bitsandbytes {bnb.__version__} has no packed CPU path")
        return request.param
    if packed and not bnbf.has_avx512bf16():
        pytest.skip("bitsandbytes' packed CPU kernel (gemv_4bit) needs a CPU with AVX512-BF16")
    monkeypatch.setattr(bnb.nn.modules, "has_avx512bf16", lambda: packed)
    return request.param


def _reference_dtype(cpu_path, quant_type="nf4"):
    """The tolerance row for comparing with a bitsandbytes module's eval output.

    On the packed path a 4-bit module computes in bfloat16 (input, absmax and output rounded; up to
    7e-3 from float32 here); lora_fx's graphs compute in float32 on both paths. int8 has one path.
    """
    packed = cpu_path == "packed" and quant_type != "int8"
    return torch.bfloat16 if packed else torch.float32


def _quantized_graph(model, x, quant_type, double, **kwargs):
    gm = lora_fx.capture(copy.deepcopy(model), (x,), kwargs or None)
    return lora_fx.quantize(gm, quant_type, compress_statistics=double)


def _on_plain_path(model):
    """`model` with its `Linear4bit`s on bitsandbytes' plain CPU path, as on CPUs without
    AVX512-BF16: for references bitsandbytes or PEFT cannot compute on the packed one."""
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    return model


def _peft(bnb_model, cfg, folder, **extra):
    pm = peft.get_peft_model(
        copy.deepcopy(bnb_model), peft.LoraConfig(**cfg, init_lora_weights=False, **extra)
    ).eval()
    pm.save_pretrained(folder)
    return pm


# ------------------------------------------------------------------------------- the quantize pass


@pytest.mark.parametrize(("quant_type", "double"), _QUANT, ids=_QUANT_IDS)
def test_quantize_pass_matches_bitsandbytes_modules(quant_type, double, cpu_path):
    torch.manual_seed(0)
    model, x = TinyMLP(features=_PACKABLE).eval(), torch.randn(4, 64)
    reference = bnb_copy(model, quant_type, compress_statistics=double)
    gm = _quantized_graph(model, x, quant_type, double)
    gm.graph.lint()
    ops = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    op = quant.linear_8bit if quant_type == "int8" else quant.linear_4bit
    assert ops.count(op) == 2 and torch.ops.aten.linear.default not in ops
    for name in ("lin0", "lin1"):
        ours, theirs = gm.get_parameter(f"{name}.weight"), getattr(reference, name).weight
        assert quant.quant_type(ours) == quant_type
        assert torch.equal(ours.data, theirs.data)  # the same codes, bit for bit
    with torch.no_grad():
        ours, theirs = gm(x), reference(x)
    packed = _reference_dtype(cpu_path, quant_type) == torch.bfloat16
    assert quant.is_packed(reference.lin0.weight) == packed  # bitsandbytes took that path
    if packed:  # bitsandbytes computes in bfloat16 there, the quantize pass in float32
        assert_close(ours, theirs, torch.bfloat16)
    else:
        assert torch.equal(ours, theirs)


def test_base_weights_take_four_bits_and_float_weights_are_freed():
    torch.manual_seed(0)
    model, ids = tiny_llama(), torch.randint(0, 256, (1, 8))
    gm = lora_fx.capture(model, (ids,), {"use_cache": False})
    float_weight = weakref.ref(model.model.layers[0].mlp.up_proj.weight)
    del model
    lora_fx.quantize(gm, "nf4")  # double quant, block 64
    gc.collect()
    assert float_weight() is None  # the graph keeps only the 4-bit codes
    quantized = [p for p in gm.parameters() if quant.is_quantized(p)]
    assert len(quantized) == 14  # 2 layers x 7 linears; lm_head (output layer) stays
    for p in quantized:
        n = torch.Size(quant.logical_shape(p)).numel()
        assert p.data.dtype == torch.uint8 and p.data.numel() * 8 == 4 * n  # 4-bit codes
        blocks = n // 64
        # per 64 weights an 8-bit absmax; per 256 blocks a float32 scale; per weight the NF4 and
        # absmax code books (16 + 256 float32) and a float32 offset
        overhead = blocks + 4 * -(-blocks // 256) + 4 * (16 + 256 + 1)
        assert quant.storage_bytes(p) == p.data.numel() + overhead


def test_quantize_gpt2_addmm_sites_transposes_to_out_in():
    torch.manual_seed(0)
    model, ids = tiny_gpt2().eval(), torch.randint(0, 256, (2, 8))
    gm = _quantized_graph(model, ids, "nf4", True, use_cache=False)
    weight = gm.get_parameter("transformer.h.0.attn.c_attn.weight")
    assert quant.logical_shape(weight) == (96, 32)  # Conv1D stores [32, 96]
    lora_fx.inject(gm, LoraConfig(target_modules=["c_attn"], r=4, init_lora_weights=False))
    assert "transformer.h.0.attn.c_attn.lora_A.default.weight" in dict(gm.named_parameters())
    with torch.no_grad():
        out = gm(ids).logits
        assert_differs(out, model(ids).logits, min_diff=1e-2)
    lora_fx.merge_and_unload(gm, dequantize=True)
    assert_no_lora(gm)
    with torch.no_grad():
        assert_close(gm(ids).logits, out)


# ------------------------------------------------------------------------------- PEFT parity


@pytest.mark.parametrize(("quant_type", "double"), _QUANT, ids=_QUANT_IDS)
@pytest.mark.parametrize("route", ["fx-bnb-modules", "quantize-pass"])
def test_peft_parity_on_the_same_quantized_model(quant_type, double, route, cpu_path, tmp_path):
    torch.manual_seed(0)
    model, x = TinyMLP(features=_PACKABLE).eval(), torch.randn(4, 64)
    bnb_model = bnb_copy(model, quant_type, compress_statistics=double)
    pm = _peft(bnb_model, _MLP_CFG, tmp_path / "peft")
    # PEFT merges with `dequantize_4bit`, which misreads a packed weight: merge before eval packs
    peft_merged = copy.deepcopy(pm).merge_and_unload()
    tol = _reference_dtype(cpu_path, quant_type)
    with torch.no_grad():
        expected, base = pm(x), bnb_model(x)
    assert_differs(expected, base)
    if route == "fx-bnb-modules":
        gm = lora_fx.capture(copy.deepcopy(bnb_model), (x,), method="fx")
    else:
        gm = _quantized_graph(model, x, quant_type, double)
    lora_fx.load_adapter(gm, tmp_path / "peft")
    with torch.no_grad():
        assert_close(gm(x), expected, tol)
    assert lora_fx.count_parameters(gm) == pm.get_nb_trainable_parameters()
    assert gm.get_parameter("lin0.lora_A.default.weight").dtype == torch.float32

    lora_fx.save_adapter(gm, tmp_path / "ours")
    files = [tmp_path / d / "adapter_model.safetensors" for d in ("ours", "peft")]
    assert set(safetensors.torch.load_file(str(files[0]))) == set(
        safetensors.torch.load_file(str(files[1]))
    )
    pm2 = peft.PeftModel.from_pretrained(copy.deepcopy(bnb_model), tmp_path / "ours").eval()
    with torch.no_grad():
        assert_close(pm2(x), expected)  # the same bitsandbytes path as `expected`

    # merge into the quantized base: dequantize, add, re-quantize, as PEFT
    codes = {n: gm.get_parameter(f"{n}.weight").data.clone() for n in ("lin0", "lin1")}
    with pytest.warns(UserWarning, match=r"merge re-quantized 2 quantized base weights"):
        lora_fx.merge(gm)
    assert all(v > 0 for v in lora_fx.merge_report(gm).values())
    with torch.no_grad():
        assert_close(gm(x), peft_merged(x), tol)
    lora_fx.unmerge(gm)  # the last merge on each site: restored bit for bit
    for name, data in codes.items():
        assert torch.equal(gm.get_parameter(f"{name}.weight").data, data)
    with torch.no_grad():
        assert_close(gm(x), expected, tol)


def test_dora_on_a_quantized_base_matches_peft(tmp_path):
    torch.manual_seed(0)
    model, x = TinyMLP().eval(), torch.randn(4, 10)
    bnb_model = bnb_copy(model, "nf4")
    pm = _peft(bnb_model, _MLP_CFG, tmp_path, use_dora=True)
    # PEFT's DoRA reads the base weight with `dequantize_4bit`, which misreads a packed weight
    _on_plain_path(pm)
    gm = lora_fx.load_adapter(_quantized_graph(model, x, "nf4", True), tmp_path)
    assert lora_roles(gm)["dora"] > 0
    with torch.no_grad():
        assert_close(gm(x), pm(x))
    lora_fx.merge_and_unload(gm, dequantize=True)
    with torch.no_grad():
        assert_close(gm(x), pm(x))


# ------------------------------------------------------------------------------- training, merging


@pytest.mark.parametrize("quant_type", ["nf4", "int8"])
def test_training_step_reaches_lora_only(quant_type):
    torch.manual_seed(0)
    model, x = TinyMLP().eval(), torch.randn(8, 10)
    gm = _quantized_graph(model, x, quant_type, True)
    lora_fx.inject(gm, LoraConfig(**_MLP_CFG, lora_dropout=0.1)).train()
    packed = {n: p.data.clone() for n, p in gm.named_parameters() if quant.is_quantized(p)}
    trainable = lora_fx.trainable_parameters(gm)
    assert trainable and all(".lora_" in n for n in trainable)
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-2)
    losses = []
    for _ in range(3):
        loss = gm(x).exp().mul(torch.arange(2.0)).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for name, param in gm.named_parameters():
        assert (param.grad is not None) == (name in trainable), name
    for name, data in packed.items():  # frozen 4-bit codes
        assert torch.equal(gm.get_parameter(name).data, data)


@pytest.mark.parametrize("layout", lora_fx.LAYOUTS)
@pytest.mark.parametrize("quant_type", ["nf4", "int8"])
def test_llama_training_gradients_match_peft(tmp_path, quant_type, layout):
    """Every layout trains on 4-bit and int8 bases. The first layer's sites are the hard case:
    the quantized op's output needs no grad while B does (an in-place accumulate there failed
    on int8, whose output is a view made inside a custom autograd Function)."""
    torch.manual_seed(0)
    model, ids = tiny_llama(), torch.randint(0, 256, (2, 16))
    cfg = {"target_modules": "all-linear", "r": 4, "lora_alpha": 8}
    pm = _peft(bnb_copy(model, quant_type), cfg, tmp_path)
    pm.train()
    pm(ids).logits.square().mean().backward()
    expected = {
        n.removeprefix("base_model.model.").replace(".default", ""): p.grad
        for n, p in pm.named_parameters()
        if p.grad is not None
    }

    gm = lora_fx.capture(copy.deepcopy(model), (ids,), {"use_cache": False})
    lora_fx.quantize(gm, quant_type)
    lora_fx.load_adapter(gm, tmp_path)
    lora_fx.set_layout(gm, layout)
    gm.train()
    gm(ids).logits.square().mean().backward()
    grads = {
        n.replace(".default", ""): p.grad for n, p in gm.named_parameters() if p.grad is not None
    }
    assert grads.keys() == expected.keys() and len(grads) == 28
    for name, grad in grads.items():
        assert grad.abs().max() > 0, name
        if quant_type == "int8":
            # int8 quantizes the activations per row at run time: the last-bit differences of
            # a captured graph's inputs flip some roundings (loss agrees to 1.5e-4 relative).
            error = (grad - expected[name]).norm() / expected[name].norm()
            assert error < 0.05, (name, error.item())
        else:
            assert_close(grad, expected[name])


def test_merge_and_unload_dequantize_is_exact_and_leaves_no_bitsandbytes_op():
    torch.manual_seed(0)
    model, x = TinyMLP().eval(), torch.randn(4, 10)
    gm = _quantized_graph(model, x, "nf4", True)
    lora_fx.inject(gm, LoraConfig(**_MLP_CFG, init_lora_weights=False))
    with torch.no_grad():
        expected = gm(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no re-quantization warning on this path
        lora_fx.merge_and_unload(gm, dequantize=True)
    assert_no_lora(gm)
    targets = {n.target for n in gm.graph.nodes}
    assert quant.linear_4bit not in targets and torch.ops.aten.linear.default in targets
    assert not any(quant.is_quantized(p) for p in gm.parameters())
    assert gm.get_parameter("lin0.weight").dtype == torch.float32
    with torch.no_grad():
        assert_close(gm(x), expected)


def test_llama_with_4bit_base_end_to_end(tmp_path, cpu_path):
    torch.manual_seed(0)
    model, ids = tiny_llama(), torch.randint(0, 256, (2, 16))
    cfg = {"target_modules": "all-linear", "r": 4, "lora_alpha": 8}
    pm = _peft(bnb_copy(model, "nf4"), cfg, tmp_path / "peft")
    with torch.no_grad():
        expected = pm(ids).logits
    up = pm.base_model.model.model.layers[0].mlp.up_proj.base_layer
    assert quant.is_packed(up.weight) == (cpu_path == "packed")  # its layers all can be packed
    tol = _reference_dtype(cpu_path)  # packed: 3e-3 from float32 on these logits

    gm = lora_fx.capture(copy.deepcopy(model), (ids,), {"use_cache": False})
    lora_fx.quantize(gm, "nf4")
    lora_fx.load_adapter(gm, tmp_path / "peft")
    with torch.no_grad():
        assert_close(gm(ids).logits, expected, tol)

    gm.train()
    optimizer = torch.optim.AdamW(lora_fx.trainable_parameters(gm).values(), lr=1e-3)
    loss = gm(ids).logits.square().mean()
    loss.backward()
    optimizer.step()
    grads = {n for n, p in gm.named_parameters() if p.grad is not None}
    assert grads == set(lora_fx.trainable_parameters(gm)) and len(grads) == 28
    gm.eval()
    lora_fx.save_adapter(gm, tmp_path / "ours")
    with torch.no_grad():
        trained = gm(ids).logits
    pm2 = peft.PeftModel.from_pretrained(bnb_copy(model, "nf4"), tmp_path / "ours").eval()
    with torch.no_grad():
        assert_close(pm2(ids).logits, trained, tol)
    lora_fx.merge_and_unload(gm, dequantize=True)
    assert_no_lora(gm)
    with torch.no_grad():
        assert_close(gm(ids).logits, trained)


# ------------------------------------------------------------------------------- bad input


def test_unsupported_quant_type_lists_the_supported_ones():
    gm = lora_fx.capture(TinyMLP().eval(), (torch.randn(2, 10),))
    with pytest.raises(ConfigError, match=r"quant_type='int4' is not supported; supported: "):
        lora_fx.quantize(gm, "int4")


def test_quantize_refuses_conv_and_tied_sites_by_name():
    gm = lora_fx.capture(TinyConv().eval(), (torch.randn(1, 3, 6, 6),))
    with pytest.raises(UnsupportedSiteError, match=r"'conv0' is a conv site"):
        lora_fx.quantize(gm, target_modules=["conv0", "lin0"])
    gm = lora_fx.capture(tiny_gpt2().eval(), (torch.randint(0, 256, (1, 4)),), {"use_cache": False})
    code = gm.code
    with pytest.raises(UnsupportedSiteError, match=r"site 'lm_head' shares its weight"):
        lora_fx.quantize(gm, target_modules=["lm_head"])
    assert gm.code == code


def test_a_quantized_site_of_another_kind_says_what_is_supported():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4, bias=False))  # an int8 weight, not bnb's
    model[0].weight = torch.nn.Parameter(
        torch.randint(-8, 8, (4, 4), dtype=torch.int8), requires_grad=False
    )
    gm = lora_fx.capture(model, (torch.randn(1, 4),), method="fx")
    with pytest.raises(
        UnsupportedSiteError, match=r"site '0' has a torch.int8 weight .* supported"
    ):
        lora_fx.inject(gm, LoraConfig(target_modules=["0"]))
    embedding = torch.nn.Sequential(bnb.nn.Embedding4bit(10, 64))
    gm = lora_fx.capture(embedding, (torch.randint(0, 10, (1, 3)),), method="fx")
    with pytest.raises(UnsupportedSiteError, match=r"embedding site with a 'fp4' quantized weight"):
        lora_fx.inject(gm, LoraConfig(target_modules=["0"]))


def test_lora_bias_on_a_quantized_base_folds_the_scaled_bias(tmp_path, cpu_path):
    # PEFT's bitsandbytes layers add b_B unscaled on merge (its float layers scale it): with
    # alpha / r = 4 PEFT's merged model is far from its unmerged one; lora_fx's is not.
    torch.manual_seed(0)
    model, x = TinyMLP(features=_PACKABLE).eval(), torch.randn(4, 64)
    cfg = {**_MLP_CFG, "lora_alpha": 16, "lora_bias": True}
    bnb_model = bnb_copy(model, "nf4")
    pm = peft.get_peft_model(
        copy.deepcopy(bnb_model), peft.LoraConfig(**cfg, init_lora_weights=False)
    ).eval()
    with torch.no_grad():
        for name, param in pm.named_parameters():
            if name.endswith("lora_B.default.bias"):
                param.normal_()
    pm.save_pretrained(tmp_path)
    peft_merged_model = copy.deepcopy(pm).merge_and_unload()  # before eval packs (see parity)
    tol = _reference_dtype(cpu_path)
    gm = lora_fx.load_adapter(_quantized_graph(model, x, "nf4", True), tmp_path)
    with torch.no_grad():
        expected = pm(x)
        assert_close(gm(x), expected, tol)
        peft_merged = peft_merged_model(x)
    assert (peft_merged - expected).abs().max() > 1.0  # PEFT's defect
    lora_fx.merge_and_unload(gm, dequantize=True)
    with torch.no_grad():
        assert_close(gm(x), expected, tol)


# ------------------------------------------------------------------------------- bitsandbytes' CPU paths


@pytest.mark.parametrize("route", ["fx-bnb-modules", "quantize-pass"])
def test_layers_bitsandbytes_cannot_pack_work_in_eval_and_training(route, cpu_path, tmp_path):
    """TinyMLP's layers (out 20 and 2, in 10) break the packed layout's rules: on the packed path
    bitsandbytes' own module fails in eval. lora_fx's graphs (its own copy of the module, or the
    quantize pass's op) compute them on the plain path, in float32, on both paths."""
    torch.manual_seed(0)
    model, x = TinyMLP().eval(), torch.randn(4, 10)
    bnb_model = bnb_copy(model, "nf4")
    if cpu_path == "packed":  # the old failure: capture(method="fx") ran this module as it is
        with torch.no_grad(), pytest.raises(AssertionError, match="divisible by block_n"):
            copy.deepcopy(bnb_model)(x)
    pm = _on_plain_path(_peft(bnb_model, _MLP_CFG, tmp_path))  # the path bitsandbytes can serve
    with torch.no_grad():
        expected = pm(x)
    if route == "fx-bnb-modules":
        gm = lora_fx.capture(copy.deepcopy(bnb_model), (x,), method="fx")
    else:
        gm = _quantized_graph(model, x, "nf4", True)
    lora_fx.load_adapter(gm, tmp_path).eval()
    with torch.no_grad():
        assert_close(gm(x), expected)
    assert not any(quant.is_packed(p) for p in gm.parameters())
    gm.train()
    gm(x).exp().mul(torch.arange(2.0)).sum().backward()
    assert all(p.grad is not None for p in lora_fx.trainable_parameters(gm).values())


def test_a_weight_the_users_module_packed_is_read_merged_and_trained_exactly(cpu_path):
    """The graph shares the user's `Params4bit`s; on the packed path the user's own module packs
    them in eval (on the plain path the test packs them with the function that forward calls).
    lora_fx reads a packed weight exactly and leaves it packed, merges into it as into the same
    weight unpacked, restores it on unmerge, and its graph unpacks it before computing, so
    training keeps its gradients (bitsandbytes' packed kernel has no backward)."""
    torch.manual_seed(0)
    model, x = TinyMLP(features=_PACKABLE).eval(), torch.randn(4, 64)
    bnb_model = bnb_copy(model, "nf4")
    gm = lora_fx.capture(bnb_model, (x,), method="fx")  # shares bnb_model's weights
    lora_fx.inject(gm, LoraConfig(**_MLP_CFG, init_lora_weights=False))
    assert gm.lin0 is not bnb_model.lin0 and not bnb_model.lin0._forward_pre_hooks
    assert bnb_model.lin0.support_avx512bf16_for_cpu == (cpu_path == "packed")  # left as it was
    weights = [bnb_model.lin0.weight, bnb_model.lin1.weight]
    assert gm.get_parameter("lin0.weight") is weights[0]
    values = [quant.dequantize(w) for w in weights]
    if cpu_path == "packed":
        with torch.no_grad():
            bnb_model(x)
    else:
        for w in weights:
            w.data, w.quant_state = bnbf._convert_weight_packed_for_cpu(w.data, w.quant_state)
    for w, value in zip(weights, values, strict=True):
        assert quant.is_packed(w) and quant.logical_dtype(w) == torch.float32
        # packing rounds each block's absmax to bfloat16 (relative error <= 2**-9)
        torch.testing.assert_close(quant.dequantize(w), value, rtol=2**-8, atol=0)
        assert quant.is_packed(w)  # read without unpacking
        blocks = value.numel() // 64  # a bfloat16 absmax per block, the 16-entry NF4 code book
        assert quant.storage_bytes(w) == value.numel() // 2 + 2 * blocks + 4 * 16

    twin = copy.deepcopy(gm)
    assert all(quant.unpack_(twin.get_parameter(f"{n}.weight")) for n in ("lin0", "lin1"))
    codes = [w.data.clone() for w in weights]
    with pytest.warns(UserWarning, match="re-quantized"):
        lora_fx.merge(gm)
        lora_fx.merge(twin)
    for name in ("lin0", "lin1"):
        merged, expected = gm.get_parameter(f"{name}.weight"), twin.get_parameter(f"{name}.weight")
        assert not quant.is_packed(merged) and torch.equal(merged.data, expected.data)
    lora_fx.unmerge(gm)
    for w, data in zip(weights, codes, strict=True):
        assert quant.is_packed(w) and torch.equal(w.data, data)  # restored bit for bit

    gm.train()
    gm(x).square().sum().backward()
    assert not any(quant.is_packed(w) for w in weights)  # the graph unpacked them first
    grads = [p.grad for p in lora_fx.trainable_parameters(gm).values()]
    assert len(grads) == 4 and all(g is not None and g.abs().max() > 0 for g in grads)


def test_importing_bitsandbytes_through_lora_fx_hides_the_kernel_hub_warning():
    # bitsandbytes logs it at import on AVX512-BF16 CPUs without the optional `kernels` package
    code = "import lora_fx.math.quant as q; q.requires_bitsandbytes()"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "kernels-community" not in result.stderr + result.stdout
