"""lora_fx.math.combine: hand-checked small matrices for each function; PEFT's merge_utils as oracle."""

import pytest
import torch
from peft.utils import merge_utils

from lora_fx.math import combine


def _t(*rows):
    return torch.tensor(rows, dtype=torch.float32)


# ------------------------------------------------------------------ pruning and sign election


def test_prune_magnitude_keeps_largest_entries():
    t = _t([1, -4], [3, -2])
    torch.testing.assert_close(combine.prune_magnitude(t, 0.5), _t([0, -4], [3, 0]))
    torch.testing.assert_close(combine.prune_magnitude(t, 0.0), _t([0, 0], [0, 0]))
    assert combine.prune_magnitude(t, 1.0) is t


def test_prune_random_drops_and_rescales():
    t = torch.full((100, 100), 3.0)
    pruned = combine.prune_random(t, 0.25)
    assert set(pruned.unique().tolist()) == {0.0, 12.0}  # dropped, or 3 / 0.25
    assert abs((pruned != 0).float().mean().item() - 0.25) < 0.03  # 10k Bernoulli(0.25) draws


def test_prune_random_density_one_draws_nothing():
    t = _t([1, 2])
    before = torch.get_rng_state()
    assert combine.prune_random(t, 1.0) is t
    assert torch.equal(torch.get_rng_state(), before)


def test_prune_random_mask_is_bernoulli_from_global_rng():
    t = _t([1, 2, 3, 4], [5, 6, 7, 8])
    torch.manual_seed(3)
    expected = t * torch.bernoulli(torch.full_like(t, 0.5)) / 0.5
    torch.manual_seed(3)
    torch.testing.assert_close(combine.prune_random(t, 0.5), expected)


def test_majority_sign_mask_total_and_frequency():
    stacked = _t([1, -2, 3], [-4, 1, -1])
    # total: column sums -3, -1, 2 -> elected signs -, -, +
    expected_total = torch.tensor([[False, True, True], [True, False, False]])
    assert torch.equal(combine.majority_sign_mask(stacked, "total"), expected_total)
    # frequency: one + and one - per column -> a tie elects +
    expected_freq = torch.tensor([[True, False, True], [False, True, False]])
    assert torch.equal(combine.majority_sign_mask(stacked, "frequency"), expected_freq)
    with pytest.raises(ValueError, match="majority_sign_method='median' is invalid"):
        combine.majority_sign_mask(stacked, "median")


def test_disjoint_merge_averages_kept_entries():
    stacked = _t([2, -2, 3], [4, 1, -1])
    mask = torch.tensor([[True, False, True], [True, False, False]])
    # kept sums 6, 0, 3 over counts 2, 0 (-> 1), 1
    torch.testing.assert_close(combine.disjoint_merge(stacked, mask), _t(3, 0, 3))


# ------------------------------------------------------------------ merges


def test_task_arithmetic_hand_checked():
    t1, t2 = _t([1, 2], [3, 4]), _t([10, 20], [30, 40])
    out = combine.task_arithmetic([t1, t2], torch.tensor([1.0, 0.5]))
    torch.testing.assert_close(out, _t([6, 12], [18, 24]))


def test_magnitude_prune_hand_checked():
    t1, t2 = _t(4, -1, 2, 0), _t(-2, 3, 1, 1)
    # pruned at 0.5: [4, 0, 2, 0] and [-2, 3, 0, 0]; weights 1 and 2
    out = combine.magnitude_prune([t1, t2], torch.tensor([1.0, 2.0]), 0.5)
    torch.testing.assert_close(out, _t(0, 6, 2, 0))


def test_ties_hand_checked():
    t1, t2 = _t(4, -1, 2, 0), _t(-2, 3, 1, 1)
    # pruned: [4, 0, 2, 0], [-2, 3, 0, 0]; sums 2, 3, 2, 0 elect + everywhere, so t2's -2 drops;
    # weighted [4, 0, 2, 0], [-4, 6, 0, 0]; kept entries averaged: 4, 6, 2, 0
    out = combine.ties([t1, t2], torch.tensor([1.0, 2.0]), 0.5)
    torch.testing.assert_close(out, _t(4, 6, 2, 0))


def test_dare_types_without_dropping_hand_checked():
    t1, t2 = _t(4, -1), _t(-2, 3)
    weights = torch.tensor([1.0, 1.0])
    torch.testing.assert_close(combine.dare_linear([t1, t2], weights, 1.0), _t(2, 2))
    # sums 2, 2 elect +: keep 4 and 3
    torch.testing.assert_close(combine.dare_ties([t1, t2], weights, 1.0), _t(4, 3))


def test_merge_tensors_dispatch_and_errors():
    t1, t2 = _t(4, -1), _t(-2, 3)
    weights = torch.tensor([1.0, 1.0])
    torch.testing.assert_close(combine.merge_tensors("linear", [t1, t2], weights), _t(2, 2))
    torch.testing.assert_close(
        combine.merge_tensors("ties", [t1, t2], weights, density=1.0), _t(4, 3)
    )
    with pytest.raises(ValueError, match="unknown merge 'mean'"):
        combine.merge_tensors("mean", [t1, t2], weights)
    with pytest.raises(ValueError, match="merge 'ties' needs a density"):
        combine.merge_tensors("ties", [t1, t2], weights)


