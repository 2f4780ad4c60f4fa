"""All-or-nothing passes: a pass that raises midway leaves the graph, its state and weights as they were.

Failures are forced inside the apply phase (after the checks passed), where a pass has already
registered modules, changed the state record or written weights.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import warnings

import pytest
import torch
from conftest import assert_close, assert_differs
from models import TinyBlockStack, TinyMLP, tiny_llama

import lora_fx
from lora_fx import LoraConfig
from lora_fx.core.state import STATE_META
from lora_fx.passes import _fold, adapters

# The modules, not the functions `lora_fx.passes` re-exports under the same names.
inject = importlib.import_module("lora_fx.passes.inject")


class _Boom(RuntimeError):
    pass


def _fingerprint(gm: torch.fx.GraphModule) -> dict:
    """Everything a failed pass must leave unchanged: code, state, tree, flags and values."""
    state = gm.meta.get(STATE_META)
    return {
        "code": gm.code,
        "nodes": [(n.name, n.op, str(n.target)) for n in gm.graph.nodes],
        "state": None if state is None else _fields(state),
        "meta_keys": sorted(gm.meta),
        "modules": [name for name, _ in gm.named_modules(remove_duplicate=False)],
        "params": [
            (name, p.requires_grad, p.data_ptr(), p.detach().clone())
            for name, p in gm.named_parameters(remove_duplicate=False)
        ],
        "buffers": [name for name, _ in gm.named_buffers(remove_duplicate=False)],
    }


def _fields(state) -> dict:
    """The state's fields, sets sorted (a restored set may iterate in another order)."""
    values = {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}
    return {k: sorted(v) if isinstance(v, set) else repr(v) for k, v in values.items()}


def _assert_same(before: dict, after: dict) -> None:
    for key in ("code", "nodes", "state", "meta_keys", "modules", "buffers"):
        assert before[key] == after[key], key
    assert [p[:3] for p in before["params"]] == [p[:3] for p in after["params"]]
    for (name, *_, value), (_, *_, now) in zip(before["params"], after["params"], strict=True):
        assert torch.equal(value, now), name


def _fail_on_call(monkeypatch, module, name: str, call: int = 2):
    """Make `module.name` raise on its `call`-th call (the earlier calls run as usual)."""
    original, calls = getattr(module, name), []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise _Boom(f"{name} failed on purpose")
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, failing)


def _mlp_graph():
    model, x = TinyMLP().eval(), torch.randn(4, 10)
    return lora_fx.capture(model, (x,)), x


# ------------------------------------------------------------------------------- inject (issue 15.9)


@pytest.mark.parametrize("failing", ["add_magnitude", "init_from_base", "_add_module_copy"])
def test_inject_failing_in_its_apply_loop_changes_nothing(monkeypatch, failing):
    gm, x = _mlp_graph()
    lora_fx.inject(gm, LoraConfig(target_modules=["lin1"], init_lora_weights=False), "first")
    before, out = _fingerprint(gm), gm(x)
    _fail_on_call(monkeypatch, inject, failing, call=1 if failing == "_add_module_copy" else 2)
    copies = failing == "_add_module_copy"
    cfg = LoraConfig(
        target_modules=["lin0"] if copies else ["lin0", "lin1"], r=2, use_dora=True,
        init_lora_weights="pissa", modules_to_save=["lin1"] if copies else None,
    )  # fmt: skip
    with pytest.raises(_Boom):
        lora_fx.inject(gm, cfg, "second")
    _assert_same(before, _fingerprint(gm))  # PiSSA rewrote lin0's weight before lin1 failed
    assert torch.equal(gm(x), out)
    monkeypatch.undo()
    lora_fx.inject(gm, cfg, "second")  # the same call works once nothing fails
    assert lora_fx.active_adapters(gm) == ["first"]


def test_inject_failing_after_layer_replication_takes_the_replication_back(monkeypatch):
    model, x = TinyBlockStack().eval(), torch.randint(0, 50, (2, 4))
    gm = lora_fx.capture(model, (x,))
    before = _fingerprint(gm)
    _fail_on_call(monkeypatch, inject, "_add_lora_modules", call=3)
    cfg = LoraConfig(target_modules=["attn"], layer_replication=[[0, 2], [1, 3]])
    with pytest.raises(_Boom):
        lora_fx.inject(gm, cfg)
    _assert_same(before, _fingerprint(gm))
    assert "lora_fx_replication" not in gm.meta
    monkeypatch.undo()
    lora_fx.inject(gm, cfg)
    assert len(list(gm.get_submodule("layers").children())) == 4


