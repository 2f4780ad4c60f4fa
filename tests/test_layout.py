"""Branch layouts (`set_layout`): "auto" (default), "fused", "plain", "weight" compute the same
outputs and gradients, save the same adapter, survive adapter switching / merging, compile and
export to ONNX. "auto" takes the fused branch or the merged weight per call (`weight_pays`).
PEFT is the oracle for the default layout on a direct linear -> linear chain."""

from __future__ import annotations

import copy

import onnxruntime as ort
import pytest
import torch
from conftest import assert_close, assert_differs
from helpers import lora_roles
from models import TinyEmbedding, TinyMLP, tiny_gpt2, tiny_llama
from safetensors.torch import load_file
from torch import nn

import lora_fx
from lora_fx import AdapterError, LoraConfig
from lora_fx.exporters import export_onnx
from lora_fx.math import fused_ops
from lora_fx.math.fused_ops import (
    add_lora,
    add_lora_for_tokens,
    add_low_rank,
    low_rank_weight,
    weight_for_tokens,
    weight_pays,
)

HF_KW = {"use_cache": False}


def _cfg(targets, r=4, dropout=0.0, **kw):
    return LoraConfig(
        r=r,
        lora_alpha=8,
        target_modules=targets,
        lora_dropout=dropout,
        init_lora_weights=False,
        **kw,
    )


def _logits(out):
    return out.logits if hasattr(out, "logits") else out["logits"] if isinstance(out, dict) else out


MODELS = {
    "mlp-fx": (lambda: TinyMLP(), lambda: torch.randn(4, 10), ["lin0", "lin1"], "fx", {}),
    "mlp-export": (lambda: TinyMLP(), lambda: torch.randn(4, 10), ["lin0", "lin1"], "export", {}),
    "embedding": (
        lambda: TinyEmbedding(),
        lambda: torch.randint(0, 100, (2, 5)),
        ["emb", "lin0"],
        "export",
        {},
    ),
    "gpt2": (
        lambda: tiny_gpt2(),
        lambda: torch.randint(0, 256, (2, 8)),
        ["c_attn", "c_proj", "c_fc"],
        "export",
        HF_KW,
    ),
    "llama": (
        lambda: tiny_llama(),
        lambda: torch.randint(0, 256, (2, 8)),
        "all-linear",
        "export",
        HF_KW,
    ),
}


_CAPTURED: dict = {}


def _captured(case):
    """The captured base graph, its input and output, once per case (capture costs seconds)."""
    if case not in _CAPTURED:
        make_model, make_x, _, method, kw = MODELS[case]
        model, x = make_model().eval(), make_x()
        gm0 = lora_fx.capture(model, (x,), kw, method=method)
        _CAPTURED[case] = (gm0, x, _logits(gm0(x)).detach())
    return _CAPTURED[case]


def _graphs(case):
    """One injected graph per layout, all holding the same adapter values."""
    targets = MODELS[case][2]
    gm0, x, base = _captured(case)
    plain = lora_fx.set_layout(lora_fx.inject(copy.deepcopy(gm0), _cfg(targets)), "plain")
    graphs = {"plain": plain}
    for layout in ("auto", "fused", "weight"):
        gm = lora_fx.inject(copy.deepcopy(gm0), _cfg(targets))
        gm.load_state_dict(plain.state_dict())
        graphs[layout] = lora_fx.set_layout(gm, layout)
    return graphs, x, base


@pytest.mark.parametrize("case", list(MODELS))
def test_layouts_give_equal_outputs_and_gradients(case):
    graphs, x, base = _graphs(case)
    outs, grads = {}, {}
    for layout, gm in graphs.items():
        gm.eval()  # the base models' own dropout off; autograd still runs
        out = _logits(gm(x))
        out.float().pow(2).mean().backward()
        outs[layout] = out.detach()
        grads[layout] = {n: p.grad.clone() for n, p in lora_fx.trainable_parameters(gm).items()}
    assert_differs(outs["plain"], base)
    for layout in ("auto", "fused", "weight"):
        assert_close(outs[layout], outs["plain"])
        assert grads[layout].keys() == grads["plain"].keys()
        for name, grad in grads["plain"].items():
            assert grad.abs().max() > 0, name
            torch.testing.assert_close(grads[layout][name], grad, atol=1e-5, rtol=1e-4)