@pytest.mark.parametrize("method", ["total", "frequency"])
def test_merges_equal_peft_merge_utils(method):
    tensors = [torch.randn(6, 5) for _ in range(3)]
    weights = torch.tensor([0.7, -0.3, 1.2])
    for name, ours, theirs, kw in [
        ("linear", combine.task_arithmetic, merge_utils.task_arithmetic, {}),
        ("magnitude_prune", combine.magnitude_prune, merge_utils.magnitude_prune, {"density": 0.4}),
        ("ties", combine.ties, merge_utils.ties, {"density": 0.4, "majority_sign_method": method}),
        ("dare_linear", combine.dare_linear, merge_utils.dare_linear, {"density": 0.4}),
        (
            "dare_ties",
            combine.dare_ties,
            merge_utils.dare_ties,
            {"density": 0.4, "majority_sign_method": method},
        ),
    ]:
        torch.manual_seed(7)
        expected = theirs(tensors, weights, **kw)
        torch.manual_seed(7)
        torch.testing.assert_close(ours(tensors, weights, **kw), expected, msg=name)


# ------------------------------------------------------------------ factors


def test_combine_factors_linear_hand_checked():
    a1, a2 = _t([1, 2]), _t([3, 4])  # [r=1, in=2]
    b1, b2 = _t([1], [0]), _t([0], [1])  # [out=2, r=1]
    # c = w * s = [1 * 4, -1 * 1] -> A weights sign * sqrt|c| = [2, -1], B weights sqrt|c| = [2, 1]
    a, b = combine.combine_factors("linear", [a1, a2], [b1, b2], [1.0, -1.0], [4.0, 1.0])
    torch.testing.assert_close(a, _t([-1, 0]))  # 2 * [1, 2] - [3, 4]
    torch.testing.assert_close(b, _t([2], [1]))  # 2 * [1, 0] + [0, 1]


def test_combine_factors_one_adapter_is_exact_and_keeps_dtype():
    a1, b1 = _t([1, 2]).bfloat16(), _t([3], [1]).bfloat16()
    a, b = combine.combine_factors("linear", [a1], [b1], [-2.0], [2.0])  # c = -4: A * -2, B * 2
    assert a.dtype == b.dtype == torch.bfloat16
    torch.testing.assert_close((b.float() @ a.float()), -4 * (b1.float() @ a1.float()))


def test_concat_factors_hand_checked():
    a1, a2 = _t([1, 2]), _t([3, 4], [5, 6])  # ranks 1 and 2
    b1, b2 = _t([1], [2]), _t([1, 0], [0, 1])
    a, b = combine.concat_factors([a1, a2], [b1, b2], [2.0, 1.0], [0.5, 3.0])
    torch.testing.assert_close(a, _t([1, 2], [9, 12], [15, 18]))  # [1 * A1; 3 * A2]
    torch.testing.assert_close(b, _t([1, 1, 0], [2, 0, 1]))
    # B'A' = 1 * B1 A1 + 3 * B2 A2 = [[1, 2], [2, 4]] + [[9, 12], [15, 18]]
    torch.testing.assert_close(b @ a, _t([10, 14], [17, 22]))


def test_to_matrix_layouts():
    conv = torch.arange(12.0).reshape(2, 3, 2, 1)  # [out, in, kh, kw]
    torch.testing.assert_close(combine.to_matrix("conv", conv), torch.arange(12.0).reshape(2, 6))
    emb = _t([1, 2], [3, 4], [5, 6])  # [num=3, dim=2] -> [dim, num]
    torch.testing.assert_close(combine.to_matrix("embedding", emb), emb.T)
    lin = _t([1, 2, 3])
    assert combine.to_matrix("linear", lin) is lin
    torch.testing.assert_close(combine.to_matrix("linear", lin, transposed=True), lin.T)


def test_svd_factors_truncate_hand_checked():
    a, b = combine.svd_factors(_t([3, 0], [0, 1]), 1)
    assert a.shape == (1, 2) and b.shape == (2, 1)
    torch.testing.assert_close(b @ a, _t([3, 0], [0, 0]))  # the largest singular direction
    torch.testing.assert_close(a.abs(), _t([1, 0]))
    torch.testing.assert_close(b.abs(), _t([3], [0]))


@pytest.mark.parametrize("full_matrices", [True, False])
def test_svd_factors_pad_when_rank_exceeds_matrix(full_matrices):
    matrix = _t([2, 0, 1])  # [out=1, in=3]: one singular value
    a, b = combine.svd_factors(matrix, 3, full_matrices=full_matrices)
    assert a.shape == (3, 3) and b.shape == (1, 3)
    torch.testing.assert_close(b @ a, matrix)
    assert not a[1:].any() and not b[:, 1:].any()


def test_svd_factors_clamp_hand_checked():
    # [[1, -1], [-1, 1]] = 2 u v^T, u = v = [1, -1] / sqrt2 (up to one sign): B' = ±[1.414, -1.414],
    # A' = ±[0.707, -0.707]. The 0.75-quantile of the sorted entries [-1.414, -0.707, 0.707, 1.414]
    # is 0.707 + 0.25 * 0.707 = 1.25 * 0.707, which clamps B' and leaves A'.
    a, b = combine.svd_factors(_t([1, -1], [-1, 1]), 1, clamp=0.75)
    torch.testing.assert_close(b.abs(), torch.full((2, 1), 1.25 * 0.5**0.5))
    torch.testing.assert_close(b @ a, 0.625 * _t([1, -1], [-1, 1]))


def test_svd_factors_negative_clamp_bound_refused():
    with pytest.raises(ValueError, match="negative bound"):
        combine.svd_factors(_t([1, -1], [-1, 1]), 1, clamp=0.25)
