"""ONNX export of LoRA variants: merged folds (DoRA, KaSA, BD-LoRA, QALoRA), unmerged branches with
the variant's ops and named initializers (KaSA, BD-LoRA, QALoRA, DoRA, Arrow routers, aLoRA with
its `alora_offsets` input), each run in onnxruntime against torch; and the refusals left."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from conftest import assert_differs
from models import TinyMLP, tiny_llama

import lora_fx
from lora_fx import ArrowConfig, LoraConfig, MergeError, UnsupportedSiteError
from lora_fx.core.keys import is_adapter_parameter
from lora_fx.exporters import export_onnx, ort_session
from lora_fx.math.alora import alora_offsets
from lora_fx.sites.kinds import lora_paths

HF_KW = {"use_cache": False}
_FEATURES = (16, 32, 8)
_TARGETS = ["lin0", "lin1"]
# One LoraConfig field set per variant, on TinyMLP's lin0 (16 -> 32) and lin1 (32 -> 8).
VARIANTS = {
    "DoRA": {"use_dora": True},
    "KaSA": {"kasa_config": {}},
    "BD-LoRA": {
        "use_bdlora": {
            "target_modules_bd_a": ["lin0"],
            "target_modules_bd_b": ["lin1"],
            "nblocks": 2,
        }
    },
    "QALoRA": {"use_qalora": True, "qalora_group_size": 4},
}


@pytest.fixture(autouse=True, scope="module")
def _one_registry(one_onnx_registry):
    yield


def _randomise(gm):
    """Nonzero adapters everywhere (BD-LoRA's block-diagonal B starts at zero whatever the init)."""
    with torch.no_grad():
        for name, param in gm.named_parameters():
            if is_adapter_parameter(name):
                param.normal_(0.0, 0.3)


def _mlp(fields, r=4):
    x = torch.randn(2, 6, _FEATURES[0])
    gm = lora_fx.capture(TinyMLP(features=_FEATURES).eval(), (x,))
    base = _torch(gm, x)
    cfg = LoraConfig(r=r, target_modules=_TARGETS, init_lora_weights=False, **fields)
    lora_fx.inject(gm, cfg).eval()
    _randomise(gm)
    if "alora_invocation_tokens" in fields:  # row 0 adapted from position 3 on, row 1 not
        lora_fx.set_alora_offsets(gm, alora_offsets=[3, 0])
    assert_differs(_torch(gm, x), base)
    return gm, x


def _torch(gm, *args):
    with torch.no_grad():
        out = gm(*args)
    return out.logits if hasattr(out, "logits") else out


def _ort(export, feed):
    session = ort_session(export.path, device="cpu")
    return torch.from_numpy(session.run(None, feed)[0])


def _assert_matches(actual, expected):
    # The bound ONNX runtimes are held to here: 1e-5 absolute on logits (float32, CPU provider).
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)


def _initializers(path) -> set[str]:
    return {t.name for t in onnx.load(str(path), load_external_data=False).graph.initializer}


def _read(path) -> set[str]:
    graph = onnx.load(str(path), load_external_data=False).graph
    return {name for node in graph.node for name in node.input}


def _expected_names(gm, adapter="default"):
    """PEFT in-memory name -> file key of every tensor the adapter's branches read."""
    expected = {}
    for fqn, rec in gm.meta["lora_fx"].adapters[adapter].sites.items():
        paths = lora_paths(rec.kind, fqn, adapter)
        expected |= {paths.a: paths.a_key, paths.b: paths.b_key}
        if rec.use_kasa:
            expected[paths.diag] = paths.diag_key
        if rec.use_dora:
            expected[paths.magnitude] = paths.magnitude_key
    return expected


