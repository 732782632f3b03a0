"""Slice-attention layers: ``SliceAttention3d`` (one axis) and ``RecurrentSliceAttention3d`` (RSA).

Zhang et al., "RSANet: Recurrent Slice-wise Attention Network for Multiple Sclerosis Lesion
Segmentation", MICCAI 2019. ``M' = alpha * SA(M) + M`` with ``alpha`` initialised to 0, so a
block is the identity until training moves it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Optional

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint as recompute

from ._checks import AXIS_NAMES, AxisLike, check_choice, check_feature_map, check_positive_int, low_precision, resolve_axis
from .functional import IMPLS, Impl, Scale, gated_slice_attention, resolve_scale

_DIM_NAMES = {dim: name for name, dim in AXIS_NAMES.items()}


class _PointwiseConv(torch.autograd.Function):
    """``out[b] = W @ x[b] + bias`` on ``(B, C, N)`` views: one batched matmul, no output copy.

    Backward on CPU is oneDNN's convolution backward: 0.53-1.03x the time of MKL matmuls at the
    benchmark sizes (the gain is at small maps with batch > 1 and at large C = 32 maps), for a
    larger transient (up to 5x the input gradient, as ``F.conv3d``'s own backward). Elsewhere
    batched matmuls, the weight gradient accumulated sample by sample (autograd's backward of a
    batch-expanded weight would materialise ``B`` partial ``O x C`` gradients at once).
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:  # type: ignore[override]
        batch = x.shape[0]
        matrix = weight.flatten(1).expand(batch, -1, -1)
        flat = x.flatten(2)
        out = torch.bmm(matrix, flat) if bias is None else torch.baddbmm(bias.view(1, -1, 1), matrix, flat)
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return out.view(batch, -1, *x.shape[2:])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        on_cpu = grad.device.type == "cpu"
        return pointwise_conv_backward(grad, x, weight, ctx.needs_input_grad[0], ctx.has_bias, use_onednn=on_cpu)


def pointwise_conv_backward(
    grad: Tensor, x: Tensor, weight: Tensor, input_grad: bool, has_bias: bool, *, use_onednn: bool
) -> tuple[Optional[Tensor], Tensor, Optional[Tensor]]:
    """Gradients of :func:`pointwise_conv` (input or None, weight, bias or None), in ``grad``'s dtype.

    ``use_onednn=True``: ``aten.convolution_backward`` (oneDNN on CPU); otherwise batched matmuls.
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
    grad_weight = grad_flat[0] @ flat[0].mT
    for sample in range(1, batch):
        grad_weight = torch.addmm(grad_weight, grad_flat[sample], flat[sample].mT)
    grad_bias = grad_flat.sum((0, 2)) if has_bias else None
    return grad_x, grad_weight.view(weight.shape), grad_bias


def pointwise_conv(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """A 1x1x1 convolution: ``(B, C, D, H, W)`` -> ``(B, O, D, H, W)``, ``weight`` ``(O, C, 1, 1, 1)``.

    One batched matmul on ``(B, C, N)`` views (contiguous or channels_last_3d input, no copy).
    Measured on CPU (torch 2.13, 2 threads) against ``F.conv3d``, which allocates its output
    twice: half the forward peak at 1.01-1.11x its forward+backward time.
    """
    return _PointwiseConv.apply(x, weight, bias)


class QKVProjection(nn.Module):
    """Query, key and value as one 1x1x1 convolution with ``2 * qk_channels + channels`` outputs.

    Under autocast or with float16/bfloat16 input the query/key part runs in float32: the
    logits sum ``C*H*W`` products and low-precision projections make the attention map noisy.

    Args:
        channels: ``C``, input and value channels.
        qk_channels: query/key channels (``C`` as in the paper; fewer is cheaper).
    """

    def __init__(self, channels: int, qk_channels: int, *, device=None, dtype=None) -> None:
        super().__init__()
        self.channels, self.qk_channels = channels, qk_channels
        conv = nn.Conv3d(channels, 2 * qk_channels + channels, 1, device=device, dtype=dtype)
        self.weight, self.bias = conv.weight, conv.bias

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(B, C, D, H, W)`` -> query, key ``(B, qk_channels, D, H, W)``, value ``(B, C, D, H, W)``."""
        split = [self.qk_channels, self.qk_channels, self.channels]
        if not low_precision(x):
            query, key, value = pointwise_conv(x, self.weight, self.bias).split(split, dim=1)
            return query, key, value
        qk = 2 * self.qk_channels
        with torch.autocast(x.device.type, enabled=False):
            query, key = pointwise_conv(x.float(), self.weight[:qk].float(), self.bias[:qk].float()).split(split[:2], dim=1)
        return query, key, pointwise_conv(x, self.weight[qk:], self.bias[qk:])


def _projection(
    channels: int, projection: bool, qk_channels: Optional[int], scale: Scale, impl: str, device, dtype
) -> Optional[QKVProjection]:
    """Validate the options the two layers share; return their projection (None without one)."""
    check_positive_int(channels, "channels")
    if not isinstance(projection, bool):
        raise TypeError(f"projection must be a bool, got {type(projection).__name__}")
    check_choice(impl, "impl", IMPLS)
    resolve_scale(scale, torch.empty(1, 1, 1), 2)  # a bad scale fails here, not at the first forward
    if qk_channels is not None:
        if not projection:
            raise ValueError(f"qk_channels={qk_channels} needs projection=True (without projections query/key are the input)")
        check_positive_int(qk_channels, "qk_channels")
    if not projection:
        return None
    return QKVProjection(channels, qk_channels or channels, device=device, dtype=dtype)


class SliceAttention3d(nn.Module):
    """Slice-wise attention along one axis with a residual gate: ``M' = alpha * SA(M) + M``.

    Args:
        channels: ``C`` of the ``(B, C, D, H, W)`` input.
        axis: ``"axial"`` (D, dim 2), ``"coronal"`` (H, dim 3), ``"sagittal"`` (W, dim 4), or 2/3/4/-3/-2/-1.
        projection: query/key/value are 1x1x1 convolutions (paper's figure and code) if True,
            the input itself (paper's equations) if False.
        qk_channels: reduce query/key to this many channels (a departure from the paper).
        scale: logit multiplier: None (1, the paper), ``"auto"`` (``1/sqrt(C*rest)``), or a float.
        alpha_init: initial gate; 0 makes the block the identity at init.
        impl: ``"auto"``/``"fused"`` or the einops ``"reference"``.

    Shape:
        ``(B, C, D, H, W)`` -> ``(B, C, D, H, W)``, same dtype.
    """

    def __init__(
        self,
        channels: int,
        axis: AxisLike,
        *,
        projection: bool = True,
        qk_channels: Optional[int] = None,
        scale: Scale = None,
        alpha_init: float = 0.0,
        impl: Impl = "auto",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self.projection = _projection(channels, projection, qk_channels, scale, impl, device, dtype)
        self.channels, self.dim, self.scale, self.impl = channels, resolve_axis(axis), scale, impl
        self.alpha = nn.Parameter(torch.full((), float(alpha_init), device=device, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, D, H, W)`` -> ``(B, C, D, H, W)``."""
        check_feature_map(x, "input", ndim=5, channels=self.channels)
        query, key, value = self.projection(x) if self.projection is not None else (x, x, x)
        return gated_slice_attention(x, self.alpha, query, key, value, self.dim, self.scale, self.impl)

    def extra_repr(self) -> str:
        return f"{self.channels}, axis={_DIM_NAMES[self.dim]!r}, scale={self.scale!r}, impl={self.impl!r}"


class RecurrentSliceAttention3d(nn.Module):
    """Recurrent slice-wise attention (RSA): slice attention along each axis in turn.

    Step ``i`` reads the previous step's output ``x``, recomputes the shared projections from it
    and returns ``x + alpha[i] * SA_axis_i(x)``; after the three steps every voxel is a weighted
    sum of all voxels.

    Args:
        channels: ``C`` of the ``(B, C, D, H, W)`` input.
        order: the axes in step order (reference code: coronal, sagittal, axial); distinct axes.
        projection: shared 1x1x1 query/key/value convolutions (True) or the input itself (False).
        qk_channels: reduce query/key to this many channels (departure from the paper: cheaper).
        project_once: compute the projections once from the block input instead of at every
            step (departure from the paper: a third of the projection cost).
        checkpoint: recompute the block in backward instead of keeping its activations
            (saves training memory, costs one more forward).
        scale: logit multiplier: None (1, the paper), ``"auto"`` or a float.
        alpha_init: initial value of every step's gate ``alpha`` (0: identity at init).
        impl: ``"auto"``/``"fused"`` or the einops ``"reference"``.

    Shape:
        ``(B, C, D, H, W)`` -> ``(B, C, D, H, W)``, same dtype.
    """

    def __init__(
        self,
        channels: int,
        *,
        order: Sequence[AxisLike] = ("coronal", "sagittal", "axial"),
        projection: bool = True,
        qk_channels: Optional[int] = None,
        project_once: bool = False,
        checkpoint: bool = False,
        scale: Scale = None,
        alpha_init: float = 0.0,
        impl: Impl = "auto",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self.projection = _projection(channels, projection, qk_channels, scale, impl, device, dtype)
        if isinstance(order, str) or not isinstance(order, Sequence) or len(order) == 0:
            raise TypeError(f"order must be a non-empty sequence of axes, got {order!r}")
        dims = tuple(resolve_axis(axis, name="order") for axis in order)
        if len(set(dims)) != len(dims):
            raise ValueError(f"order must name distinct axes, got {tuple(order)!r}")
        if project_once and not projection:
            raise ValueError("project_once=True needs projection=True")
        self.channels, self.dims, self.scale, self.impl = channels, dims, scale, impl
        self.project_once, self.checkpoint = bool(project_once), bool(checkpoint)
        # one plain Parameter holding every step's gate (nn.ParameterList breaks DataParallel replicas)
        self.alpha = nn.Parameter(torch.full((len(dims),), float(alpha_init), device=device, dtype=dtype))

    @property
    def order(self) -> tuple[str, ...]:
        """Step order as axis names."""
        return tuple(_DIM_NAMES[dim] for dim in self.dims)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, D, H, W)`` -> ``(B, C, D, H, W)``."""
        check_feature_map(x, "input", ndim=5, channels=self.channels)
        if self.checkpoint and torch.is_grad_enabled():
            return recompute(self._steps, x, use_reentrant=False)
        return self._steps(x)

    def _project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self.projection(x) if self.projection is not None else (x, x, x)

    def _steps(self, x: Tensor) -> Tensor:
        # project_once: every step uses the block input's projections (the residual stream still
        # runs through the steps); otherwise each step projects the previous step's output
        query, key, value = self._project(x)
        for step, dim in enumerate(self.dims):
            if step > 0 and not self.project_once:
                query, key, value = self._project(x)
            x = gated_slice_attention(x, self.alpha[step], query, key, value, dim, self.scale, self.impl)
        return x

    def extra_repr(self) -> str:
        return (
            f"{self.channels}, order={self.order}, projection={self.projection is not None}, "
            f"project_once={self.project_once}, checkpoint={self.checkpoint}, scale={self.scale!r}, impl={self.impl!r}"
        )

    @classmethod
    def from_reference_state_dict(
        cls, state_dict: Mapping[str, Tensor], **kwargs: object
    ) -> "RecurrentSliceAttention3d":
        """Build a block from a state dict of the paper's reference ``rsaBlock``.

        The reference keys are ``theta_conv`` (query), ``phi_conv`` (key), ``g_conv`` (value),
        each ``.weight (C, C, 1, 1, 1)`` and ``.bias (C,)``, and ``betas.0/1/2``, the gates of the
        coronal, sagittal and axial steps. Channels are read from the weights; the order is the
        reference's. With ``scale=None`` (the default) the block computes the reference function.

        Args:
            state_dict: the reference block's ``state_dict()`` (a prefix such as ``"rsa."`` must
                be stripped first).
            **kwargs: other constructor options (``impl``, ``checkpoint``, ``device``, ...);
                options that would change the function (``order``, ``projection``, ...) are refused.

        Raises:
            KeyError: missing or unexpected keys, listed by name.
            ValueError: weights of inconsistent shapes.
        """
        expected = {f"{conv}.{part}" for conv in ("theta_conv", "phi_conv", "g_conv") for part in ("weight", "bias")}
        expected |= {f"betas.{i}" for i in range(3)}
        missing, unexpected = sorted(expected - set(state_dict)), sorted(set(state_dict) - expected)
        if missing or unexpected:
            raise KeyError(f"not a reference RSA state dict: missing keys {missing}, unexpected keys {unexpected}")
        refused = sorted(set(kwargs) & {"order", "projection", "qk_channels", "project_once", "alpha_init"})
        if refused:
            raise ValueError(f"from_reference_state_dict fixes {refused} to the reference's values")
        weight = state_dict["theta_conv.weight"]
        channels = weight.shape[0]
        for conv in ("theta_conv", "phi_conv", "g_conv"):
            w, b = state_dict[f"{conv}.weight"], state_dict[f"{conv}.bias"]
            if tuple(w.shape) != (channels, channels, 1, 1, 1) or tuple(b.shape) != (channels,):
                raise ValueError(
                    f"{conv} must be a {channels}->{channels} 1x1x1 convolution, "
                    f"got weight {tuple(w.shape)} and bias {tuple(b.shape)}"
                )
        block = cls(channels, dtype=weight.dtype, device=weight.device, **kwargs)  # type: ignore[arg-type]
        with torch.no_grad():
            block.projection.weight.copy_(torch.cat([state_dict[f"{c}.weight"] for c in ("theta_conv", "phi_conv", "g_conv")]))
            block.projection.bias.copy_(torch.cat([state_dict[f"{c}.bias"] for c in ("theta_conv", "phi_conv", "g_conv")]))
            block.alpha.copy_(torch.stack([state_dict[f"betas.{i}"].reshape(()) for i in range(3)]))
        return block