def test_load_adapter_failing_while_writing_restores_the_slot(monkeypatch, tmp_path):
    gm, x = _mlp_graph()
    lora_fx.inject(gm, LoraConfig(target_modules=["lin0"], init_lora_weights=False))
    lora_fx.save_adapter(gm, tmp_path)
    with torch.no_grad():
        for p in lora_fx.trainable_parameters(gm).values():
            p.mul_(3)  # the slot now differs from the file
    before = _fingerprint(gm)
    original_copy, writes = torch.Tensor.copy_, []

    def failing_copy(self, src, *args, **kwargs):
        writes.append(1)
        if len(writes) == 2:
            raise _Boom("write failed on purpose")
        return original_copy(self, src, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "copy_", failing_copy)
    with pytest.raises(_Boom):
        lora_fx.load_adapter(gm, tmp_path)
    monkeypatch.undo()
    _assert_same(before, _fingerprint(gm))


# ---------------------------------------------------------------------- delete_adapter (issue 15.7)


def test_delete_the_last_adapter_with_modules_to_save_gives_the_base_graph():
    gm, x = _mlp_graph()
    base = gm(x)
    cfg = LoraConfig(target_modules=["lin0"], modules_to_save=["lin1"], init_lora_weights=False)
    lora_fx.inject(gm, cfg)
    with torch.no_grad():
        gm.get_submodule("lin1.modules_to_save.default").weight.add_(1.0)
    assert_differs(gm(x), base)
    lora_fx.delete_adapter(gm, "default")
    gm.graph.lint()
    assert lora_fx.active_adapters(gm) == []
    assert not [n for n in gm.graph.nodes if "modules_to_save" in str(n.target)]
    assert not hasattr(gm.get_submodule("lin1"), "modules_to_save")
    assert_close(gm(x), base)


def test_delete_adapter_failing_midway_changes_nothing(monkeypatch):
    gm, x = _mlp_graph()
    cfg = LoraConfig(target_modules=["lin0"], modules_to_save=["lin1"], init_lora_weights=False)
    lora_fx.inject(gm, cfg)
    before, out = _fingerprint(gm), gm(x)
    _fail_on_call(monkeypatch, adapters, "sync", call=1)
    with pytest.raises(_Boom):
        lora_fx.delete_adapter(gm, "default")
    _assert_same(before, _fingerprint(gm))
    assert lora_fx.active_adapters(gm) == ["default"]
    assert torch.equal(gm(x), out)


# ------------------------------------------------------------------------- merge / set_adapter


def test_merge_failing_on_a_later_site_unfolds_the_earlier_ones(monkeypatch):
    gm, x = _mlp_graph()
    lora_fx.inject(gm, LoraConfig(target_modules=["lin0", "lin1"], init_lora_weights=False))
    before, out = _fingerprint(gm), gm(x)
    _fail_on_call(monkeypatch, _fold, "fold", call=2)
    with pytest.raises(_Boom):
        lora_fx.merge(gm)
    after = _fingerprint(gm)
    for key in ("code", "nodes", "state", "modules", "buffers"):
        assert before[key] == after[key], key
    # weights: unfolded with the opposite addmm_, so equal up to float32 rounding
    for (name, grad, ptr, value), (_, grad2, ptr2, now) in zip(
        before["params"], after["params"], strict=True
    ):
        assert (grad, ptr) == (grad2, ptr2), name
        assert_close(now, value)
    assert_close(gm(x), out)
    assert lora_fx.merge_report(gm) == {}


def test_merge_and_unload_failing_in_its_unload_step_restores_the_merge(monkeypatch):
    """One snapshot for the composite pass: a failure in its second step undoes the first."""
    gm, x = _mlp_graph()
    lora_fx.inject(gm, LoraConfig(target_modules=["lin0", "lin1"], init_lora_weights=False))
    before, out = _fingerprint(gm), gm(x)
    unload_module = importlib.import_module("lora_fx.passes.unload")
    _fail_on_call(monkeypatch, unload_module, "_keep_trained_copies", call=1)
    with pytest.raises(_Boom):
        lora_fx.merge_and_unload(gm)
    after = _fingerprint(gm)
    for key in ("code", "nodes", "state", "modules", "buffers"):
        assert before[key] == after[key], key
    for (_name, *_, value), (_, *_, now) in zip(before["params"], after["params"], strict=True):
        assert_close(now, value)  # unfolded: equal up to float32 rounding
    assert_close(gm(x), out)


def test_set_adapter_failing_after_it_unmerged_puts_the_merge_back(monkeypatch):
    """set_adapter unmerges first; if it then fails, the weights hold the merge again."""
    gm, x = _mlp_graph()
    lora_fx.inject(gm, LoraConfig(target_modules=["lin0"], init_lora_weights=False), "a")
    lora_fx.inject(gm, LoraConfig(target_modules=["lin1"], init_lora_weights=False), "b")
    lora_fx.merge(gm, ["a"])
    before, out = _fingerprint(gm), gm(x)
    _fail_on_call(monkeypatch, adapters, "sync", call=1)
    with pytest.raises(_Boom), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "set_adapter: unmerging ['a'] first"
        lora_fx.set_adapter(gm, "b")
    after = _fingerprint(gm)
    for key in ("code", "nodes", "state", "modules", "buffers"):
        assert before[key] == after[key], key
    for (_name, *_, value), (_, *_, now) in zip(before["params"], after["params"], strict=True):
        assert_close(now, value)  # folded again: equal up to float32 rounding
    assert_close(gm(x), out)


