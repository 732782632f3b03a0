"""The 1x1x1 projection kernel: forward and both backward paths equal ``F.conv3d``."""

from __future__ import annotations

import pytest
import torch

from sliceattn.pointwise import pointwise_conv, pointwise_conv_backward


@pytest.mark.parametrize("batch", [0, 1, 3])
@pytest.mark.parametrize("channels_last", [False, True])
def test_pointwise_conv_equals_conv3d(batch: int, channels_last: bool) -> None:
    x = torch.randn(batch, 3, 2, 3, 4, dtype=torch.float64)
    if channels_last:
        x = x.to(memory_format=torch.channels_last_3d)
    x.requires_grad_()
    weight = torch.randn(5, 3, 1, 1, 1, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(5, dtype=torch.float64, requires_grad=True)
    ours, reference = pointwise_conv(x, weight, bias), torch.nn.functional.conv3d(x, weight, bias)
    torch.testing.assert_close(ours, reference)
    grads = [torch.autograd.grad(out.sin().sum(), (x, weight, bias)) for out in (ours, reference)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(pointwise_conv(x, weight, None), torch.nn.functional.conv3d(x, weight))
    assert torch.autograd.gradcheck(pointwise_conv, (x, weight, bias))
    assert torch.autograd.gradcheck(lambda a, w: pointwise_conv(a, w, None), (x, weight))


@pytest.mark.parametrize("use_onednn", [True, False])
@pytest.mark.parametrize("batch", [0, 1, 3])
@pytest.mark.parametrize("channels_last", [False, True])
def test_pointwise_conv_backward_paths_equal_conv3d(use_onednn: bool, batch: int, channels_last: bool) -> None:
    """Both backward paths (oneDNN on CPU, batched matmuls on other devices) give conv3d's gradients."""
    x = torch.randn(batch, 3, 2, 3, 4, dtype=torch.float64)
    if channels_last:
        x = x.to(memory_format=torch.channels_last_3d)
    weight = torch.randn(5, 3, 1, 1, 1, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(5, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(batch, 5, 2, 3, 4, dtype=torch.float64)
    x.requires_grad_()
    expected = torch.autograd.grad(torch.nn.functional.conv3d(x, weight, bias), (x, weight, bias), grad)
    got = pointwise_conv_backward(grad, x.detach(), weight.detach(), True, True, use_onednn=use_onednn)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)
    grad_x, grad_weight, grad_bias = pointwise_conv_backward(grad, x.detach(), weight.detach(), False, False, use_onednn=use_onednn)
    assert grad_x is None and grad_bias is None
    torch.testing.assert_close(grad_weight, expected[1])
