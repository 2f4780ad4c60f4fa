"""Arrow (PEFT 0.21.2's `arrow_config` / `create_arrow_model`) against PEFT itself.

A library of task experts (and general adapters for GenKnowSub) is trained-looking LoRA
(`init_lora_weights=False`), saved by PEFT; PEFT's `create_arrow_model` and lora_fx's load the
same folders, and outputs, prototypes and the GenKnowSub-purified experts must be PEFT's. The
routing is ordinary graph nodes (compile and export see plain ops); merge and the other
single-delta passes refuse a router, as PEFT's merge does; bad requests change nothing.
"""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from conftest import assert_close, assert_differs
from helpers import lora_roles
from models import tiny_llama
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

import lora_fx
from lora_fx import (
    AdapterError,
    ArrowConfig,
    ConfigError,
    LoraConfig,
    MergeError,
    UnsupportedSiteError,
)
from lora_fx.exporters import export_onnx
from lora_fx.math.arrow import arrow_coefficients, arrow_delta, top_right_singular_vector

_TARGETS = ["up", "down"]


class _Mlp(nn.Module):
    """up (10 -> 14) -> gelu -> down (14 -> 6)."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(10, 14)
        self.down = nn.Linear(14, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(nn.functional.gelu(self.up(x)))


class _EmbedMlp(nn.Module):
    """emb (20 -> 10) -> up: an embedding site beside a linear one."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 10)
        self.up = nn.Linear(10, 6)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.up(self.emb(ids))


def _library(model, folder, *, ranks=(3, 3, 3, 3), general=2, targets=_TARGETS, seed=10):
    """PEFT-saved experts (`task<i>`, alphas differ) and general adapters (`gks<i>`)."""
    paths = {"task": [], "gks": []}
    for kind, rs in (("task", ranks), ("gks", (ranks[0],) * general)):
        for i, r in enumerate(rs):
            torch.manual_seed(seed + 100 * (kind == "gks") + i)
            cfg = peft.LoraConfig(
                r=r, lora_alpha=4 + i, target_modules=targets, init_lora_weights=False
            )
            pm = peft.get_peft_model(copy.deepcopy(model), cfg)
            with torch.no_grad():  # large enough that routing and GenKnowSub matter
                for name, param in pm.named_parameters():
                    if "lora_" in name:
                        param.mul_(3.0)
            pm.save_pretrained(folder / f"{kind}{i}")
            paths[kind].append(str(folder / f"{kind}{i}"))
    return paths["task"], paths["gks"]


def _arrow_pair(model, gm, task, general, **arrow):
    """PEFT's and lora_fx's Arrow models over the same folders and seed."""
    arrow.setdefault("rng_seed", 7)
    pm = peft.create_arrow_model(
        copy.deepcopy(model), task, peft.ArrowConfig(**arrow), general_adapter_paths=general
    )
    gm = lora_fx.create_arrow_model(gm, task, ArrowConfig(**arrow), general)
    return pm.eval(), gm.eval()


def _snapshot(gm):
    """What a refused call must leave as it was: code, adapters, tensors' values."""
    state = gm.meta.get("lora_fx")
    adapters = list(state.adapters) if state else []
    return gm.code, adapters, {k: v.clone() for k, v in gm.state_dict().items()}


def _assert_unchanged(gm, before):
    code, adapters, tensors = _snapshot(gm)
    assert code == before[0] and adapters == before[1]
    assert sorted(tensors) == sorted(before[2])
    for key, value in tensors.items():
        assert torch.equal(value, before[2][key]), key
    gm.graph.lint()


# --- math: hand-checkable ---


def test_coefficients_hand_checked():
    # prototypes e0 = [1, 0], e1 = [0, 1], e2 = [1, 1]; token [2, -1]: |sim| = [2, 1, 1]
    protos = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    x = torch.tensor([[2.0, -1.0]])
    top1 = arrow_coefficients(x, protos, 1, 1.0)
    assert top1.tolist() == [[1.0, 0.0, 0.0]]
    top2 = arrow_coefficients(x, protos, 2, 1.0)  # e0 and the first of the tied ones (e1)
    e = torch.tensor(1.0).exp()
    expected = torch.tensor([[e / (e + 1), 1 / (e + 1), 0.0]])
    assert_close(top2, expected)
    flat = arrow_coefficients(x, protos, 2, 1e6)  # a huge temperature: equal weights
    assert_close(flat, torch.tensor([[0.5, 0.5, 0.0]]))