# ---- merged: the fold, nothing variant-specific in the file ------------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_merged_variant_is_the_base_graph_with_folded_weights(variant, tmp_path):
    x = torch.randn(2, 6, _FEATURES[0])
    gm = lora_fx.capture(TinyMLP(features=_FEATURES).eval(), (x,))
    base = export_onnx(gm, (x,), tmp_path / "base.onnx")
    gm, x = _mlp(VARIANTS[variant])

    out = export_onnx(gm, (x,), tmp_path / "merged.onnx")

    assert out.lora_tensors == {} and out.op_counts == base.op_counts
    assert not [n for n in _initializers(out.path) if ".lora_" in n]
    _assert_matches(_ort(out, {"x": x.numpy()}), _torch(gm, x))


def test_merged_dora_folds_first_and_only_once_per_site(tmp_path):
    gm, x = _mlp({})  # "default": plain LoRA, then DoRA adapters on the same sites
    for name in ("d", "e"):
        cfg = LoraConfig(r=2, target_modules=_TARGETS, init_lora_weights=False, use_dora=True)
        lora_fx.inject(gm, cfg, name)
    lora_fx.set_adapter(gm, ["default", "d"])
    out = export_onnx(gm, (x,), tmp_path / "merged.onnx")  # DoRA folds before the plain delta
    _assert_matches(_ort(out, {"x": x.numpy()}), _torch(gm.eval(), x))
    lora_fx.set_adapter(gm, ["d", "e"])
    with pytest.raises(MergeError, match=r"'lin0' would fold 2 DoRA adapters \['d', 'e'\]"):
        export_onnx(gm, (x,), tmp_path / "two.onnx")
    assert not (tmp_path / "two.onnx").exists()


# ---- unmerged ("initializers"): the variant's ops, its tensors named ---------------------------


@pytest.mark.parametrize(
    ("variant", "ops"),
    [("DoRA", {"ReduceL2"}), ("KaSA", set()), ("BD-LoRA", {"Einsum"}), ("QALoRA", {"ReduceMean"})],
)
def test_unmerged_variant_keeps_its_ops_and_named_tensors(variant, ops, tmp_path):
    gm, x = _mlp(VARIANTS[variant])

    out = export_onnx(gm, (x,), tmp_path / "lora.onnx", merged=False)

    expected = _expected_names(gm)
    assert out.lora_tensors == expected
    assert set(expected) <= _initializers(out.path) & _read(out.path)
    assert ops <= set(out.op_counts)
    _assert_matches(_ort(out, {"x": x.numpy()}), _torch(gm, x))


def test_kasa_diag_is_a_named_initializer_with_peft_key(tmp_path):
    gm, x = _mlp(VARIANTS["KaSA"])
    out = export_onnx(gm, (x,), tmp_path / "kasa.onnx", merged=False)
    assert out.lora_tensors["lin0.lora_diag.default"] == "base_model.model.lin0.lora_diag"
    diag = next(
        t for t in onnx.load(str(out.path)).graph.initializer if t.name == "lin0.lora_diag.default"
    )
    assert np.array_equal(onnx.numpy_helper.to_array(diag), gm.get_parameter(diag.name).detach())


def test_llama_kasa_merged_and_unmerged_match_torch_at_other_sizes(tmp_path):
    ids, other = torch.randint(0, 256, (2, 8)), torch.randint(0, 256, (3, 5))
    gm = lora_fx.capture(tiny_llama().eval(), (ids,), HF_KW)  # dynamic batch and length
    base = _torch(gm, ids)
    cfg = LoraConfig(
        r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False, kasa_config={}
    )
    lora_fx.inject(gm, cfg).eval()
    assert_differs(_torch(gm, ids), base)

    merged = export_onnx(gm, (ids,), tmp_path / "merged.onnx")
    unmerged = export_onnx(gm, (ids,), tmp_path / "lora.onnx", merged=False)

    assert "model.layers.1.self_attn.v_proj.lora_diag.default" in unmerged.lora_tensors
    assert set(_expected_names(gm)) <= _initializers(unmerged.path)
    for out in (merged, unmerged):
        for feed in (ids, other):
            _assert_matches(_ort(out, {"input_ids": feed.numpy()}), _torch(gm, feed))