def test_set_adapter_failing_while_rebuilding_branches_changes_nothing(monkeypatch):
    gm, x = _mlp_graph()
    lora_fx.inject(gm, LoraConfig(target_modules=["lin0"], init_lora_weights=False), "a")
    lora_fx.inject(gm, LoraConfig(target_modules=["lin1"], init_lora_weights=False), "b")
    before, out = _fingerprint(gm), gm(x)
    _fail_on_call(monkeypatch, adapters, "sync", call=1)
    with pytest.raises(_Boom):
        lora_fx.set_adapter(gm, "b")
    _assert_same(before, _fingerprint(gm))
    assert torch.equal(gm(x), out)


def test_a_failing_pass_on_a_llama_graph_restores_its_code_and_state(monkeypatch):
    model, ids = tiny_llama(), torch.randint(0, 256, (1, 8))
    gm = lora_fx.capture(copy.deepcopy(model), (ids,), {"use_cache": False})
    lora_fx.inject(gm, LoraConfig(target_modules="all-linear", init_lora_weights=False), "a")
    before, out = _fingerprint(gm), gm(ids).logits
    _fail_on_call(monkeypatch, inject, "add_magnitude", call=2)  # the second layer's q_proj
    with pytest.raises(_Boom):
        lora_fx.inject(gm, LoraConfig(target_modules=["q_proj"], use_dora=True), "b")
    _assert_same(before, _fingerprint(gm))
    assert torch.equal(gm(ids).logits, out)


# ------------------------------------------------------------- trainability (issue 15.8), errors


def test_set_adapter_and_delete_adapter_switch_dora_magnitudes():
    gm, _ = _mlp_graph()
    for name in ("a", "b"):
        cfg = LoraConfig(target_modules=["lin0"], use_dora=True, init_lora_weights=False)
        lora_fx.inject(gm, cfg, name)

    def grads(adapter: str) -> set[bool]:
        return {
            p.requires_grad
            for n, p in gm.named_parameters()
            if n.startswith("lin0.lora_") and n.split(".")[2] == adapter
        }

    assert grads("a") == {True} and grads("b") == {False}
    lora_fx.set_adapter(gm, "b")
    assert grads("a") == {False} and grads("b") == {True}
    assert "lin0.lora_magnitude_vector.b.weight" in lora_fx.trainable_parameters(gm)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "b was active and is deleted; a is now active"
        lora_fx.delete_adapter(gm, "b")
    assert grads("a") == {True}
    assert not [n for n, p in gm.named_parameters() if p.requires_grad and ".lora_" not in n]


def test_merge_error_is_a_value_error_as_in_peft():
    gm, _ = _mlp_graph()
    lora_fx.inject(gm, LoraConfig(target_modules=["lin0"], init_lora_weights=False))
    with torch.no_grad():
        gm.get_parameter("lin0.lora_B.default.weight").fill_(float("inf"))
    with pytest.raises(ValueError, match="non-finite|NaN|inf"):
        lora_fx.merge(gm, safe_merge=True)
    assert issubclass(lora_fx.MergeError, ValueError)
    assert issubclass(lora_fx.MergeError, RuntimeError)  # what earlier lora_fx promised


def test_a_typo_in_one_of_several_target_modules_warns_with_a_suggestion():
    model, ids = tiny_llama(), torch.randint(0, 256, (1, 8))
    gm = lora_fx.capture(model, (ids,), {"use_cache": False})
    with pytest.warns(UserWarning, match=r"'q_prj' \(did you mean \['q_proj'"):
        lora_fx.inject(gm, LoraConfig(target_modules=["q_prj", "v_proj"]))
    assert {fqn.rsplit(".", 1)[-1] for fqn in gm.meta[STATE_META].adapters["default"].sites} == {
        "v_proj"
    }
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every entry matches: no warning
        lora_fx.inject(gm, LoraConfig(target_modules=["q_proj", "k_proj"]), "other")


def test_library_code_has_no_assert_statements():
    """Invariants must hold under `python -O` too: they raise real errors."""
    import ast
    from pathlib import Path

    root = Path(lora_fx.__file__).parent
    found = [
        f"{path.relative_to(root)}:{node.lineno}"
        for path in sorted(root.rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Assert)
    ]
    assert not found