def test_delta_hand_checked():
    # expert 0: A = [[1, 0]], B = [[1], [2]], s = 2;  expert 1: A = [[0, 1]], B = [[3], [0]], s = 1
    x = torch.tensor([[1.0, 2.0]])
    coefficients = torch.tensor([[0.25, 0.75]])
    lora_as = [torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])]
    lora_bs = [torch.tensor([[1.0], [2.0]]), torch.tensor([[3.0], [0.0]])]
    # 0.25 * 2 * [1, 2] * 1  +  0.75 * 1 * [3, 0] * 2  =  [0.5, 1] + [4.5, 0]
    delta = arrow_delta(x, coefficients, lora_as, lora_bs, (2.0, 1.0))
    assert delta.tolist() == [[5.0, 1.0]]


def test_prototype_is_the_top_right_singular_vector():
    torch.manual_seed(0)
    a, b = torch.randn(3, 8), torch.randn(5, 3)
    v = top_right_singular_vector(a, b, seed=0)
    exact = torch.linalg.svd(b @ a).Vh[0]
    assert_close(v.abs(), exact.abs())  # unique up to sign
    assert torch.equal(v, top_right_singular_vector(a, b, seed=0))


# --- parity with PEFT ---


@pytest.mark.parametrize("method", ["fx", "export"])
@pytest.mark.parametrize(
    ("top_k", "temperature", "use_gks"),
    [(1, 1.0, False), (2, 0.5, False), (3, 2.0, True), (4, 1.0, True)],
)
def test_mlp_matches_peft(tmp_path, method, top_k, temperature, use_gks):
    torch.manual_seed(0)
    model, x = _Mlp().eval(), torch.randn(2, 5, 10)
    task, general = _library(model, tmp_path)
    gm = lora_fx.capture(copy.deepcopy(model), (x,), method=method)
    arrow = {"top_k": top_k, "router_temperature": temperature, "use_gks": use_gks}
    pm, gm = _arrow_pair(model, gm, task, general if use_gks else None, **arrow)
    with torch.no_grad():
        expected = pm(x)  # PEFT's first forward: GenKnowSub and prototypes
        ours = gm(x)
        assert_differs(ours, model(x))
        assert_close(ours, expected)
    # structure: one route per site node, the router's A / B unread, the experts' read
    gm.graph.lint()
    roles = lora_roles(gm, "arrow_router")
    assert roles["route"] == 2 and roles["add"] == 2
    assert lora_fx.active_adapters(gm) == ["arrow_router"]
    for site in _TARGETS:
        ours_site, theirs = gm.get_submodule(site), pm.base_model.model.get_submodule(site)
        protos = ours_site.lora_arrow["arrow_router"].prototypes
        assert_close(protos, theirs.lora_arrow["arrow_router"].prototypes)
        assert "prototypes" not in str(list(gm.state_dict()))  # non-persistent, as PEFT's
        for i in range(len(task)):  # GenKnowSub purified the experts as PEFT's first forward
            for holder in ("lora_A", "lora_B"):
                mine = getattr(ours_site, holder)[f"task_{i}"].weight
                assert_close(mine, getattr(theirs, holder)[f"task_{i}"].weight)
    # the same parameters train: the router's own A and B, as in PEFT
    assert sorted(n for n, p in gm.named_parameters() if p.requires_grad) == sorted(
        n.removeprefix("base_model.model.") for n, p in pm.named_parameters() if p.requires_grad
    )


def test_tiny_llama_matches_peft(tmp_path):
    torch.manual_seed(0)
    model, ids = tiny_llama(layers=2, hidden=64).eval(), torch.randint(0, 256, (2, 12))
    targets = ["q_proj", "v_proj", "up_proj", "down_proj"]
    task, general = _library(model, tmp_path, ranks=(4, 4, 4), targets=targets)
    gm = lora_fx.capture(copy.deepcopy(model), (ids,), {"use_cache": False})
    arrow = {"top_k": 2, "router_temperature": 0.7, "use_gks": True}
    pm, gm = _arrow_pair(model, gm, task, general, **arrow)
    with torch.no_grad():
        expected = pm(ids, use_cache=False).logits
        ours = gm(ids)
        logits = ours.logits if hasattr(ours, "logits") else ours[0]
        assert_differs(logits, model(ids, use_cache=False).logits)
        torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    assert lora_roles(gm, "arrow_router")["route"] == 4 * 2