# ---- Arrow routers -----------------------------------------------------------------------------


def _router(gm, targets, experts=3, top_k=2):
    for i in range(experts):
        cfg = LoraConfig(r=4, target_modules=targets, init_lora_weights=False)
        lora_fx.inject(gm, cfg, f"task_{i}")
    arrow = ArrowConfig(top_k=top_k, router_temperature=0.7)
    lora_fx.inject(gm, LoraConfig(r=4, target_modules=targets, arrow_config=arrow), "arrow_router")
    lora_fx.set_adapter(gm, "arrow_router")
    return gm.eval()


def _arrow_names(gm, experts):
    names = {}
    for fqn in gm.meta["lora_fx"].adapters["arrow_router"].sites:
        for expert in experts:
            names |= _expected_names(gm, expert)
        names[f"{fqn}.lora_arrow.arrow_router.prototypes"] = None
    return names


def test_arrow_router_exports_its_routing_with_experts_and_prototypes(tmp_path):
    x = torch.randn(2, 6, _FEATURES[0])
    gm = lora_fx.capture(TinyMLP(features=_FEATURES).eval(), (x,))
    base = _torch(gm, x)
    _router(gm, _TARGETS)
    assert_differs(_torch(gm, x), base)

    out = export_onnx(gm, (x,), tmp_path / "arrow.onnx", merged=False)

    names = _arrow_names(gm, ["task_0", "task_1", "task_2"])
    assert out.lora_tensors == {k: v for k, v in names.items() if v is not None}
    assert set(names) <= _initializers(out.path) & _read(out.path)
    assert {"Abs", "TopK", "Softmax"} <= set(out.op_counts)
    _assert_matches(_ort(out, {"x": x.numpy()}), _torch(gm, x))


def test_llama_arrow_router_matches_torch_at_other_sizes(tmp_path):
    ids, other = torch.randint(0, 256, (2, 8)), torch.randint(0, 256, (3, 5))
    gm = _router(lora_fx.capture(tiny_llama().eval(), (ids,), HF_KW), ["q_proj", "v_proj"], 2, 1)
    out = export_onnx(gm, (ids,), tmp_path / "arrow.onnx", merged=False)
    assert set(_arrow_names(gm, ["task_0", "task_1"])) <= _initializers(out.path)
    for feed in (ids, other):
        _assert_matches(_ort(out, {"input_ids": feed.numpy()}), _torch(gm, feed))


# ---- aLoRA: the offsets are a graph input -----------------------------------------------------


def test_alora_offsets_are_an_input_set_per_run(tmp_path):
    gm, x = _mlp({"alora_invocation_tokens": [1, 2]})
    out = export_onnx(gm, (x,), tmp_path / "alora.onnx", merged=False)

    assert out.inputs == ("x", "alora_offsets")
    assert set(_expected_names(gm)) <= _initializers(out.path)
    outputs = []
    for offsets in ([3, 0], [6, 1], [0, 0]):
        lora_fx.set_alora_offsets(gm, alora_offsets=offsets)
        feed = {"x": x.numpy(), "alora_offsets": np.asarray(offsets, dtype=np.int64)}
        outputs.append(_ort(out, feed))
        _assert_matches(outputs[-1], _torch(gm, x))
    assert_differs(outputs[0], outputs[2])  # the offsets steer the file


