"""add_weighted_adapter: PEFT parity for every combination type, lora_fx's deviations, and errors.

Parity: two adapters are made in PEFT (`init_lora_weights=False`, so both are random), saved,
and loaded into a captured graph. Both sides then combine them under one seed; the new adapter's
factors, the global RNG state afterwards (DARE masks are drawn from it) and the outputs with the new
adapter active must agree.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from conftest import assert_close, assert_differs
from helpers import lora_roles
from models import TinyConv, TinyEmbedding, TinyMLP, tiny_llama
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from torch import nn

import lora_fx
from lora_fx.core.graph import get_attr
from lora_fx.math import ops
from lora_fx.passes.weighted import COMBINATION_TYPES, add_weighted_adapter
from lora_fx.sites.kinds import lora_paths

WEIGHTS = [0.7, -0.4]
_DENSITY_FREE = ("linear", "cat", "svd")


@dataclass(frozen=True)
class Pair:
    """A model, its inputs, and the configs of adapters `default` and `b` (PEFT field names)."""

    model: Callable[[], nn.Module]
    inputs: Callable[[], torch.Tensor]
    cfg_a: dict[str, Any]
    cfg_b: dict[str, Any]
    kwargs: dict[str, Any] | None = None
    method: str = "export"
    svd_rank: int | None = None


PAIRS = {
    # lin1 has 2 outputs: PEFT's svd fails above rank 2 (see test_svd_rank_above_layer_size_pads)
    "mlp": Pair(
        TinyMLP,
        lambda: torch.randn(4, 10),
        {"target_modules": ["lin0", "lin1"], "r": 4, "lora_alpha": 8},
        {"target_modules": ["lin0", "lin1"], "r": 4, "lora_alpha": 4},
        method="fx",
        svd_rank=2,
    ),
    "conv": Pair(
        TinyConv,
        lambda: torch.randn(2, 3, 6, 6),
        {"target_modules": ["conv0", "conv1", "lin0"], "r": 4, "lora_alpha": 8},
        {"target_modules": ["conv0", "conv1"], "r": 4, "lora_alpha": 4},
    ),
    "embedding": Pair(
        TinyEmbedding,
        lambda: torch.randint(0, 100, (2, 8)),
        {"target_modules": ["emb", "lin0"], "r": 4, "lora_alpha": 8},
        {"target_modules": ["emb"], "r": 4, "lora_alpha": 4},
    ),
    "llama": Pair(
        lambda: tiny_llama(layers=2, hidden=32),
        lambda: torch.randint(0, 256, (2, 8)),
        {"target_modules": "all-linear", "r": 4, "lora_alpha": 8},
        {"target_modules": ["q_proj", "v_proj", "down_proj"], "r": 4, "lora_alpha": 16},
        kwargs={"use_cache": False},
    ),
}


@dataclass
class Both:
    """The same two adapters in PEFT and in lora_fx."""

    peft: PeftModel
    gm: torch.fx.GraphModule
    x: torch.Tensor


def _out(output: Any) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output


def _build(
    pair: Pair, tmp_path, *, patch_a=None, patch_b=None, dtype=torch.float32, cast_to=None
) -> Both:
    """PEFT model with adapters `default` and `b`, saved and loaded into a captured graph.

    `dtype` is the base model's (adapters are autocast to float32, as in PEFT); `cast_to` then casts
    everything, adapters included, on both sides.
    """
    torch.manual_seed(0)
    model = pair.model().to(dtype).eval()
    x = pair.inputs()
    x = x.to(cast_to or dtype) if x.is_floating_point() else x
    cfg_a = PeftLoraConfig(init_lora_weights=False, **{**pair.cfg_a, **(patch_a or {})})
    cfg_b = PeftLoraConfig(init_lora_weights=False, **{**pair.cfg_b, **(patch_b or {})})
    peft_model = get_peft_model(copy.deepcopy(model), cfg_a)
    peft_model.add_adapter("b", cfg_b)
    peft_model.save_pretrained(tmp_path)  # `b` goes to tmp_path / "b"
    peft_model.eval()
    gm = lora_fx.capture(model, (x,), pair.kwargs, method=pair.method)
    lora_fx.load_adapter(gm, tmp_path, adapter_name="default")
    lora_fx.load_adapter(gm, tmp_path / "b", adapter_name="b")
    gm.eval()
    if cast_to is not None:
        peft_model.to(cast_to)
        gm.to(cast_to)
    return Both(peft_model, gm, x)


def _peft_layer(both: Both, fqn: str) -> nn.Module:
    return both.peft.base_model.model.get_submodule(fqn)


def _peft_factors(layer: nn.Module, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    if name in layer.lora_embedding_A:
        return layer.lora_embedding_A[name], layer.lora_embedding_B[name]
    return layer.lora_A[name].weight, layer.lora_B[name].weight


def _factors(gm: torch.fx.GraphModule, fqn: str, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    rec = gm.meta["lora_fx"].adapters[name].sites[fqn]
    paths = lora_paths(rec.kind, fqn, name)
    return get_attr(gm, paths.a), get_attr(gm, paths.b)


def _delta(gm: torch.fx.GraphModule, fqn: str, name: str) -> torch.Tensor:
    """The adapter's delta on a site, in the base weight's layout."""
    rec = gm.meta["lora_fx"].adapters[name].sites[fqn]
    a, b = _factors(gm, fqn, name)
    transposed = lora_fx.sites.all_sites(gm)[fqn].transposed
    return ops.delta_weight(rec.kind, a, b, rec.scale, transposed=transposed)


def _options(combination_type: str, svd_rank: int | None) -> dict[str, Any]:
    kw: dict[str, Any] = {} if combination_type in _DENSITY_FREE else {"density": 0.5}
    if combination_type.endswith("svd"):
        kw["svd_rank"] = svd_rank
    return kw


def _combine_both(both: Both, name: str, combination_type: str, seed: int = 1234, **kw) -> None:
    """Combine on both sides under one seed; the RNG must end in the same state."""
    torch.manual_seed(seed)
    both.peft.add_weighted_adapter(
        ["default", "b"], WEIGHTS, name, combination_type=combination_type, **kw
    )
    peft_rng = torch.get_rng_state()
    torch.manual_seed(seed)
    add_weighted_adapter(both.gm, ["default", "b"], WEIGHTS, name, combination_type, **kw)
    assert torch.equal(torch.get_rng_state(), peft_rng), "the global RNG advanced differently"


# ------------------------------------------------------------------ PEFT parity


@pytest.fixture(scope="module", params=list(PAIRS))
def both(request, tmp_path_factory) -> tuple[Pair, Both]:
    pair = PAIRS[request.param]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pair, _build(pair, tmp_path_factory.mktemp(request.param))


@pytest.mark.parametrize("combination_type", COMBINATION_TYPES)
def test_matches_peft(both, combination_type):
    pair, both = both
    name = f"w_{combination_type}"
    _combine_both(both, name, combination_type, **_options(combination_type, pair.svd_rank))

    state = both.gm.meta["lora_fx"]
    assert name not in state.active  # inactive, as PEFT leaves it
    assert not lora_roles(both.gm, name)  # and no branch nodes
    assert not [n for n, p in both.gm.named_parameters() if f".{name}" in n and p.requires_grad]
    expected_sites = set(state.adapters["default"].sites) | set(state.adapters["b"].sites)
    assert set(state.adapters[name].sites) == expected_sites
    for fqn in expected_sites:
        a, b = _factors(both.gm, fqn, name)
        peft_a, peft_b = _peft_factors(_peft_layer(both, fqn), name)
        r = a.shape[0]  # PEFT's cat pads every site to the sum of all ranks with zeros
        assert not peft_a[r:].any() and not peft_b[:, r:].any()
        assert_close(a, peft_a[:r])
        assert_close(b, peft_b[:, :r])
        assert_close(_delta(both.gm, fqn, name), _peft_layer(both, fqn).get_delta_weight(name))

    both.peft.base_model.set_adapter(name)
    lora_fx.set_adapter(both.gm, name)
    try:
        with torch.no_grad():
            expected = _out(both.peft(both.x))
            actual = _out(both.gm(both.x))
            with lora_fx.disable_adapters(both.gm):
                base = _out(both.gm(both.x))
        assert_differs(actual, base)
        assert_close(actual, expected)
    finally:
        both.peft.base_model.set_adapter("default")
        lora_fx.set_adapter(both.gm, "default")


def test_frequency_sign_and_clamp_match_peft(tmp_path):
    both = _build(PAIRS["mlp"], tmp_path)
    _combine_both(both, "t", "dare_ties_svd", density=0.7, majority_sign_method="frequency",
                  svd_rank=2, svd_clamp=0.9)  # fmt: skip
    for fqn in ("lin0", "lin1"):
        assert_close(_delta(both.gm, fqn, "t"), _peft_layer(both, fqn).get_delta_weight("t"))


def test_sequence_of_calls_keeps_rng_in_step(tmp_path):
    both = _build(PAIRS["embedding"], tmp_path)
    torch.manual_seed(5)
    for i, kind in enumerate(["cat", "dare_linear", "dare_ties_svd"]):
        kw = _options(kind, None)
        both.peft.add_weighted_adapter(["default", "b"], WEIGHTS, f"n{i}", kind, **kw)
    peft_rng = torch.get_rng_state()
    torch.manual_seed(5)
    for i, kind in enumerate(["cat", "dare_linear", "dare_ties_svd"]):
        add_weighted_adapter(
            both.gm, ["default", "b"], WEIGHTS, f"n{i}", kind, **_options(kind, None)
        )
    assert torch.equal(torch.get_rng_state(), peft_rng)
    for fqn in ("emb", "lin0"):
        assert_close(_delta(both.gm, fqn, "n2"), _peft_layer(both, fqn).get_delta_weight("n2"))


def test_cat_and_svd_are_exact_combinations(tmp_path):
    both = _build(PAIRS["mlp"], tmp_path)
    add_weighted_adapter(both.gm, ["default", "b"], WEIGHTS, "cat", "cat")
    add_weighted_adapter(both.gm, ["default", "b"], WEIGHTS, "svd", "svd", svd_rank=8)
    for fqn in ("lin0", "lin1"):
        expected = WEIGHTS[0] * _delta(both.gm, fqn, "default") + WEIGHTS[1] * _delta(
            both.gm, fqn, "b"
        )
        assert_close(_delta(both.gm, fqn, "cat"), expected)
        assert_close(_delta(both.gm, fqn, "svd"), expected)  # rank 8 holds the rank-8 sum


def test_single_adapter_is_linear_as_in_peft(tmp_path):
    both = _build(PAIRS["mlp"], tmp_path)
    both.peft.add_weighted_adapter(["b"], [2.0], "one", combination_type="svd")
    with pytest.warns(UserWarning, match="with one adapter is computed as 'linear'"):
        add_weighted_adapter(both.gm, ["b"], [2.0], "one", "svd")
    for fqn in ("lin0", "lin1"):
        assert_close(_delta(both.gm, fqn, "one"), _peft_layer(both, fqn).get_delta_weight("one"))
        assert_close(_delta(both.gm, fqn, "one"), 2.0 * _delta(both.gm, fqn, "b"))


@pytest.mark.parametrize("adapters", ["autocast", "bf16"])
@pytest.mark.parametrize("combination_type", ["svd", "ties"])
def test_bf16_base(tmp_path, adapters, combination_type):
    """float32 adapters on a bf16 base (PEFT's autocast), or bf16 adapters; svd runs in float32."""
    if adapters == "autocast":
        both = _build(PAIRS["mlp"], tmp_path, dtype=torch.bfloat16)
    else:
        both = _build(PAIRS["mlp"], tmp_path, cast_to=torch.bfloat16)
    kw = _options(combination_type, 2)
    _combine_both(both, "s", combination_type, **kw)
    dtype = torch.float32 if adapters == "autocast" else torch.bfloat16
    for fqn in ("lin0", "lin1"):
        a, b = _factors(both.gm, fqn, "s")
        assert a.dtype == b.dtype == dtype  # PEFT's svd leaves float32 factors in a bf16 adapter
        peft_delta = _peft_layer(both, fqn).get_delta_weight("s").float()
        assert_close(_delta(both.gm, fqn, "s"), peft_delta, dtype=dtype)
    lora_fx.set_adapter(both.gm, "s")
    both.peft.base_model.set_adapter("s")
    with torch.no_grad():
        assert_close(both.gm(both.x), both.peft(both.x), dtype=torch.bfloat16)


# ------------------------------------------------------------------ where lora_fx differs from PEFT


def test_rslora_inputs_give_scale_one(tmp_path):
    """PEFT inherits use_rslora: its combined adapter is scaled sqrt(r) times too much."""
    rs = {"use_rslora": True}
    both = _build(PAIRS["mlp"], tmp_path, patch_a=rs, patch_b=rs)
    both.peft.add_weighted_adapter(["default", "b"], [1.0, 0.0], "c", "cat")
    add_weighted_adapter(both.gm, ["default", "b"], [1.0, 0.0], "c", "cat")
    cfg = both.gm.meta["lora_fx"].adapters["c"].config
    assert (cfg.r, cfg.lora_alpha, cfg.use_rslora) == (8, 8, False)
    for fqn in ("lin0", "lin1"):
        peft_a, peft_b = _peft_factors(_peft_layer(both, fqn), "c")
        a, b = _factors(both.gm, fqn, "c")
        assert_close(a, peft_a)  # the factors are PEFT's ...
        assert_close(b, peft_b)
        ours = _delta(both.gm, fqn, "c")
        assert_close(ours, _delta(both.gm, fqn, "default"))  # ... and reproduce adapter a
        assert_close(_peft_layer(both, fqn).get_delta_weight("c"), ours * 8**0.5)


def test_svd_rank_above_layer_size_pads(tmp_path):
    """lin1 is 2 x 20: PEFT's rank-6 factors there have the wrong shape; lora_fx pads with zeros."""
    both = _build(PAIRS["mlp"], tmp_path)
    both.peft.add_weighted_adapter(["default", "b"], WEIGHTS, "s", "svd", svd_rank=6)
    add_weighted_adapter(both.gm, ["default", "b"], WEIGHTS, "s", "svd", svd_rank=6)
    assert tuple(_peft_factors(_peft_layer(both, "lin1"), "s")[1].shape) == (2, 2)  # not (2, 6)
    a, b = _factors(both.gm, "lin1", "s")
    assert a.shape == (6, 20) and b.shape == (2, 6) and not b[:, 2:].any()
    exact = WEIGHTS[0] * _delta(both.gm, "lin1", "default") + WEIGHTS[1] * _delta(
        both.gm, "lin1", "b"
    )
    assert_close(_delta(both.gm, "lin1", "s"), exact)
    assert_close(_delta(both.gm, "lin0", "s"), _peft_layer(both, "lin0").get_delta_weight("s"))
    lora_fx.set_adapter(both.gm, "s")
    both.gm(both.x)  # runs (PEFT's forward fails here)


class _Conv1d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(3, 6, 3, padding=1)

    def forward(self, x):
        return self.conv(x)


def test_conv1d_svd_is_exact():
    """PEFT runs a batched SVD on a Conv1d delta: B gets the wrong shape and its forward fails."""
    x = torch.randn(1, 3, 5)
    gm = lora_fx.capture(_Conv1d(), (x,), method="fx")
    cfg = {"r": 2, "target_modules": ["conv"], "init_lora_weights": False}
    lora_fx.inject(gm, lora_fx.LoraConfig(**cfg))
    lora_fx.inject(gm, lora_fx.LoraConfig(**cfg), "b")
    add_weighted_adapter(gm, ["default", "b"], WEIGHTS, "s", "svd", svd_rank=4)
    exact = WEIGHTS[0] * _delta(gm, "conv", "default") + WEIGHTS[1] * _delta(gm, "conv", "b")
    assert_close(_delta(gm, "conv", "s"), exact)
    lora_fx.set_adapter(gm, "s")
    with torch.no_grad():
        out = gm(x)
        with lora_fx.disable_adapters(gm):
            base = gm(x)
    assert_close(out - base, nn.functional.conv1d(x, exact, padding=1))


def test_per_site_ranks(tmp_path):
    """`b` (rank 8) covers lin0 only: cat ranks per site; linear refuses lin0; svd takes rank 8."""
    both = _build(PAIRS["mlp"], tmp_path, patch_b={"r": 8, "target_modules": ["lin0"]})
    both.peft.add_weighted_adapter(["default", "b"], WEIGHTS, "c", "cat")
    add_weighted_adapter(both.gm, ["default", "b"], WEIGHTS, "c", "cat")
    record = both.gm.meta["lora_fx"].adapters["c"]
    assert {f: s.r for f, s in record.sites.items()} == {"lin0": 12, "lin1": 4}  # PEFT: 12 and 12
    assert record.config.rank_pattern == {"lin1": 4} == record.config.alpha_pattern
    for fqn in ("lin0", "lin1"):
        assert_close(_delta(both.gm, fqn, "c"), _peft_layer(both, fqn).get_delta_weight("c"))
    with pytest.raises(
        lora_fx.AdapterError, match=r"on 'lin0' the ranks are \{'default': 4, 'b': 8\}"
    ):
        add_weighted_adapter(both.gm, ["default", "b"], WEIGHTS, "lin", "linear")
    add_weighted_adapter(both.gm, ["default", "b"], WEIGHTS, "s", "svd")
    assert {s.r for s in both.gm.meta["lora_fx"].adapters["s"].sites.values()} == {8}


def test_saved_combination_loads_in_peft(tmp_path):
    """The new adapter's config (rank_pattern included) round-trips through PEFT's loader."""
    both = _build(PAIRS["mlp"], tmp_path / "in", patch_b={"r": 2, "target_modules": ["lin0"]})
    add_weighted_adapter(both.gm, ["default", "b"], WEIGHTS, "c", "cat")
    lora_fx.save_adapter(both.gm, tmp_path / "out", adapter_name="c")
    lora_fx.set_adapter(both.gm, "c")
    torch.manual_seed(0)
    loaded = PeftModel.from_pretrained(PAIRS["mlp"].model().eval(), tmp_path / "out")
    with torch.no_grad():
        assert_close(loaded(both.x), both.gm(both.x))


def test_disjoint_adapters_with_different_ranks_combine_linearly():
    """PEFT compares each adapter's largest rank and refuses; per site there is nothing to mix."""
    gm = lora_fx.capture(TinyMLP(), (torch.randn(2, 10),), method="fx")
    lora_fx.inject(gm, lora_fx.LoraConfig(r=4, target_modules=["lin0"], init_lora_weights=False))
    lora_fx.inject(
        gm, lora_fx.LoraConfig(r=2, target_modules=["lin1"], init_lora_weights=False), "b"
    )
    add_weighted_adapter(gm, ["default", "b"], [0.5, 2.0], "n", "linear")
    assert {f: s.r for f, s in gm.meta["lora_fx"].adapters["n"].sites.items()} == {
        "lin0": 4,
        "lin1": 2,
    }
    assert_close(_delta(gm, "lin0", "n"), 0.5 * _delta(gm, "lin0", "default"))
    assert_close(_delta(gm, "lin1", "n"), 2.0 * _delta(gm, "lin1", "b"))


class _Nested(nn.Module):
    """`lin0` and `sub.lin0`: the name of one site ends the other's."""

    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(6, 6)
        self.sub = nn.Module()
        self.sub.lin0 = nn.Linear(6, 6)

    def forward(self, x):
        return self.sub.lin0(self.lin0(x))


def test_targets_are_exact_when_a_site_name_ends_another():
    gm = lora_fx.capture(_Nested(), (torch.randn(2, 6),), method="fx")
    lora_fx.inject(gm, lora_fx.LoraConfig(target_modules="lin0", init_lora_weights=False))
    lora_fx.inject(gm, lora_fx.LoraConfig(target_modules="lin0", init_lora_weights=False), "b")
    add_weighted_adapter(gm, ["default", "b"], [1.0, 1.0], "n", "cat")
    record = gm.meta["lora_fx"].adapters["n"]
    assert set(record.sites) == {"lin0"}  # a plain ["lin0"] would also take sub.lin0
    assert isinstance(record.config.target_modules, str)


def test_other_trainable_flags_are_kept(tmp_path):
    both = _build(PAIRS["mlp"], tmp_path)
    lora_fx.set_adapter(both.gm, "b")
    before = {n: p.requires_grad for n, p in both.gm.named_parameters()}
    add_weighted_adapter(both.gm, ["default", "b"], WEIGHTS, "n", "cat")
    after = {n: p.requires_grad for n, p in both.gm.named_parameters()}
    assert {n: after[n] for n in before} == before
    assert not any(after[n] for n in after if n not in before)  # the new adapter is frozen
    assert lora_fx.active_adapters(both.gm) == ["b"]


def test_modules_to_save_copy_is_not_combined():
    gm = lora_fx.capture(TinyMLP(), (torch.randn(2, 10),), method="fx")
    cfg = {"target_modules": ["lin0"], "init_lora_weights": False}
    lora_fx.inject(gm, lora_fx.LoraConfig(**cfg, modules_to_save=["lin1"]))
    lora_fx.inject(gm, lora_fx.LoraConfig(**cfg), "b")
    with pytest.warns(UserWarning, match=r"modules_to_save copies of \['lin1'\] are not part"):
        add_weighted_adapter(gm, ["default", "b"], [1.0, 1.0], "n", "cat")
    assert gm.meta["lora_fx"].adapters["n"].modules_to_save == []


# ------------------------------------------------------------- errors leave the graph unchanged


def _snapshot(gm: torch.fx.GraphModule) -> tuple:
    state = gm.meta["lora_fx"]
    params = {n: (p.detach().clone(), p.requires_grad) for n, p in gm.named_parameters()}
    return gm.code, list(state.adapters), list(state.active), params


def _assert_same(before: tuple, after: tuple) -> None:
    assert before[:3] == after[:3]
    assert before[3].keys() == after[3].keys()
    for name, (value, grad) in before[3].items():
        assert torch.equal(value, after[3][name][0]) and grad == after[3][name][1], name


class _Grouped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1, groups=2)

    def forward(self, x):
        return self.conv(x)