def test_compile_matches_eager(tmp_path):
    torch.manual_seed(0)
    model, x = _Mlp().eval(), torch.randn(2, 5, 10)
    task, general = _library(model, tmp_path)
    gm = lora_fx.capture(copy.deepcopy(model), (x,))
    gm = lora_fx.create_arrow_model(gm, task, ArrowConfig(top_k=2, use_gks=True), general).eval()
    compiled = torch.compile(gm, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        assert_close(compiled(x), gm(x))
        assert_close(compiled(x * 2), gm(x * 2))
    # torch.export sees the routing as plain ATen ops
    program = torch.export.export(gm, (x,))
    targets = {n.target for n in program.graph.nodes if n.op == "call_function"}
    assert {torch.ops.aten.topk.default, torch.ops.aten.abs.default} <= targets
    with torch.no_grad():
        assert_close(program.module()(x), gm(x))


def test_router_over_loaded_adapters_equals_create_arrow_model(tmp_path):
    """Experts loaded under any names, then `inject(arrow_config=...)`: the same model."""
    torch.manual_seed(0)
    model, x = _Mlp().eval(), torch.randn(2, 5, 10)
    task, general = _library(model, tmp_path)
    cfg = {"top_k": 2, "router_temperature": 0.5, "use_gks": True, "rng_seed": 1}
    reference = lora_fx.capture(copy.deepcopy(model), (x,))
    reference = lora_fx.create_arrow_model(reference, task, ArrowConfig(**cfg), general)
    gm = lora_fx.capture(copy.deepcopy(model), (x,))
    names = ["math", "code", "chat", "law"]
    for name, path in zip(names, task, strict=True):
        lora_fx.load_adapter(gm, path, name)
    for i, path in enumerate(general):
        lora_fx.load_adapter(gm, path, f"gen{i}")
    arrow = ArrowConfig(**cfg, task_adapter_names=names, gks_adapter_names=["gen0", "gen1"])
    lora_fx.inject(gm, LoraConfig(r=3, target_modules=_TARGETS, arrow_config=arrow), "router")
    lora_fx.set_adapter(gm, "router")
    with torch.no_grad():
        assert_close(gm(x), reference(x))


def test_peft_saved_arrow_model_loads(tmp_path):
    """PEFT's saved Arrow model (experts and router in subfolders) loads folder by folder."""
    torch.manual_seed(0)
    model, x = _Mlp().eval(), torch.randn(2, 5, 10)
    task, _ = _library(model, tmp_path, ranks=(3, 3, 3), general=0)
    pm = peft.create_arrow_model(copy.deepcopy(model), task, peft.ArrowConfig(top_k=2, rng_seed=1))
    with torch.no_grad():
        expected = pm.eval()(x)
    pm.save_pretrained(tmp_path / "peft")
    gm = lora_fx.capture(copy.deepcopy(model), (x,))
    before = _snapshot(gm)
    with pytest.raises(AdapterError, match=r"unknown adapter\(s\) \['task_0', 'task_1'"):
        lora_fx.load_adapter(gm, tmp_path / "peft" / "arrow_router", "arrow_router")
    _assert_unchanged(gm, before)
    for i in range(3):
        lora_fx.load_adapter(gm, tmp_path / "peft" / f"task_{i}", f"task_{i}")
    lora_fx.load_adapter(gm, tmp_path / "peft" / "arrow_router", "arrow_router")
    lora_fx.set_adapter(gm, "arrow_router")
    with torch.no_grad():
        assert_close(gm.eval()(x), expected)
    lora_fx.save_adapter(gm, tmp_path / "ours", "arrow_router")
    saved = LoraConfig.from_json(tmp_path / "ours" / "adapter_config.json")
    assert saved.arrow_config["task_adapter_names"] == ["task_0", "task_1", "task_2"]
    assert saved.arrow_config["top_k"] == 2


# --- merge, unload and the passes that need one B @ A ---


def test_merge_refused_unload_restores_base(tmp_path):
    torch.manual_seed(0)
    model, x = _Mlp().eval(), torch.randn(2, 5, 10)
    task, _ = _library(model, tmp_path, general=0)
    gm = lora_fx.capture(copy.deepcopy(model), (x,))
    gm = lora_fx.create_arrow_model(gm, task, ArrowConfig(top_k=2)).eval()
    before = _snapshot(gm)
    for refused in (lora_fx.merge, lora_fx.merge_and_unload):
        with pytest.raises(MergeError, match="Arrow router"):
            refused(gm)
        _assert_unchanged(gm, before)
    with pytest.raises(AdapterError, match="Arrow router"):
        lora_fx.add_weighted_adapter(gm, ["arrow_router"], [1.0], "mix")
    with pytest.raises(AdapterError, match="prepare_for_hotswap does not support Arrow"):
        lora_fx.prepare_for_hotswap(gm, target_rank=4)
    with pytest.raises(AdapterError, match="expert of the Arrow router"):
        lora_fx.delete_adapter(gm, "task_1")
    for layout in ("merged", "inputs", "stacked"):  # "initializers" exports the routing
        args = {"merged": True} if layout == "merged" else {"merged": False, "lora_layout": layout}
        with pytest.raises(UnsupportedSiteError, match="an Arrow router at 'up'"):
            export_onnx(gm, (x,), tmp_path / "m.onnx", **args)
    _assert_unchanged(gm, before)
    lora_fx.unload(gm)
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))
    assert not [n for n, _ in gm.named_modules() if "lora_arrow" in n]


