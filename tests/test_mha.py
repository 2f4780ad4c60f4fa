"""`nn.MultiheadAttention` sites against PEFT (PEFT's ModelMha cases), both capture methods.

PEFT 0.21.2 adds the out-projection delta twice (peft#3774): its `merge` writes `W + dW` into
`out_proj.weight` and then calls `out_proj.merge`, which adds `dW` again; its forward merges the same
way. lora_fx adds it once, so the oracle is PEFT with the out-projection's B halved (which gives
`W + dW` through PEFT's own code); `test_peft_adds_the_out_projection_delta_twice` pins the quirk.
"""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from conftest import assert_close, assert_differs
from helpers import lora_adds, lora_roles
from models import TinyMha
from torch import nn

import lora_fx
from lora_fx import LoraConfig, UnsupportedSiteError
from lora_fx.exporters import export_onnx, ort_run_options, ort_session, write_ort_adapter
from lora_fx.sites import all_sites

METHODS = ("fx", "export")
_OUT_B = "base_model.model.mha.base_layer.out_proj.lora_B.default.weight"
# torch's pytree warns when `copy.deepcopy` rebuilds the LeafSpec of a captured graph's signature.
pytestmark = pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)`:FutureWarning")


def _x(batch_first: bool = False) -> torch.Tensor:
    return torch.randn(4, 3, 10) if batch_first else torch.randn(3, 4, 10)


def _peft(model: nn.Module, **cfg) -> peft.PeftModel:
    config = peft.LoraConfig(init_lora_weights=False, **cfg)
    return peft.get_peft_model(copy.deepcopy(model), config).eval()


def _once(pm: peft.PeftModel) -> peft.PeftModel:
    """PEFT with its out-projection B halved: PEFT's double count gives `W + dW` (module doc)."""
    fixed = copy.deepcopy(pm)
    with torch.no_grad():
        dict(fixed.named_parameters())[_OUT_B].mul_(0.5)
    return fixed


def _manual(model: nn.Module, pm: peft.PeftModel) -> nn.Module:
    """The base model with `W + scale * B @ A` written into both projections by hand."""
    merged, mha = copy.deepcopy(model), pm.base_model.model.mha
    out = mha.base_layer.out_proj
    with torch.no_grad():
        merged.mha.in_proj_weight += mha.get_delta_weight("default")
        merged.mha.out_proj.weight += out.get_delta_weight("default")
    return merged


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("targets", [["mha"], ["mha", "lin0"]], ids=["mha", "mha+lin0"])
def test_peft_adapter_loads_and_matches_peft(method, batch_first, targets, tmp_path):
    model, x = TinyMha(batch_first).eval(), _x(batch_first)
    pm = _peft(model, target_modules=targets, r=4, lora_alpha=8)
    pm.save_pretrained(tmp_path / "peft")
    with torch.no_grad():
        want, base = _once(pm)(x), model(x)
        assert_close(_manual(model, pm)(x) if targets == ["mha"] else want, want)
    assert_differs(want, base)

    gm = lora_fx.load_adapter(
        lora_fx.capture(copy.deepcopy(model), (x,), method=method), tmp_path / "peft"
    )
    gm.graph.lint()
    assert lora_adds(gm) == len(targets) + 1  # in- and out-projection, lin0
    with torch.no_grad():
        assert_close(gm(x), want)
    assert lora_fx.count_parameters(gm) == pm.get_nb_trainable_parameters()

    # lora_fx -> PEFT: the same keys, and PEFT's outputs from lora_fx's file (PEFT counts out twice)
    lora_fx.save_adapter(gm, tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "ours").eval()
    assert set(back.state_dict()) == set(pm.state_dict())
    with torch.no_grad():
        assert_close(_once(back)(x), gm(x))

    y = gm(x)
    lora_fx.merge(gm)
    assert_close(gm(x), y)
    lora_fx.unmerge(gm)
    assert_close(gm(x), y)
    lora_fx.merge_and_unload(gm)
    assert lora_roles(gm) == {}
    with torch.no_grad():
        merged_peft = _once(pm).merge_and_unload()
        assert_close(gm(x), merged_peft(x))
        assert_close(gm.mha.in_proj_weight, merged_peft.mha.in_proj_weight)


def test_peft_adds_the_out_projection_delta_twice():
    """PEFT 0.21.2's quirk (peft#3774); when this fails, PEFT was fixed: drop `_once`."""
    model, x = TinyMha().eval(), _x()
    pm = _peft(model, target_modules=["mha"], r=4)
    with torch.no_grad():
        assert_differs(pm(x), _manual(model, pm)(x))
        doubled = copy.deepcopy(pm)
        dict(doubled.named_parameters())[_OUT_B].mul_(2.0)  # B twice -> dW counted 4 times
        assert_close(_once(doubled)(x), pm(x))


@pytest.mark.parametrize("method", METHODS)
def test_the_packed_projection_has_peft_shapes_names_and_gradients(method):
    x = _x()
    gm = lora_fx.capture(TinyMha().eval(), (x,), method=method)
    sites = all_sites(gm)
    assert "mha.in_proj_weight" not in sites  # the packed weight is the MHA's, not a linear site
    lora_fx.inject(gm, LoraConfig(target_modules=["mha"], r=4, init_lora_weights=False))
    shapes = {n: tuple(p.shape) for n, p in lora_fx.trainable_parameters(gm).items()}
    assert shapes == {
        "mha.lora_A.default.weight": (4, 10),
        "mha.lora_B.default.weight": (30, 4),
        "mha.base_layer.out_proj.lora_A.default.weight": (4, 10),
        "mha.base_layer.out_proj.lora_B.default.weight": (10, 4),
    }
    gm.train()
    gm(x).sum().backward()
    assert all(p.grad is not None for p in lora_fx.trainable_parameters(gm).values())
    assert gm.mha.in_proj_weight.grad is None


@pytest.mark.parametrize("method", METHODS)
def test_compiled_graph_matches_eager(method):
    x = _x()
    gm = lora_fx.capture(TinyMha().eval(), (x,), method=method)
    lora_fx.inject(gm, LoraConfig(target_modules=["mha", "lin0"], init_lora_weights=False))
    compiled = torch.compile(gm, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        assert_close(compiled(x), gm(x))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("targets", ["out_proj", "all-linear"])
def test_out_proj_alone_is_applied_as_in_peft_merged_model(method, targets, tmp_path):
    """PEFT's unmerged forward ignores a LoRA on MHA's out_proj alone; its merged model has it."""
    model, x = TinyMha().eval(), _x()
    cfg = {"target_modules": [targets] if targets == "out_proj" else targets, "r": 4}
    pm = _peft(model, **cfg)
    pm.save_pretrained(tmp_path)
    with torch.no_grad():
        unmerged, merged = pm(x), copy.deepcopy(pm).merge_and_unload()(x)
        if targets == "out_proj":
            assert_close(unmerged, model(x))  # PEFT's unmerged forward: no LoRA at all
        assert_differs(merged, unmerged)

    gm = lora_fx.capture(copy.deepcopy(model), (x,), method=method)
    lora_fx.load_adapter(gm, tmp_path)
    assert set(gm.meta["lora_fx"].adapters["default"].sites) >= {"mha.out_proj"}
    with torch.no_grad():
        assert_close(gm(x), merged)
        assert_close(lora_fx.merge_and_unload(gm)(x), merged)


@pytest.mark.parametrize("method", METHODS)
def test_onnx_merged_and_unmerged_match_torch(method, tmp_path):
    x = _x()
    gm = lora_fx.capture(TinyMha().eval(), (x,), method=method)
    lora_fx.inject(gm, LoraConfig(target_modules=["mha", "lin0"], init_lora_weights=False))
    with torch.no_grad():
        want = gm(x)
    for merged in (True, False):
        out = export_onnx(gm, (x,), tmp_path / f"{merged}.onnx", merged=merged)
        got = ort_session(out.path, device="cpu").run(None, {out.inputs[0]: x.numpy()})[0]
        assert_close(torch.from_numpy(got), want)
    # ONNX Runtime adapters: A and B are inputs of the file, fed from an adapter file
    out = export_onnx(gm, (x,), tmp_path / "in.onnx", merged=False, lora_layout="inputs")
    write_ort_adapter(gm, tmp_path / "a.onnx_adapter", model=out.path)
    session = ort_session(out.path, device="cpu")
    options = ort_run_options(tmp_path / "a.onnx_adapter")
    assert_close(torch.from_numpy(session.run(None, {out.inputs[0]: x.numpy()}, options)[0]), want)
    with pytest.raises(UnsupportedSiteError, match=r"site 'mha' \(attention site\).*'stacked'"):
        export_onnx(gm, (x,), tmp_path / "s.onnx", merged=False, lora_layout="stacked")


# ---- bad input --------------------------------------------------------------------------------


class _SeparateKV(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(10, 2, kdim=6, vdim=6)

    def forward(self, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        return self.mha(q, kv, kv)[0]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        ({"use_dora": True}, r"use_dora=True is not supported on attention site 'mha'"),
        ({"lora_bias": True}, r"lora_bias=True is not supported on attention site 'mha'"),
        ({"init_lora_weights": "pissa"}, r"'pissa' is not supported on attention site 'mha'"),
    ],
)
def test_what_the_kind_cannot_carry_is_refused_and_the_graph_is_unchanged(method, cfg, message):
    x = _x()
    gm = lora_fx.capture(TinyMha().eval(), (x,), method=method)
    code, params = gm.code, dict(gm.named_parameters())
    with pytest.raises(UnsupportedSiteError, match=message):
        lora_fx.inject(gm, LoraConfig(target_modules=["mha", "lin0"], **cfg))
    assert gm.code == code and dict(gm.named_parameters()) == params
    assert "lora_fx" not in gm.meta


def test_peft_refuses_dora_on_mha_too():
    with pytest.raises(ValueError, match="does not support DoRA"):
        _peft(TinyMha(), target_modules=["mha"], use_dora=True)


@pytest.mark.parametrize("method", METHODS)
def test_separate_qkv_weights_are_refused_by_name(method):
    q, kv = torch.randn(3, 2, 10), torch.randn(5, 2, 6)
    with pytest.raises(ValueError, match="Only same embed"):  # PEFT refuses the same MHA
        _peft(_SeparateKV(), target_modules=["mha"])
    gm = lora_fx.capture(_SeparateKV().eval(), (q, kv), method=method)
    with pytest.raises(UnsupportedSiteError, match=r"'mha' has separate q/k/v weights"):
        lora_fx.inject(gm, LoraConfig(target_modules=["mha"]))
    if method == "export":  # its out_proj is a linear site (fx keeps such an MHA a leaf)
        lora_fx.inject(gm, LoraConfig(target_modules=["out_proj"]))


def test_a_leaf_mha_call_is_refused_by_name():
    gm = torch.fx.symbolic_trace(TinyMha().eval())  # traced elsewhere: MHA stays a leaf
    with pytest.raises(UnsupportedSiteError, match=r"'mha' is a leaf call_module.*lora_fx.capture"):
        lora_fx.inject(gm, LoraConfig(target_modules=["mha"]))


def test_dropout_is_not_applied_and_says_so():
    x = _x()
    gm = lora_fx.capture(TinyMha().eval(), (x,), method="fx")
    with pytest.warns(UserWarning, match=r"lora_dropout=0.5 is not applied on attention site"):
        lora_fx.inject(
            gm, LoraConfig(target_modules=["mha"], lora_dropout=0.5, init_lora_weights=False)
        )
    gm.train()
    torch.testing.assert_close(gm(x), gm(x))  # no dropout in the adapter (attention p is 0)


def test_mixed_batches_are_refused_by_name():
    x = _x()
    gm = lora_fx.capture(TinyMha().eval(), (x,), method="fx")
    lora_fx.inject(gm, LoraConfig(target_modules=["mha"], init_lora_weights=False), "a")
    lora_fx.inject(gm, LoraConfig(target_modules=["mha"], init_lora_weights=False), "b")
    code = gm.code
    with pytest.raises(ValueError, match=r"'mha'.*attention site"):
        lora_fx.set_adapter_batch(gm, ["a", "b", "a", "b"])
    assert gm.code == code
