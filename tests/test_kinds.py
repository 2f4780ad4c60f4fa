"""The site-kind table: each entry agrees with itself, and checks read its flags, not kind names."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from models import SITE_CASES, TinyMha, TinyMoE

import lora_fx
from lora_fx import LoraConfig, UnsupportedSiteError
from lora_fx.sites import all_sites
from lora_fx.sites.kinds import KINDS, kind_of
from lora_fx.sites.params import find_param_sites
from lora_fx.sites.tokens import find_token_sites


def _sites_of_every_kind():
    sites = []
    for case in SITE_CASES.values():
        gm = lora_fx.capture(case.model().eval(), (case.make_input(),))
        sites += list(all_sites(gm).values())
    moe = TinyMoE().eval()
    gm = lora_fx.capture(moe, (torch.randn(6, 8),))
    sites += find_param_sites(gm, ["gate_up_proj"])
    sites += list(all_sites(lora_fx.capture(TinyMha().eval(), (torch.randn(3, 4, 10),))).values())
    case = SITE_CASES["embedding"]
    gm = lora_fx.capture(case.model().eval(), (case.make_input(),))
    tokens = LoraConfig(trainable_token_indices={"emb": [1, 2]})
    sites += find_token_sites(gm, tokens, all_sites(gm))
    return sites


def test_the_cases_cover_every_kind():
    assert {site.kind for site in _sites_of_every_kind()} == set(KINDS)


@pytest.mark.parametrize("r", [1, 4])
def test_new_factors_have_the_shapes_and_holders_the_kind_declares(r):
    for site in _sites_of_every_kind():
        kind = kind_of(site)
        factors = kind.new_factors(site, r, False, True)
        assert len(factors) == len(kind.holders), site.fqn
        shapes = tuple(
            tuple((t.weight if isinstance(t, torch.nn.Module) else t).shape) for t in factors
        )
        assert shapes == kind.factor_shapes(site, r), site.fqn
        paths = kind.paths(site.fqn, "x")
        assert paths.a.split(".")[-3 if kind.factor_suffix else -2] == kind.holders[0]
        assert paths.a_key.endswith(f"{kind.holders[0]}{kind.factor_suffix}")


def test_delta_of_a_kind_matches_its_fold_view():
    """`fold_factors` (merge's in-place view) and `delta` (merge's value) agree on every kind."""
    for site in _sites_of_every_kind():
        kind = kind_of(site)
        if kind.can.branch_at == "rows":
            continue  # trainable tokens replace rows: no additive delta (`_fold` writes them)
        a, b = (torch.randn(s, dtype=torch.float64) for s in kind.factor_shapes(site, 2))
        shape = kind.delta(site, a, b, 1.0, _weight_shape(site)).shape
        weight = torch.zeros(shape, dtype=torch.float64)
        view = kind.fold_factors(site, weight, a, b)
        if view is None:
            continue
        w, left, right = view
        w.add_(left @ right)
        torch.testing.assert_close(weight, kind.delta(site, a, b, 1.0, tuple(shape)))


def _weight_shape(site):
    if site.kind == "param":
        return (site.experts, site.out_features, site.in_features)
    if site.kind == "conv":
        return (site.out_features, site.in_features, *site.conv.kernel_size)
    if site.kind == "embedding":
        return (site.in_features, site.out_features)
    return (
        (site.in_features, site.out_features)
        if site.transposed
        else (site.out_features, site.in_features)
    )


def test_checks_read_the_kind_flags(monkeypatch):
    """Turn DoRA off for linear sites in the table: inject refuses it, naming the site."""
    case = SITE_CASES["mlp"]
    gm = lora_fx.capture(case.model().eval(), (case.make_input(),))
    linear = KINDS["linear"]
    monkeypatch.setitem(
        KINDS,
        "linear",
        dataclasses.replace(linear, can=dataclasses.replace(linear.can, dora=False)),
    )
    with pytest.raises(
        UnsupportedSiteError, match=r"use_dora=True is not supported on linear site 'lin0'"
    ):
        lora_fx.inject(gm, LoraConfig(target_modules=["lin0"], use_dora=True))
    monkeypatch.undo()
    lora_fx.inject(gm, LoraConfig(target_modules=["lin0"], use_dora=True))


def test_a_kind_without_the_fused_layout_gets_plain_branches(monkeypatch):
    case = SITE_CASES["mlp"]
    gm = lora_fx.capture(case.model().eval(), (case.make_input(),))
    x = case.make_input()
    lora_fx.inject(gm, LoraConfig(target_modules=["lin0"], init_lora_weights=False))
    fused = gm(x)
    linear = KINDS["linear"]
    plain_only = dataclasses.replace(linear.can, layouts=("plain",), fused_branch=False)
    monkeypatch.setitem(KINDS, "linear", dataclasses.replace(linear, can=plain_only))
    lora_fx.set_adapter(gm, "default")  # branches rebuilt from the table: the plain op order
    roles = {n.meta["lora_fx"]["role"] for n in gm.graph.nodes if "lora_fx" in n.meta}
    assert {"lora_a", "lora_b", "scale", "add"} <= roles
    torch.testing.assert_close(gm(x), fused)