@pytest.mark.parametrize("method", ["fx", "export"])
def test_router_rows_in_a_mixed_batch_match_peft(tmp_path, method):
    # PEFT's adapter_names= runs the router's variant forward on its rows; lora_fx masks the
    # routed delta to the router's slot (the site is not gathered: its router routes per token).
    torch.manual_seed(0)
    model, x = _Mlp().eval(), torch.randn(4, 5, 10)
    task, general = _library(model, tmp_path)
    gm = lora_fx.capture(copy.deepcopy(model), (x,), method=method)
    pm, gm = _arrow_pair(model, gm, task, general, top_k=2, router_temperature=0.5, use_gks=True)
    compositions = (
        ["arrow_router", "task_1", "__base__", "arrow_router"],
        ["task_0", "arrow_router", "task_2", "__base__"],
    )
    with torch.no_grad():
        router_alone = gm(x)
        pm(x)  # PEFT's first forward: GenKnowSub and prototypes
        expected = {tuple(rows): pm(x, adapter_names=rows) for rows in compositions}
        lora_fx.set_adapter_batch(gm, compositions[0])
        counter = CompileCounterWithBackend("aot_eager")
        compiled = torch.compile(gm, backend=counter, fullgraph=True)
        try:
            for rows, want in expected.items():
                lora_fx.set_adapter_batch(gm, list(rows))  # values only: no recompile
                assert_close(gm(x), want)
                assert_close(compiled(x), want)
                torch._dynamo.config.error_on_recompile = True
        finally:
            torch._dynamo.config.error_on_recompile = False
        assert counter.frame_count == 1
        mixed = gm(x)
        assert torch.equal(mixed[1], router_alone[1])  # row 1 of the last batch is the router's
        assert torch.equal(mixed[3], model(x)[3])  # "__base__"
        assert_differs(mixed[0], router_alone[0])  # an expert's row is not the router's
    lora_fx.set_adapter_batch(gm, None)
    with torch.no_grad():
        assert torch.equal(gm(x), router_alone)


def test_delete_router_then_experts(tmp_path):
    torch.manual_seed(0)
    model, x = _Mlp().eval(), torch.randn(2, 5, 10)
    task, _ = _library(model, tmp_path, ranks=(3, 3), general=0)
    gm = lora_fx.capture(copy.deepcopy(model), (x,))
    gm = lora_fx.create_arrow_model(gm, task, ArrowConfig(top_k=1))
    with pytest.warns(UserWarning, match="now active"):
        lora_fx.delete_adapter(gm, "arrow_router")
    assert not [n for n, _ in gm.named_buffers() if "prototypes" in n]
    lora_fx.delete_adapter(gm, "task_1")
    gm.graph.lint()
    # the expert left is plain LoRA: it merges
    with torch.no_grad():
        expected = gm.eval()(x)
        assert_differs(expected, model(x))
        lora_fx.merge_and_unload(gm)
        assert_close(gm(x), expected)


# --- refused requests leave the graph as it was ---