def test_two_alora_adapters_get_an_offsets_input_each(tmp_path):
    gm, x = _mlp({"alora_invocation_tokens": [1, 2]})
    cfg = LoraConfig(
        r=2, target_modules=["lin1"], init_lora_weights=False, alora_invocation_tokens=[3]
    )
    lora_fx.inject(gm, cfg, "other")
    lora_fx.set_adapter(gm, ["default", "other"])
    lora_fx.set_alora_offsets(gm, alora_offsets=[2, 5])
    out = export_onnx(gm, (x,), tmp_path / "two.onnx", merged=False)
    assert out.inputs == ("x", "alora_offsets_default", "alora_offsets_other")
    offsets = np.asarray([2, 5], dtype=np.int64)
    feed = {"x": x.numpy(), "alora_offsets_default": offsets, "alora_offsets_other": offsets}
    _assert_matches(_ort(out, feed), _torch(gm, x))


def test_llama_alora_offsets_from_the_ids_match_torch(tmp_path):
    ids = torch.randint(10, 256, (2, 8))
    gm = lora_fx.capture(tiny_llama().eval(), (ids,), HF_KW)
    cfg = LoraConfig(
        r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
        alora_invocation_tokens=[7, 9],
    )  # fmt: skip
    lora_fx.inject(gm, cfg).eval()
    out = export_onnx(gm, (ids,), tmp_path / "alora.onnx", merged=False)

    batch = torch.randint(10, 256, (3, 5))  # another batch size and length than the capture's
    batch[0, 1:3] = torch.tensor([7, 9])
    batch[2, 3:5] = torch.tensor([7, 9])
    offsets = alora_offsets(batch, [7, 9])
    assert offsets.tolist() == [4, 0, 2]
    lora_fx.set_alora_offsets(gm, batch)
    feed = {"input_ids": batch.numpy(), "alora_offsets": offsets.numpy()}
    _assert_matches(_ort(out, feed), _torch(gm, batch))


# ---- what is still refused -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "args", "match"),
    [
        (
            {"alora_invocation_tokens": [1, 2]},
            {},
            r"is aLoRA at 'lin0', which cannot be merged .* input 'alora_offsets'.*merged=False",
        ),
        (
            {"alora_invocation_tokens": [1, 2]},
            {"merged": False, "lora_layout": "stacked"},
            r"has aLoRA at 'lin0'; lora_layout='stacked' .* lora_layout='initializers'$",
        ),
        (
            VARIANTS["KaSA"],
            {"merged": False, "lora_layout": "inputs"},
            r"has KaSA at 'lin0'; lora_layout='inputs'.*'initializers' or merged=True",
        ),
        (
            VARIANTS["BD-LoRA"],
            {"merged": False, "lora_layout": "stacked"},
            r"has BD-LoRA at 'lin0';.*'initializers' or merged=True",
        ),
    ],
)
def test_refusals_name_the_variant_and_write_nothing(fields, args, match, tmp_path):
    gm, x = _mlp(fields)
    path = tmp_path / "refused.onnx"
    with pytest.raises(UnsupportedSiteError, match=match):
        export_onnx(gm, (x,), path, **args)
    assert list(tmp_path.iterdir()) == []


def test_arrow_router_refuses_merged_export(tmp_path):
    x = torch.randn(2, 6, _FEATURES[0])
    gm = _router(lora_fx.capture(TinyMLP(features=_FEATURES).eval(), (x,)), _TARGETS)
    with pytest.raises(UnsupportedSiteError, match="Arrow router at 'lin0'.*merged=False"):
        export_onnx(gm, (x,), tmp_path / "merged.onnx")
    assert list(tmp_path.iterdir()) == []


def test_with_past_decoder_refuses_alora(tmp_path):
    gm = lora_fx.capture_for_generation(tiny_llama().eval(), max_batch_size=2, max_cache_len=16)
    cfg = LoraConfig(r=4, target_modules=["q_proj"], alora_invocation_tokens=[7, 9])
    lora_fx.inject(gm, cfg)
    with pytest.raises(
        UnsupportedSiteError, match="with_past=True decoders have no 'alora_offsets'"
    ):
        export_onnx(gm, None, tmp_path / "decoder.onnx", merged=False, with_past=True)
    assert list(tmp_path.iterdir()) == []