def test_default_layout_is_auto_and_sites_have_no_separate_scale_or_add():
    graphs, _, _ = _graphs("llama")
    roles = lora_roles(graphs["fused"])
    assert roles["scale"] == roles["lora_a"] == roles["lora_b"] == 0
    assert roles["add"] == 14  # 2 layers x 7 linears, one fused node each
    assert lora_roles(graphs["plain"])["scale"] == 14
    # "weight": each site op reads W + scale * B @ A
    weight_nodes = [n for n in graphs["weight"].graph.nodes if n.target is low_rank_weight]
    assert len(weight_nodes) == 14
    # "auto": each site op reads weight_for_tokens, its output goes through add_lora_for_tokens
    auto = graphs["auto"].graph.nodes
    assert sum(n.target is weight_for_tokens for n in auto) == 14
    assert sum(n.target is add_lora_for_tokens for n in auto) == 14
    assert lora_roles(graphs["auto"])["add"] == 28
    fresh = lora_fx.inject(lora_fx.capture(TinyMLP().eval(), (torch.randn(2, 10),)), _cfg(["lin0"]))
    assert lora_fx.get_layout(fresh) == "auto"


@pytest.mark.parametrize("case", ["mlp-export", "gpt2", "llama"])
def test_auto_layout_takes_either_path_per_call_with_the_same_outputs(case, monkeypatch):
    """Forced to each side of the threshold, "auto" runs that path and gives the same logits."""
    graphs, x, _ = _graphs(case)
    gm, plain = graphs["auto"].eval(), graphs["plain"].eval()
    calls = {"weight": 0}
    real_low_rank_weight = fused_ops.low_rank_weight

    def counting(*args):
        calls["weight"] += 1
        return real_low_rank_weight(*args)

    monkeypatch.setattr(fused_ops, "low_rank_weight", counting)
    with torch.no_grad():
        expected = _logits(plain(x))
        for factor, weight_calls in ((0.0, len(_auto_weight_nodes(gm))), (float("inf"), 0)):
            monkeypatch.setattr(fused_ops, "WEIGHT_PAYS_FACTOR", factor)
            calls["weight"] = 0
            assert_close(_logits(gm(x)), expected)
            assert calls["weight"] == weight_calls, factor
    # Training calls never take the weight, whatever the tokens.
    monkeypatch.setattr(fused_ops, "WEIGHT_PAYS_FACTOR", 0.0)
    calls["weight"] = 0
    out = _logits(gm(x))
    out.float().pow(2).mean().backward()
    assert calls["weight"] == 0
    assert all(p.grad is not None for p in lora_fx.trainable_parameters(gm).values())
    assert_close(out.detach(), expected)


def _auto_weight_nodes(gm):
    return [n for n in gm.graph.nodes if n.target is weight_for_tokens]


def test_weight_pays_by_tokens_and_never_under_autograd():
    a, b = torch.randn(8, 256), torch.randn(256, 8)
    factor = fused_ops.WEIGHT_PAYS_FACTOR
    crossover = factor * 256 * 256 / (256 + 256)  # tokens from which the merged weight pays
    with torch.no_grad():
        assert not weight_pays(torch.randn(1, 1, 256), a, b)  # a decode step
        assert not weight_pays(torch.randn(1, int(crossover) - 1, 256), a, b)
        assert weight_pays(torch.randn(2, int(crossover), 256), a, b)
    big = torch.randn(4, 4 * int(crossover), 256)
    assert weight_pays(big, a, b)  # nothing requires grad: inference
    assert not weight_pays(big, a.requires_grad_(), b)
    with torch.no_grad():
        assert weight_pays(big, a, b)


