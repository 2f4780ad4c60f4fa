"""In-place merge: `ops.add_low_rank_` and the `_fold` fast path, numerics, rounding and memory.

The memory probe is a TorchDispatchMode that records the largest tensor any op allocates during a
call (an output that shares storage with an input, such as `addmm_`'s, is not an allocation). It
sees dispatched ops only, not scratch memory inside a kernel; benchmarks/bench_merge.py measures
that too, with the profiler.
"""

import copy
import math

import peft
import pytest
import torch
from conftest import assert_close, assert_differs
from models import METHODS, SITE_CASES, tiny_gpt2, tiny_llama
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

import lora_fx
from lora_fx import LoraConfig
from lora_fx.core import graph as _graph
from lora_fx.core.state import state_or_none
from lora_fx.math import ops
from lora_fx.passes import _fold
from lora_fx.sites import all_sites

BF16 = torch.bfloat16


# ------------------------------------------------------------------------------ ops.add_low_rank_


def test_add_low_rank_hand_checked():
    w = torch.zeros(2, 3)
    left = torch.tensor([[1.0], [2.0]])  # [m=2, r=1]
    right = torch.tensor([[1.0, 0.0, 3.0]])  # [r=1, n=3]
    assert ops.add_low_rank_(w, left, right, 2.0) == 0.0  # float32 weight: exact in-place add
    assert torch.equal(w, torch.tensor([[2.0, 0.0, 6.0], [4.0, 0.0, 12.0]]))