def _loaded(tmp_path, **library):
    torch.manual_seed(0)
    model, x = _Mlp().eval(), torch.randn(2, 5, 10)
    task, general = _library(model, tmp_path, **library)
    gm = lora_fx.capture(copy.deepcopy(model), (x,))
    return gm, task, general


def test_top_k_above_experts_refused(tmp_path):
    gm, task, _ = _loaded(tmp_path, ranks=(3, 3), general=0)
    before = _snapshot(gm)
    with pytest.raises(ConfigError, match=r"top_k=3 is larger than the number of task experts"):
        lora_fx.create_arrow_model(gm, task, ArrowConfig(top_k=3))
    _assert_unchanged(gm, before)


def test_mixed_ranks_refused(tmp_path):
    gm, task, _ = _loaded(tmp_path, ranks=(3, 3, 4), general=0)
    before = _snapshot(gm)
    with pytest.raises(ConfigError, match=r"'task_2' has rank\(s\) \[4\].*same rank"):
        lora_fx.create_arrow_model(gm, task, ArrowConfig(top_k=2))
    _assert_unchanged(gm, before)


def test_names_in_use_and_sites_without_experts_refused(tmp_path):
    gm, task, _ = _loaded(tmp_path, ranks=(3, 3), general=0)
    lora_fx.load_adapter(gm, task[0], "task_1")
    before = _snapshot(gm)
    with pytest.raises(AdapterError, match=r"\['task_1'\] already exist"):
        lora_fx.create_arrow_model(gm, task, ArrowConfig(top_k=1))
    _assert_unchanged(gm, before)
    plain = {"r": 2, "target_modules": ["up"], "init_lora_weights": False}
    lora_fx.inject(gm, LoraConfig(**plain), "e0")
    lora_fx.inject(gm, LoraConfig(**plain), "e1")
    before = _snapshot(gm)
    arrow = ArrowConfig(top_k=1, task_adapter_names=["e0", "e1"])
    router = LoraConfig(r=2, target_modules=_TARGETS, arrow_config=arrow)
    with pytest.raises(ConfigError, match=r"targets \['down'\], where the experts have no"):
        lora_fx.inject(gm, router, "router")
    _assert_unchanged(gm, before)


def test_unknown_expert_refused(tmp_path):
    gm, task, _ = _loaded(tmp_path, ranks=(3, 3), general=0)
    lora_fx.load_adapter(gm, task[0], "a")
    before = _snapshot(gm)
    arrow = ArrowConfig(top_k=1, task_adapter_names=["a", "nope"])
    with pytest.raises(AdapterError, match=r"unknown adapter\(s\) \['nope'\]"):
        lora_fx.inject(gm, LoraConfig(target_modules=_TARGETS, arrow_config=arrow), "router")
    _assert_unchanged(gm, before)


def test_gks_without_general_adapters_refused(tmp_path):
    gm, task, _ = _loaded(tmp_path, ranks=(3, 3), general=0)
    before = _snapshot(gm)
    with pytest.raises(ConfigError, match="general_adapter_paths"):
        lora_fx.create_arrow_model(gm, task, ArrowConfig(top_k=1, use_gks=True))
    with pytest.raises(ConfigError, match="task_specific_adapter_paths"):
        lora_fx.create_arrow_model(gm, [], ArrowConfig(top_k=1))
    _assert_unchanged(gm, before)


def test_experts_on_an_embedding_refused(tmp_path):
    torch.manual_seed(0)
    model, ids = _EmbedMlp().eval(), torch.randint(0, 20, (2, 5))
    task, _ = _library(model, tmp_path, ranks=(2, 2), general=0, targets=["emb", "up"])
    gm = lora_fx.capture(copy.deepcopy(model), (ids,))
    before = _snapshot(gm)
    with pytest.raises(UnsupportedSiteError, match=r"non-linear sites \['emb'\]"):
        lora_fx.create_arrow_model(gm, task, ArrowConfig(top_k=1))
    _assert_unchanged(gm, before)
    # a router aimed at the embedding is refused too
    lora_fx.inject(gm, LoraConfig(r=2, target_modules=["up"], init_lora_weights=False), "t0")
    lora_fx.inject(gm, LoraConfig(r=2, target_modules=["up"], init_lora_weights=False), "t1")
    before = _snapshot(gm)
    router = LoraConfig(r=2, target_modules=["emb"], arrow_config=ArrowConfig(top_k=1))
    with pytest.raises(UnsupportedSiteError, match="Arrow routes linear sites only"):
        lora_fx.inject(gm, router, "router")
    _assert_unchanged(gm, before)