def test_saved_adapter_is_the_same_in_every_layout(tmp_path):
    graphs, _, _ = _graphs("gpt2")
    files = {}
    for layout, gm in graphs.items():
        lora_fx.save_adapter(gm, tmp_path / layout)
        files[layout] = load_file(tmp_path / layout / "adapter_model.safetensors")
    for layout in ("auto", "fused", "weight"):
        assert files[layout].keys() == files["plain"].keys()
        for key, tensor in files["plain"].items():
            assert torch.equal(files[layout][key], tensor), key


def test_weight_layout_falls_back_where_it_cannot_apply():
    model, x = TinyMLP().eval(), torch.randn(4, 10)
    # call_module sites (symbolic_trace) have no weight argument to rewrite: fused instead
    gm = lora_fx.set_layout(
        lora_fx.inject(lora_fx.capture(model, (x,), method="fx"), _cfg(["lin0"])), "weight"
    )
    assert not any(n.target is low_rank_weight for n in gm.graph.nodes)
    assert any(n.target is add_lora for n in gm.graph.nodes)
    # dropout > 0 acts on x only: the delta cannot move onto W
    gm = lora_fx.inject(lora_fx.capture(model, (x,)), _cfg(["lin0", "lin1"], dropout=0.1))
    lora_fx.set_layout(gm, "weight")
    assert lora_roles(gm)["dropout"] == 2
    assert not any(n.target is low_rank_weight for n in gm.graph.nodes)
    # DoRA and lora_bias keep the plain branch
    gm = lora_fx.inject(lora_fx.capture(model, (x,)), _cfg(["lin0"], use_dora=True))
    assert lora_roles(gm)["scale"] == 1


def test_layout_survives_switching_merging_and_unloading():
    model, x = tiny_llama(), torch.randint(0, 256, (2, 8))
    gm = lora_fx.capture(model.eval(), (x,), HF_KW)
    lora_fx.inject(gm, _cfg("all-linear"))
    lora_fx.inject(gm, _cfg(["q_proj", "v_proj"]), "other")
    reference = copy.deepcopy(gm)
    lora_fx.set_layout(reference, "plain")
    lora_fx.set_layout(gm, "weight")
    for step in (
        lambda g: lora_fx.set_adapter(g, ["default", "other"]),
        lambda g: lora_fx.merge(g, ["other"]),
        lambda g: lora_fx.unmerge(g),
        lambda g: lora_fx.set_adapter(g, "other"),
    ):
        step(gm)
        step(reference)
        assert lora_fx.get_layout(gm) == "weight"
        assert_close(_logits(gm(x)), _logits(reference(x)))
    merged = lora_fx.merge_and_unload(gm)
    assert not any(n.target is low_rank_weight for n in merged.graph.nodes)
    assert_close(_logits(merged(x)), _logits(lora_fx.merge_and_unload(reference)(x)))