@pytest.mark.parametrize("dtype", [torch.float32, BF16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_add_low_rank_reports_nan_for_a_non_finite_delta(dtype, bad):
    w = torch.zeros(2, 3, dtype=dtype)
    left = torch.tensor([[1.0], [bad]])  # [m=2, r=1]: row 1 of the delta is not finite
    right = torch.tensor([[1.0, 0.0, 3.0]])  # [r=1, n=3]
    loss = ops.add_low_rank_(w, left, right, 1.0)
    assert math.isnan(loss)
    assert torch.equal(w[0].float(), right[0]) and not torch.isfinite(w[1, [0, 2]]).any()


@pytest.mark.parametrize("layout", ["plain", "transposed", "experts"])
def test_add_low_rank_float32_matches_reference_and_takes_back_out(layout):
    a, b = torch.randn(4, 30), torch.randn(20, 4)  # A [r, in], B [out, r]
    if layout == "plain":
        w, left, right = torch.randn(20, 30), b, a  # W[out, in] += B @ A
    elif layout == "transposed":
        w, left, right = torch.randn(30, 20), a.T, b.T  # W[in, out] += A.T @ B.T (strided views)
    else:
        w, left, right = torch.randn(3, 20, 30), torch.randn(3, 20, 4), torch.randn(3, 4, 30)
    before = w.clone()
    assert ops.add_low_rank_(w, left, right, 0.5) == 0.0
    assert_close(w, before + 0.5 * left @ right)
    ops.add_low_rank_(w, left, right, -0.5)
    assert_close(w, before)


@pytest.mark.parametrize("experts", [None, 3], ids=["2d", "experts"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_add_low_rank_low_precision_rounds_once_per_element(dtype, experts):
    lead = () if experts is None else (experts,)
    w0 = torch.randn(*lead, 37, 64).to(dtype)
    left, right = torch.randn(*lead, 37, 4), torch.randn(*lead, 4, 64)
    w = w0.clone()
    # two scratch buffers of 16 float32 rows (of 64, times the experts): chunks of 16, 16, 5 rows
    loss = ops.add_low_rank_(w, left, right, 0.01, chunk_bytes=2 * 16 * 64 * 4 * (experts or 1))
    exact = w0.float() + 0.01 * left @ right
    rounded = exact.to(dtype)
    # Each element is the float32 sum rounded once: at most one ulp from it (bitwise on MKL/oneDNN;
    # another BLAS may order the r-term dot products differently).
    ulp = (rounded.float().abs() * torch.finfo(dtype).eps).clamp_min(torch.finfo(dtype).tiny)
    assert ((w.float() - rounded.float()).abs() <= ulp).all()
    assert (w == rounded).float().mean() > 0.99
    delta = exact - w0.float()
    expected_loss = torch.linalg.vector_norm(w.float() - exact) / torch.linalg.vector_norm(delta)
    assert loss == pytest.approx(float(expected_loss), rel=1e-3)
    assert 0 < loss < 1
    # PEFT rounds the delta to the weight dtype first, then rounds the sum again: never closer.
    peft_style = w0 + (left @ right * 0.01).to(dtype)
    peft_err = torch.linalg.vector_norm(peft_style.float() - exact)
    assert torch.linalg.vector_norm(w.float() - exact) <= peft_err


def test_add_low_rank_float64_factors_accumulate_in_float64():
    w0 = torch.randn(10, 12)
    left, right = torch.randn(10, 3, dtype=torch.float64), torch.randn(3, 12, dtype=torch.float64)
    w = w0.clone()
    loss = ops.add_low_rank_(w, left, right, 0.3, chunk_bytes=2 * 4 * 12 * 8)  # 4-row chunks
    assert torch.equal(w, (w0.double() + 0.3 * left @ right).float())
    assert 0 < loss < 1e-6  # only the float32 store rounds


def test_add_low_rank_zero_delta_or_empty_weight_reports_zero():
    w = torch.randn(6, 5).to(BF16)
    before = w.clone()
    assert ops.add_low_rank_(w, torch.zeros(6, 2), torch.randn(2, 5), 1.0) == 0.0
    assert torch.equal(w, before)
    assert (
        ops.add_low_rank_(torch.zeros(0, 5, dtype=BF16), torch.zeros(0, 2), w[:2].float(), 1.0)
        == 0.0
    )


# ------------------------------------------------------------------------------ merge on graphs


def _site_weights(gm):
    """{site fqn: (weight tensor, full-size float32 delta by the reference math)} of 'default'."""
    state, sites = state_or_none(gm), all_sites(gm)
    out = {}
    for fqn, rec in state.adapters["default"].sites.items():
        site = sites[fqn]
        out[fqn] = (
            _graph.get_attr(gm, site.weight),
            _fold.site_delta(gm, site, "default", rec),
        )
    return out


_GRAPHS = {
    **{name: (c.model, c.make_input, {}, c.targets) for name, c in SITE_CASES.items()},
    "gpt2": (
        tiny_gpt2,
        lambda: torch.randint(0, 256, (1, 8)),
        {"use_cache": False},
        ["c_attn", "c_proj", "c_fc"],
    ),
    "llama": (
        tiny_llama,
        lambda: torch.randint(0, 256, (1, 8)),
        {"use_cache": False},
        "all-linear",
    ),
}


def _logits(out):
    return out.logits if hasattr(out, "logits") else out


# transformers models need method="export"
_GRAPH_CASES = [(c, m) for c in SITE_CASES for m in METHODS] + [
    ("gpt2", "export"),
    ("llama", "export"),
]


@pytest.mark.parametrize(("case", "method"), _GRAPH_CASES)
def test_merge_equals_full_delta_and_unmerge_restores(case, method):
    cls, make_x, kwargs, targets = _GRAPHS[case]
    model, x = cls().eval(), make_x()
    gm = lora_fx.capture(model, (x,), kwargs, method=method)
    base = _logits(gm(x)).detach()
    lora_fx.inject(gm, LoraConfig(target_modules=targets, init_lora_weights=False))
    adapted = _logits(gm(x)).detach()
    assert_differs(adapted, base)
    sites = _site_weights(gm)
    before = {fqn: w.detach().clone() for fqn, (w, _) in sites.items()}
    lora_fx.merge(gm)
    report = lora_fx.merge_report(gm)
    for fqn, (weight, delta) in sites.items():
        assert_close(weight, before[fqn] + delta)  # what the full-size fold wrote before
        assert report[f"default:{fqn}"] == 0.0  # float32 weights: added in place
    assert_close(_logits(gm(x)), adapted)
    lora_fx.unmerge(gm)
    for fqn, (weight, _) in sites.items():
        assert_close(weight, before[fqn])
    assert_close(_logits(gm(x)), adapted)


def test_bf16_merge_is_closer_to_exact_than_peft(tmp_path):
    # PEFT with bf16 adapters (autocast_adapter_dtype=False) rounds B @ A to bf16, then the sum.
    model, ids = tiny_llama().to(BF16).eval(), torch.randint(0, 256, (1, 8))
    gm = lora_fx.capture(copy.deepcopy(model), (ids,), {"use_cache": False})
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    pm = peft.get_peft_model(model, cfg, autocast_adapter_dtype=False).eval()
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.mul_(0.05)  # a delta small next to W, as after short training: rounding shows
    pm.save_pretrained(tmp_path)
    lora_fx.inject(gm, LoraConfig.from_json(str(tmp_path / "adapter_config.json")),
                   autocast_adapter_dtype=False)  # fmt: skip
    lora_fx.load_adapter(gm, tmp_path)
    sites = _site_weights(gm)
    exact = {fqn: w.float() + delta for fqn, (w, delta) in sites.items()}
    lora_fx.merge(gm)
    report = lora_fx.merge_report(gm)
    merged = pm.merge_and_unload()
    ours_sq = peft_sq = 0.0
    for fqn, (weight, delta) in sites.items():
        peft_weight = merged.get_submodule(fqn).weight.detach()
        assert_close(weight, peft_weight, dtype=BF16)
        ours = torch.linalg.vector_norm(weight.float() - exact[fqn])
        theirs = torch.linalg.vector_norm(peft_weight.float() - exact[fqn])
        assert ours <= theirs, fqn
        loss = float(ours / torch.linalg.vector_norm(delta))
        assert report[f"default:{fqn}"] == pytest.approx(loss, rel=1e-2, abs=1e-6)
        ours_sq, peft_sq = ours_sq + float(ours) ** 2, peft_sq + float(theirs) ** 2
    assert ours_sq < peft_sq


# ------------------------------------------------------------------------------ memory probe


class _LargestAllocation(TorchDispatchMode):
    """Records the largest tensor storage any op allocates while the mode is on."""

    def __init__(self):
        super().__init__()
        self.bytes, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {
            t.untyped_storage().data_ptr()
            for t in pytree.tree_leaves((args, kwargs))
            if isinstance(t, torch.Tensor)
        }
        for t in pytree.tree_leaves(out):
            new = isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs
            if new and t.untyped_storage().nbytes() > self.bytes:
                self.bytes, self.op = t.untyped_storage().nbytes(), func
        return out


class _Wide(nn.Module):
    """Big enough sites of every fast-path layout: embedding, linear, Conv1D [in, out], conv."""

    def __init__(self):
        from transformers.pytorch_utils import Conv1D

        super().__init__()
        self.emb = nn.Embedding(2048, 256)  # [num, dim]: 2 MiB in float32
        self.lin = nn.Linear(256, 1024)  # 1 MiB
        self.c1d = Conv1D(1024, 1024)  # stored [in, out]: 4 MiB
        self.conv = nn.Conv2d(256, 256, 3, padding=1)  # 2.25 MiB

    def forward(self, ids):
        h = self.c1d(self.lin(self.emb(ids)))  # [B, T, 1024]
        return self.conv(h.reshape(-1, 256, 2, 2)).sum()


_WIDE_TARGETS = ["emb", "lin", "c1d", "conv"]
_SMALLEST_SITE = 256 * 1024  # elements of `lin`, the smallest site weight
_CHUNK = 128 << 10


def _wide(dtype):
    gm = lora_fx.capture(_Wide().to(dtype).eval(), (torch.randint(0, 2048, (2, 8)),))
    lora_fx.inject(gm, LoraConfig(target_modules=_WIDE_TARGETS, r=4, init_lora_weights=False))
    return gm


def _probe(fn, gm):
    probe = _LargestAllocation()
    with probe:
        fn(gm)
    return probe


_STEPS = {
    "merge": (lambda gm: None, lora_fx.merge),
    "unmerge": (lora_fx.merge, lora_fx.unmerge),
    "merge_and_unload": (lambda gm: None, lora_fx.merge_and_unload),
}


@pytest.mark.parametrize("dtype", [torch.float32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("step", list(_STEPS))
def test_fold_allocates_no_full_size_temporary(step, dtype, monkeypatch):
    monkeypatch.setattr(ops, "MERGE_CHUNK_BYTES", _CHUNK)
    gm = _wide(dtype)
    setup, call = _STEPS[step]
    setup(gm)
    before = {fqn: w.detach().clone() for fqn, (w, _) in _site_weights(gm).items()}
    probe = _probe(call, gm)
    site_bytes = _SMALLEST_SITE * dtype.itemsize
    # float32: addmm_ writes W directly (only r-wide factors may be cast); bf16: the chunk scratch
    limit = site_bytes // 8 if dtype == torch.float32 else _CHUNK
    assert probe.bytes <= limit, (probe.op, probe.bytes)
    assert limit < site_bytes
    changed = {fqn: not torch.equal(_graph.get_attr(gm, f"{fqn}.weight"), w)
               for fqn, w in before.items()}  # fmt: skip
    assert all(changed.values()), changed


def test_probe_sees_a_full_size_delta():
    # Positive control: safe_merge computes each merged weight in a full-size copy first.
    gm = _wide(torch.float32)
    probe = _probe(lambda gm: lora_fx.merge(gm, safe_merge=True), gm)
    assert probe.bytes >= _SMALLEST_SITE * 4