# --- config ---


@pytest.mark.parametrize(
    ("arrow", "field"),
    [
        ({"top_k": 0}, "top_k"),
        ({"top_k": 1.5}, "top_k"),
        ({"router_temperature": 0}, "router_temperature"),
        ({"router_temperature": "hot"}, "router_temperature"),
        ({"use_gks": "yes"}, "use_gks"),
        ({"task_adapter_names": "task_0"}, "task_adapter_names"),
        ("yes", "arrow_config"),
    ],
)
def test_bad_arrow_config_names_the_field(arrow, field):
    with pytest.raises(ConfigError, match=field):
        LoraConfig(target_modules=_TARGETS, arrow_config=arrow)


def test_arrow_config_round_trips_and_refuses_variants():
    cfg = LoraConfig(target_modules=_TARGETS, arrow_config=ArrowConfig(top_k=2, rng_seed=3))
    assert cfg.arrow_config["top_k"] == 2 and cfg.arrow_config["router_temperature"] == 1.0
    assert LoraConfig.from_dict(cfg.to_dict()).arrow_config == cfg.arrow_config
    with pytest.raises(ConfigError, match="use_dora"):
        LoraConfig(target_modules=_TARGETS, arrow_config={}, use_dora=True)


def test_router_dropout_in_training_matches_peft(tmp_path):
    """A router injected by hand with lora_dropout: PEFT drops out the routed delta, so do we."""
    torch.manual_seed(0)
    model, x = _Mlp().eval(), torch.randn(2, 5, 10)
    task, _ = _library(model, tmp_path, ranks=(3, 3, 3), general=0)
    names = ["task_0", "task_1", "task_2"]
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(model), task[0], adapter_name=names[0])
    gm = lora_fx.capture(copy.deepcopy(model), (x,))
    for name, path in zip(names, task, strict=True):
        if name != names[0]:
            pm.load_adapter(path, adapter_name=name)
        lora_fx.load_adapter(gm, path, name)
    theirs = peft.ArrowConfig(top_k=2, rng_seed=2)
    theirs.task_adapter_names, theirs.gks_adapter_names = names, []
    cfg = {"r": 3, "target_modules": _TARGETS, "lora_dropout": 0.5}
    pm.add_adapter("arrow_router", peft.LoraConfig(**cfg, arrow_config=theirs))
    pm.set_adapter("arrow_router")
    lora_fx.inject(gm, LoraConfig(**cfg, arrow_config=ArrowConfig(top_k=2, rng_seed=2)), "r")
    lora_fx.set_adapter(gm, "r")
    pm.train(), gm.train()
    torch.manual_seed(5)
    expected = pm(x)
    torch.manual_seed(5)
    ours = gm(x)
    assert_close(ours, expected)
    assert lora_roles(gm, "r")["dropout"] == 2
    with torch.no_grad():
        assert_close(gm.eval()(x), pm.eval()(x))
        assert_differs(gm(x), ours)


@pytest.mark.parametrize(
    ("second", "error", "match"),
    [
        ({"target_modules": ["up"]}, ConfigError, r"'t1' targets \['up'\].*same sites"),
        ({"use_dora": True}, ConfigError, r"'t1' uses \['use_dora'\]"),
        ({"merged": True}, AdapterError, "while adapters are merged"),
    ],
)
def test_experts_that_cannot_be_mixed_are_refused(second, error, match):
    torch.manual_seed(0)
    model, x = _Mlp().eval(), torch.randn(2, 5, 10)
    gm = lora_fx.capture(model, (x,))
    plain = {"r": 2, "target_modules": _TARGETS, "init_lora_weights": False}
    lora_fx.inject(gm, LoraConfig(**plain), "t0")
    merged = second.pop("merged", False)
    lora_fx.inject(gm, LoraConfig(**{**plain, **second}), "t1")
    if merged:
        lora_fx.merge(gm, ["t1"])
    before = _snapshot(gm)
    router = LoraConfig(r=2, target_modules=["up"], arrow_config=ArrowConfig(top_k=1))
    with pytest.raises(error, match=match):
        lora_fx.inject(gm, router, "router")
    _assert_unchanged(gm, before)