def test_direct_linear_chain_matches_peft_with_two_adapters():
    """lin_b reads lin_a's output directly: its branch must see lin_a's adapted output."""
    from peft import LoraConfig as PeftConfig
    from peft import get_peft_model

    class Chain(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin_a = nn.Linear(8, 8)
            self.lin_b = nn.Linear(8, 8)

        def forward(self, x):
            return self.lin_b(self.lin_a(x))

    x = torch.randn(3, 8)
    peft_cfg = PeftConfig(
        r=2, lora_alpha=8, target_modules=["lin_a", "lin_b"], init_lora_weights=False
    )
    pm = get_peft_model(copy.deepcopy(Chain().eval()), peft_cfg)
    pm.add_adapter("second", peft_cfg)
    pm.base_model.set_adapter(["default", "second"])
    expected = pm(x)
    for layout in ("fused", "plain", "weight"):
        base = copy.deepcopy(pm.base_model.model)
        for module in base.modules():  # keep only the base Linear layers, with PEFT's weights
            for name, child in list(module.named_children()):
                if hasattr(child, "base_layer"):
                    setattr(module, name, child.base_layer)
        gm = lora_fx.capture(base, (x,))
        lora_fx.inject(gm, _cfg(["lin_a", "lin_b"], r=2))
        lora_fx.inject(gm, _cfg(["lin_a", "lin_b"], r=2), "second")
        lora_fx.set_layout(gm, layout)
        state = pm.state_dict()
        for name, tensor in gm.state_dict().items():
            if "lora_" in name:
                key = "base_model.model." + name
                tensor.copy_(state[key])
        lora_fx.set_adapter(gm, ["default", "second"])
        assert_close(gm(x), expected)


@pytest.mark.parametrize("layout", ["auto", "fused", "weight"])
def test_compiled_fullgraph_matches_eager(layout):
    graphs, x, _ = _graphs("llama")
    gm = graphs[layout]
    compiled = torch.compile(gm, fullgraph=True, backend="aot_eager")
    gm.eval()
    eager = _logits(gm(x))
    eager.pow(2).mean().backward()
    eager_grads = {n: p.grad.clone() for n, p in lora_fx.trainable_parameters(gm).items()}
    for p in lora_fx.trainable_parameters(gm).values():
        p.grad = None
    out = _logits(compiled(x))
    out.pow(2).mean().backward()
    assert_close(out, eager)
    for name, p in lora_fx.trainable_parameters(gm).items():
        torch.testing.assert_close(p.grad, eager_grads[name], atol=1e-5, rtol=1e-4)
    with torch.no_grad():  # inference: "auto" takes the merged weight at this many tokens
        assert_close(_logits(compiled(x)), eager.detach())


def test_compiled_auto_layout_takes_the_weight_for_long_inputs(monkeypatch):
    graphs, x, _ = _graphs("llama")
    gm = graphs["auto"].eval()
    monkeypatch.setattr(fused_ops, "WEIGHT_PAYS_FACTOR", 0.0)  # every inference call pays
    seen = []
    real = fused_ops.low_rank_weight
    monkeypatch.setattr(fused_ops, "low_rank_weight", lambda *a: seen.append(1) or real(*a))
    compiled = torch.compile(gm, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        expected = _logits(graphs["plain"].eval()(x))
        assert_close(_logits(compiled(x)), expected)
    assert seen  # traced through the weight path


@pytest.mark.parametrize("layout", ["auto", "fused", "weight"])
def test_onnx_export_carries_the_layout(layout, tmp_path):
    graphs, x, _ = _graphs("llama")
    gm = graphs[layout].eval()
    export_onnx(gm, (x,), tmp_path / "m.onnx", merged=False)
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    got = torch.from_numpy(session.run(None, {name: x.numpy()})[0])
    with torch.no_grad():
        assert_close(got, _logits(gm(x)), dtype=torch.float32)


def test_fused_ops_match_their_formulas():
    y, x = torch.randn(2, 3, 6), torch.randn(2, 3, 5)
    a, b = torch.randn(4, 5), torch.randn(6, 4)
    expected = y + 0.5 * (x @ a.t()) @ b.t()
    assert_close(add_lora(y.clone(), x, a, b, 0.5), expected)
    assert_close(add_low_rank(y.clone(), x @ a.t(), b, 0.5), expected)
    w = torch.randn(6, 5)
    assert_close(low_rank_weight(w, a, b, 0.5, False), w + 0.5 * b @ a)
    assert_close(low_rank_weight(w.t(), a, b, 0.5, True), (w + 0.5 * b @ a).t())


@pytest.mark.parametrize(
    "needs",
    [
        (True, True, True, True),
        (False, True, True, True),
        (False, False, True, True),
        (True, True, False, True),
        (True, True, True, False),
    ],
    ids=["all", "frozen-y", "frozen-y-x", "frozen-a", "frozen-b"],
)
def test_fused_op_gradients_match_their_formula(needs):
    """Eager training runs `_AddLowRank`'s hand-written backward: check it against autograd."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(2, 3, 6), (2, 3, 5), (4, 5), (6, 4)]
    tensors = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    inputs = [t.requires_grad_(n) for t, n in zip(tensors, needs, strict=True)]
    assert torch.autograd.gradcheck(lambda *t: add_lora(*t, 0.5), inputs)
    y, x, a, b = inputs
    low = (x @ a.t()).reshape(-1, 4)
    assert torch.autograd.gradcheck(lambda *t: add_low_rank(*t, 0.5), (y, low, b))


def _backward_gemm_shapes(fn, *inputs):
    """Output shapes of the matrix products autograd runs for `fn(*inputs).sum().backward()`."""
    from torch.utils._python_dispatch import TorchDispatchMode

    aten, shapes = torch.ops.aten, []

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func in (aten.mm.default, aten.addmm.default):
                shapes.append(tuple(out.shape))
            return out

    out = fn(*inputs).sum()
    with Recorder():
        out.backward()
    return shapes


def test_fused_training_gemms_put_the_rank_on_rows_and_save_no_more_than_plain():
    """Rank-column GEMMs (`grad @ B`, `grad.T @ low`) run 1.4-4.9x slower than their transposes on
    CPU; the fused layout's backward has none, and saves no more than PEFT's op order."""
    torch.manual_seed(0)
    r, tokens, d_in, d_out = 3, 16, 10, 7
    x, y = torch.randn(tokens, d_in, requires_grad=True), torch.randn(tokens, d_out)
    a = torch.randn(r, d_in, requires_grad=True)
    b = torch.randn(d_out, r, requires_grad=True)
    shapes = _backward_gemm_shapes(lambda *t: add_lora(*t, 0.5), y, x, a, b)
    # grad of low [r, tokens], of B [r, out], of A [r, in], of x [tokens, in] (inner dim r)
    assert sorted(shapes) == sorted([(r, tokens), (r, d_out), (r, d_in), (tokens, d_in)])

    model, ids = tiny_llama(), torch.randint(0, 256, (2, 16))
    saved = {}
    for layout in ("plain", "fused"):
        gm = lora_fx.capture(copy.deepcopy(model), (ids,), HF_KW)
        lora_fx.inject(gm, _cfg("all-linear"))
        lora_fx.set_layout(gm, layout)
        gm.train()
        storages = {p.untyped_storage().data_ptr() for p in gm.parameters()}
        kept = {}

        def pack(t, storages=storages, kept=kept):
            if t.untyped_storage().data_ptr() not in storages:
                kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            gm(ids).logits.sum().backward()
        saved[layout] = sum(kept.values())
    assert 0 < saved["fused"] <= saved["plain"], saved


def test_bad_layout_is_refused_and_graph_unchanged():
    gm = lora_fx.inject(lora_fx.capture(TinyMLP().eval(), (torch.randn(2, 10),)), _cfg(["lin0"]))
    code = gm.code
    with pytest.raises(
        ValueError,
        match=r"layout='fast' is invalid; expected one of \['auto', 'fused', 'plain', 'weight'\]",
    ):
        lora_fx.set_layout(gm, "fast")
    assert gm.code == code and lora_fx.get_layout(gm) == "auto"
    bare = lora_fx.capture(TinyMLP().eval(), (torch.randn(2, 10),))
    with pytest.raises(AdapterError, match="no LoRA adapter"):
        lora_fx.set_layout(bare, "plain")


def test_auto_layout_exports_with_a_dynamic_token_count(monkeypatch):
    """torch.export of an "auto" graph takes the branch: no guard pins the token count."""
    traced_weights = []
    real = fused_ops.low_rank_weight
    monkeypatch.setattr(
        fused_ops, "low_rank_weight", lambda *a: traced_weights.append(1) or real(*a)
    )
    x = torch.randn(4, 10)
    dynamic = ({0: torch.export.Dim("batch", min=1, max=4096)},)
    gm0 = lora_fx.capture(TinyMLP().eval(), (x,), dynamic_shapes=dynamic)
    gm = lora_fx.inject(gm0, _cfg(["lin0", "lin1"])).eval()
    with torch.no_grad():
        exported = torch.export.export(gm, (x,), dynamic_shapes=dynamic)
        big = torch.randn(2048, 10)  # past the threshold: eager "auto" takes the weight here
        assert fused_ops.weight_pays(
            big, gm.lin0.lora_A.default.weight, gm.lin0.lora_B.default.weight
        )
        assert not traced_weights  # the export traced the branch only
        assert_close(exported.module()(big), gm(big))
        assert traced_weights  # while eager "auto" took the weight for 2048 rows
