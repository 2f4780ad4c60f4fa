import pytest
import torch

from lora_fx.math import ops


def test_linear_delta_hand_checked():
    a = torch.tensor([[1.0, 2.0, 0.0]])  # [r=1, in=3]
    b = torch.tensor([[1.0], [3.0]])  # [out=2, r=1]
    expected = torch.tensor([[1.0, 2.0, 0.0], [3.0, 6.0, 0.0]]) * 0.5
    torch.testing.assert_close(ops.delta_weight("linear", a, b, 0.5), expected)
    torch.testing.assert_close(ops.delta_weight("linear", a, b, 0.5, transposed=True), expected.T)


def test_embedding_delta_hand_checked():
    a = torch.tensor([[1.0, 0.0, 2.0]])  # [r=1, num=3]
    b = torch.tensor([[2.0], [1.0]])  # [dim=2, r=1]
    expected = torch.tensor([[2.0, 1.0], [0.0, 0.0], [4.0, 2.0]])  # [num, dim]
    torch.testing.assert_close(ops.delta_weight("embedding", a, b, 1.0), expected)


def test_conv_1x1_delta_hand_checked():
    a = torch.tensor([[1.0, 2.0]]).reshape(1, 2, 1, 1)  # [r=1, in=2, 1, 1]
    b = torch.tensor([[3.0], [1.0]]).reshape(2, 1, 1, 1)  # [out=2, r=1, 1, 1]
    expected = torch.tensor([[3.0, 6.0], [1.0, 2.0]]).reshape(2, 2, 1, 1)
    torch.testing.assert_close(ops.delta_weight("conv", a, b, 1.0), expected)


def test_conv_kxk_delta_equals_composed_convs():
    a, b = torch.randn(4, 3, 3, 3), torch.randn(5, 4, 1, 1)
    x = torch.randn(2, 3, 8, 8)
    composed = torch.nn.functional.conv2d(torch.nn.functional.conv2d(x, a, padding=1), b)
    folded = torch.nn.functional.conv2d(x, ops.delta_weight("conv", a, b, 1.0), padding=1)
    torch.testing.assert_close(folded, composed, atol=1e-4, rtol=1e-4)


def test_grouped_conv_refused():
    with pytest.raises(ValueError, match="groups=2 cannot be merged"):
        ops.delta_weight("conv", torch.randn(2, 4, 3, 3), torch.randn(4, 1, 1, 1), 1.0, groups=2)


def test_unknown_kind_refused():
    with pytest.raises(ValueError, match="unknown site kind 'lstm'"):
        ops.delta_weight("lstm", torch.randn(1, 1), torch.randn(1, 1), 1.0)


def test_delta_is_float32_for_bf16_inputs():
    a = torch.randn(2, 4, dtype=torch.bfloat16)
    assert ops.delta_weight("linear", a, a.T.contiguous(), 1.0).dtype == torch.float32


def test_rounding_error_hand_checked():
    before = torch.zeros(2)
    delta = torch.tensor([1.0, 1.0])
    assert ops.rounding_error(before, torch.tensor([1.0, 1.0]), delta) == 0.0
    assert ops.rounding_error(before, torch.tensor([1.0, 0.0]), delta) == pytest.approx(2**-0.5)
    assert ops.rounding_error(before, before, torch.zeros(2)) == 0.0