@pytest.fixture
def graph() -> torch.fx.GraphModule:
    """TinyMLP with rank-4 adapters `default` and `b`, a rank-8 `c`, `d` with lora_bias,
    and module copies of lin1 in `e` and `f`."""
    gm = lora_fx.capture(TinyMLP(), (torch.randn(2, 10),), method="fx")
    base = {"target_modules": ["lin0", "lin1"], "r": 4, "init_lora_weights": False}
    for name, extra in {
        "default": {},
        "b": {},
        "c": {"r": 8},
        "d": {"lora_bias": True},
        "e": {"target_modules": ["lin0"], "modules_to_save": ["lin1"]},
        "f": {"target_modules": ["lin0"], "modules_to_save": ["lin1"]},
    }.items():
        lora_fx.inject(gm, lora_fx.LoraConfig(**{**base, **extra}), name)
    return gm


_AB = (["default", "b"], [1.0, 1.0])
ERRORS = {
    "unknown": (
        (["default", "zz"], [1.0, 1.0], "n"),
        {},
        r"unknown adapter\(s\) \['zz'\]; adapters",
    ),
    "empty": (([], [], "n"), {}, "expected a non-empty list of adapter names"),
    "str": (("default", [1.0], "n"), {}, "expected a non-empty list of adapter names"),
    "lengths": ((["default", "b"], [1.0], "n"), {}, "give one weight per adapter"),
    "nan": ((["default", "b"], [1.0, float("nan")], "n"), {}, "expected finite numbers"),
    "exists": ((*_AB, "b"), {}, "adapter 'b' already exists"),
    "bad_name": ((*_AB, "new name"), {}, "expected a Python identifier"),
    "type": ((*_AB, "n"), {"combination_type": "mean"}, "combination_type='mean' is invalid"),
    "ranks": (
        (["default", "c"], [1.0, 1.0], "n"),
        {"combination_type": "ties", "density": 0.5},
        "needs equal ranks on each site",
    ),
    "no_density": ((*_AB, "n"), {"combination_type": "ties"}, "needs density in"),
    "density_range": (
        (*_AB, "n"),
        {"combination_type": "magnitude_prune", "density": 1.5},
        "needs density in",
    ),
    "dare_zero": (
        (*_AB, "n"),
        {"combination_type": "dare_linear", "density": 0.0},
        "rescales by 1/density",
    ),
    "sign_method": ((*_AB, "n"), {"majority_sign_method": "median"}, "majority_sign_method"),
    "svd_rank": ((*_AB, "n"), {"svd_rank": 0}, "svd_rank=0 is invalid"),
    "svd_clamp": ((*_AB, "n"), {"svd_clamp": 2}, "svd_clamp=2 is invalid"),
    "negative_clamp": ((*_AB, "n"), {"svd_clamp": 0.0}, "on site 'lin0': .* negative bound"),
    "driver_name": ((*_AB, "n"), {"svd_driver": "qr"}, "svd_driver='qr' is invalid"),
    "driver_cpu": ((*_AB, "n"), {"svd_driver": "gesvd"}, "works only for CUDA tensors"),
    "lora_bias": ((["default", "d"], [1.0, 1.0], "n"), {}, r"adapters \['d'\] have lora_bias"),
    "shared_copies": ((["e", "f"], [1.0, 1.0], "n"), {}, r"modules_to_save copies of \['lin1'\]"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_errors_leave_graph_unchanged(graph, case):
    args, kwargs, match = ERRORS[case]
    before = _snapshot(graph)
    with pytest.raises(lora_fx.AdapterError, match=match):
        add_weighted_adapter(graph, *args, **kwargs)
    _assert_same(before, _snapshot(graph))


def test_merged_adapter_refused(graph):
    lora_fx.merge(graph, ["default"])
    before = _snapshot(graph)
    with pytest.raises(lora_fx.AdapterError, match=r"adapters \['default'\] are merged; call"):
        add_weighted_adapter(graph, *_AB, "n")
    _assert_same(before, _snapshot(graph))


@pytest.mark.parametrize("combination_type", ["cat", "svd", "ties_svd"])
def test_grouped_conv_refused_for_cat_and_svd(combination_type):
    gm = lora_fx.capture(_Grouped(), (torch.randn(1, 4, 5, 5),), method="fx")
    cfg = {"r": 4, "target_modules": ["conv"], "init_lora_weights": False}
    lora_fx.inject(gm, lora_fx.LoraConfig(**cfg))
    lora_fx.inject(gm, lora_fx.LoraConfig(**cfg), "b")
    before = _snapshot(gm)
    with pytest.raises(lora_fx.AdapterError, match=r"cannot combine grouped-conv sites \['conv'\]"):
        add_weighted_adapter(gm, *_AB, "n", combination_type, **_options(combination_type, 4))
    _assert_same(before, _snapshot(gm))
    add_weighted_adapter(gm, ["b"], [2.0], "n", "linear")  # factor types keep the group structure
    assert_close(_delta_grouped(gm, "n"), 2.0 * _delta_grouped(gm, "b"))


def _delta_grouped(gm: torch.fx.GraphModule, name: str) -> torch.Tensor:
    """The output a grouped-conv adapter adds (its delta is not one weight)."""
    lora_fx.set_adapter(gm, name)
    x = torch.ones(1, 4, 5, 5)
    with torch.no_grad():
        out = gm(x)
        with lora_fx.disable_adapters(gm):
            return out - gm(x)


def test_no_adapter_on_graph():
    gm = lora_fx.capture(TinyMLP(), (torch.randn(2, 10),), method="fx")
    with pytest.raises(lora_fx.AdapterError, match="has no LoRA adapter"):
        add_weighted_adapter(gm, ["a"], [1.0], "n")


def test_unused_options_warn(graph):
    with pytest.warns(UserWarning, match="density=0.5 is ignored by combination_type='cat'"):
        add_weighted_adapter(graph, *_AB, "n", "cat", density=0.5)
    with pytest.warns(UserWarning, match="svd_rank=2 is ignored by combination_type='linear'"):
        add_weighted_adapter(graph, *_AB, "m", "linear", svd_rank=2)
