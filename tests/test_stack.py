"""`math/stack.py`: adapters stacked into slots and the per-row gathered delta, by hand."""

import functools

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close

from lora_fx.math.stack import (
    gathered_conv,
    gathered_embedding,
    gathered_linear,
    slot_rows,
    stack_adapters,
)


def test_stack_adapters_pads_folds_scales_and_zeroes_empty_slots():
    a0, b0 = torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0], [3.0]])  # r=1, in 2, out 2
    a2 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # r=2
    b2 = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    a, b = stack_adapters([a0, None, a2], [b0, None, b2], [2.0, 5.0, 0.5], 2)
    assert a.tolist() == [
        [[1.0, 2.0], [0.0, 0.0]],
        [[0.0, 0.0], [0.0, 0.0]],
        [[1.0, 0.0], [0.0, 1.0]],
    ]
    assert b.tolist() == [
        [[2.0, 0.0], [6.0, 0.0]],
        [[0.0, 0.0], [0.0, 0.0]],
        [[0.5, 1.0], [1.5, 2.0]],
    ]


def test_stack_adapters_errors():
    with pytest.raises(ValueError, match="every slot is empty; pass a_shape and b_shape"):
        stack_adapters([None], [None], [1.0], 2)
    with pytest.raises(ValueError, match="cannot pad rank 2 down to 1"):
        stack_adapters([torch.ones(2, 3)], [torch.ones(3, 2)], [1.0], 1)
    a, b = stack_adapters([None], [None], [0.0], 2, a_shape=(2, 3), b_shape=(4, 2))
    assert a.shape == (1, 2, 3) and b.shape == (1, 4, 2) and not a.any() and not b.any()


def test_gathered_linear_each_row_uses_its_slot():
    a, b = stack_adapters(
        [torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]), None],
        [torch.tensor([[1.0], [1.0]]), torch.tensor([[2.0], [0.0]]), None],
        [1.0, 1.0, 0.0],
        1,
    )
    x = torch.tensor([[[3.0, 4.0]], [[3.0, 4.0]], [[3.0, 4.0]]])  # [batch 3, m 1, in 2]
    y = torch.ones(3, 1, 2)
    index = torch.tensor([1, 0, 2])  # row 2: the zero slot (base model)
    out = gathered_linear(y, x, index, a.transpose(1, 2), b.transpose(1, 2))
    assert out.tolist() == [[[9.0, 1.0]], [[4.0, 4.0]], [[1.0, 1.0]]]


def test_gathered_linear_flattened_rows_and_gradients():
    a = torch.randn(3, 4, 2, requires_grad=True)
    b = torch.randn(3, 2, 5, requires_grad=True)
    x, index = torch.randn(2 * 3, 4), torch.tensor([2, 0])  # GPT-2: [batch * seq, in]
    out = gathered_linear(torch.zeros(6, 5), x, index, a, b)
    expected = torch.cat([x[:3] @ a[2] @ b[2], x[3:] @ a[0] @ b[0]])
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    assert a.grad[1].abs().sum() == 0 and a.grad[0].abs().sum() > 0


def test_slot_rows():
    out = torch.zeros(4, 3)  # batch 2, 2 rows each
    weights = slot_rows(torch.tensor([1, 0]), 1, out, 2.0)
    assert weights.flatten().tolist() == [2.0, 2.0, 0.0, 0.0]


def test_gathered_embedding_by_hand():
    # Two slots over a 3-row table, r 1; row 0 reads slot 1, row 1 slot 0.
    a_t = torch.tensor([[[1.0], [2.0], [3.0]], [[10.0], [20.0], [30.0]]])  # [slots, num, r]
    b_t = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])  # [slots, r, dim]
    ids = torch.tensor([[0, 2], [1, 1]])
    y = torch.zeros(2, 2, 2)
    out = gathered_embedding(y, ids, torch.tensor([1, 0]), a_t, b_t)
    expected = torch.tensor([[[0.0, 10.0], [0.0, 30.0]], [[2.0, 0.0], [2.0, 0.0]]])
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("padding", [[1, 2], "valid"])
def test_gathered_conv_equals_each_rows_own_conv(padding, channels_last):
    # Strided, dilated Conv2d geometry (PEFT's own conv branch drops dilation; the math does not).
    stride, dilation = [2, 1], [2, 1]
    x, index = torch.randn(3, 4, 9, 8), torch.tensor([2, 0, 2])
    if channels_last:  # the site output is channels-last too (strided rows, summed in place)
        x = x.to(memory_format=torch.channels_last)
    a = torch.randn(3, 5, 4, 3, 3)  # [slots, r, in, *k]
    b = torch.randn(3, 6, 5, 1, 1)  # [slots, out, r, *1]
    conv = functools.partial(F.conv2d, stride=stride, padding=padding, dilation=dilation)
    y = conv(x, torch.randn(6, 4, 3, 3))
    expected = torch.stack(
        [y[i] + F.conv2d(conv(x[i : i + 1], a[k]), b[k])[0] for i, k in enumerate(index.tolist())]
    )
    out = gathered_conv(
        y.clone(), x, index, a.transpose(1, 2), b.transpose(1, 2), stride, padding, dilation
    )
    assert_close(out, expected)


@pytest.mark.parametrize("dims", [1, 3])
def test_gathered_conv_in_1d_and_3d(dims):
    conv = {1: F.conv1d, 3: F.conv3d}[dims]
    x, index = torch.randn(2, 3, *([5] * dims)), torch.tensor([1, 0])
    a = torch.randn(2, 4, 3, *([3] * dims))  # [slots, r, in, *k]
    b = torch.randn(2, 6, 4, *([1] * dims))  # [slots, out, r, *1]
    y = torch.randn(2, 6, *([5] * dims))
    expected = torch.stack(
        [y[i] + conv(conv(x[i : i + 1], a[k], padding=1), b[k])[0] for i, k in enumerate([1, 0])]
    )
    geometry = ([1] * dims, [1] * dims, [1] * dims)
    out = gathered_conv(y.clone(), x, index, a.transpose(1, 2), b.transpose(1, 2), *geometry)
    assert_close(out, expected)
