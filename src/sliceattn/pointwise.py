"""The 1x1x1 convolution kernel of the projections: one batched matmul on ``(B, C, N)`` views.

Shared by :class:`~sliceattn.QKVProjection` and :class:`~sliceattn.NonLocal3d`, so that both
blocks pay the same for their projections. Forward is a batched matmul (no output copy, unlike
``F.conv3d``); backward on CPU is oneDNN's convolution backward, elsewhere batched matmuls. The
measured trade-offs are in ``docs/benchmarks.md``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable


class _PointwiseConv(torch.autograd.Function):
    """``out[b] = W @ x[b] + bias`` on ``(B, C, N)`` views.

    Backward on CPU goes through oneDNN's convolution backward (faster than MKL matmuls at small
    maps with batch > 1, for a transient as large as ``F.conv3d``'s own backward). Elsewhere,
    and for empty inputs, batched matmuls with the weight gradient accumulated sample by sample
    (autograd's backward of a batch-expanded weight would materialise ``B`` partial ``O x C``
    gradients at once).
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:  # type: ignore[override]
        batch, out_channels = x.shape[0], weight.shape[0]
        matrix = weight.flatten(1).expand(batch, -1, -1)
        flat = x.flatten(2)
        out = torch.bmm(matrix, flat) if bias is None else torch.baddbmm(bias.view(1, -1, 1), matrix, flat)
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return out.view(batch, out_channels, *x.shape[2:])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        # oneDNN refuses empty tensors; the matmul path handles them
        use_onednn = grad.device.type == "cpu" and grad.numel() > 0 and x.numel() > 0
        return pointwise_conv_backward(grad, x, weight, ctx.needs_input_grad[0], ctx.has_bias, use_onednn=use_onednn)


def pointwise_conv_backward(
    grad: Tensor, x: Tensor, weight: Tensor, input_grad: bool, has_bias: bool, *, use_onednn: bool
) -> tuple[Optional[Tensor], Tensor, Optional[Tensor]]:
    """Gradients of :func:`pointwise_conv` (input or None, weight, bias or None), in ``grad``'s dtype.

    Args:
        grad: ``(B, O, *spatial)``, gradient of the output.
        x: ``(B, C, *spatial)``, the input.
        weight: ``(O, C, 1, ..., 1)``.
        input_grad: whether the input gradient is wanted.
        has_bias: whether the forward had a bias.
        use_onednn: ``aten.convolution_backward`` (oneDNN on CPU) instead of batched matmuls.
    """
    x, weight = x.to(grad.dtype), weight.to(grad.dtype)
    if use_onednn:
        ones = [1] * (x.dim() - 2)
        zeros = [0] * len(ones)
        bias_sizes = [weight.shape[0]] if has_bias else None
        grads = torch.ops.aten.convolution_backward(
            grad, x, weight, bias_sizes, ones, zeros, ones, False, zeros, 1, [input_grad, True, has_bias]
        )
        return grads[0], grads[1], grads[2]
    batch, grad_flat, flat, matrix = x.shape[0], grad.flatten(2), x.flatten(2), weight.flatten(1)
    grad_x = torch.bmm(matrix.mT.expand(batch, -1, -1), grad_flat).view(x.shape) if input_grad else None
    grad_weight = grad_flat.new_zeros(matrix.shape)
    for sample in range(batch):
        grad_weight = torch.addmm(grad_weight, grad_flat[sample], flat[sample].mT)
    grad_bias = grad_flat.sum((0, 2)) if has_bias else None
    return grad_x, grad_weight.view(weight.shape), grad_bias


def pointwise_conv(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """A 1x1x1 convolution as one batched matmul on ``(B, C, N)`` views.

    Args:
        x: ``(B, C, *spatial)``, contiguous or ``channels_last_3d`` (no copy either way).
        weight: ``(O, C, 1, ..., 1)``.
        bias: ``(O,)`` or None.

    Returns:
        ``(B, O, *spatial)``. Time and peak against ``F.conv3d``: ``docs/benchmarks.md``.
    """
    return _PointwiseConv.apply(x, weight, bias)
