"""Slice-attention layers: ``SliceAttention3d`` (one axis) and ``RecurrentSliceAttention3d`` (RSA).

Zhang et al., "RSANet: Recurrent Slice-wise Attention Network for Multiple Sclerosis Lesion
Segmentation", MICCAI 2019. ``M' = alpha * SA(M) + M`` with ``alpha`` initialised to 0, so a
block is the identity until training moves it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Optional

import torch
from torch import Tensor, nn
from torch.types import Device
from torch.utils.checkpoint import checkpoint as recompute

from ._checks import (
    AXIS_NAMES,
    AxisLike,
    allocate,
    autocast_off,
    check_bool,
    check_choice,
    check_feature_map,
    check_finite_float,
    check_positive_int,
    low_precision,
    resolve_axis,
)
from .functional import IMPLS, Impl, Scale, _slice_attention, check_scale, resolve_scale
from .pointwise import pointwise_conv

_DIM_NAMES = {dim: name for name, dim in AXIS_NAMES.items()}


class QKVProjection(nn.Module):
    """Query, key and value as one 1x1x1 convolution with ``2 * qk_channels + channels`` outputs.

    Under autocast or with float16/bfloat16 input the query/key part runs in float32: the
    logits sum ``C*H*W`` products and low-precision projections make the attention map noisy.

    Args:
        channels: ``C``, input and value channels.
        qk_channels: query/key channels (``C`` as in the paper; fewer is cheaper).
        device, dtype: of the parameters, as for ``nn.Conv3d``.

    Shape:
        ``(B, C, D, H, W)`` -> query and key ``(B, qk_channels, D, H, W)``, value ``(B, C, D, H, W)``.
        Parameters: ``weight (2 * qk_channels + C, C, 1, 1, 1)``, ``bias (2 * qk_channels + C,)``.
    """

    def __init__(
        self, channels: int, qk_channels: int, *, device: Device = None, dtype: Optional[torch.dtype] = None
    ) -> None:
        super().__init__()
        self.channels = check_positive_int(channels, "channels")
        self.qk_channels = check_positive_int(qk_channels, "qk_channels")
        factory = {"device": device, "dtype": dtype}
        out_channels = 2 * qk_channels + channels
        self.weight = nn.Parameter(torch.empty(out_channels, channels, 1, 1, 1, **factory))
        self.bias = nn.Parameter(torch.empty(out_channels, **factory))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Draw ``weight`` and ``bias`` as ``nn.Conv3d(C, 2 * qk_channels + C, 1)`` does (the same random draws)."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        bound = 1 / math.sqrt(self.channels)  # 1 / sqrt(fan_in) of a 1x1x1 convolution
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(B, C, D, H, W)`` -> query, key ``(B, qk_channels, D, H, W)``, value ``(B, C, D, H, W)``."""
        split = [self.qk_channels, self.qk_channels, self.channels]
        if not low_precision(x):
            query, key, value = pointwise_conv(x, self.weight, self.bias).split(split, dim=1)
            return query, key, value
        qk = 2 * self.qk_channels
        with autocast_off(x.device):
            query, key = pointwise_conv(x.float(), self.weight[:qk].float(), self.bias[:qk].float()).split(split[:2], dim=1)
        return query, key, pointwise_conv(x, self.weight[qk:], self.bias[qk:])


class _GatedSliceBlock(nn.Module):
    """What both layers share: their options, and per step: check the input, project, attend and gate, keep the maps."""

    projection: Optional[QKVProjection]
    channels: int
    scale: Scale
    impl: str
    alpha: nn.Parameter
    save_attention: bool
    #: the last forward's attention maps, one detached ``(B, L, L)`` tensor per step in step
    #: order (float32, float64 for float64 input); empty unless ``save_attention=True``
    attention_maps: tuple[Tensor, ...]

    def __init__(
        self,
        channels: int,
        steps: Optional[int],
        projection: bool,
        qk_channels: Optional[int],
        scale: object,
        alpha_init: float,
        impl: str,
        save_attention: bool,
        device: Device,
        dtype: Optional[torch.dtype],
    ) -> None:
        """Validate the shared options; build the projection (None without one) and the gates.

        ``steps`` is the number of gates (``alpha`` of shape ``(steps,)``), None for one 0-d gate.
        """
        super().__init__()
        check_positive_int(channels, "channels")
        check_bool(projection, "projection")
        self.save_attention = check_bool(save_attention, "save_attention")
        self.impl = check_choice(impl, "impl", IMPLS)
        self.scale = check_scale(scale)  # a bad scale fails here, not at the first forward
        if qk_channels is not None:
            if not projection:
                raise ValueError(f"qk_channels={qk_channels} needs projection=True (without projections query/key are the input)")
            check_positive_int(qk_channels, "qk_channels")
        self.channels = channels
        # built undrawn: reset_parameters below draws it once (the draws nn.Conv3d's init makes)
        self.projection = (
            allocate(QKVProjection(channels, qk_channels or channels, device="meta", dtype=dtype), device) if projection else None
        )
        # one plain Parameter holding every step's gate (nn.ParameterList breaks DataParallel replicas)
        shape = () if steps is None else (steps,)
        self.alpha_init = check_finite_float(alpha_init, "alpha_init")  # a NaN gate would poison every output
        self.alpha = nn.Parameter(torch.empty(shape, device=device, dtype=dtype))
        self.attention_maps = ()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise the parameters as a new block has them: ``nn.Conv3d``'s projection draw, ``alpha_init``.

        ``__init__`` calls it; call it again after ``to_empty`` has materialised a block built
        on the ``meta`` device (uninitialised memory until then). With ``alpha_init=0`` (the
        default) the block is the identity afterwards.
        """
        if self.projection is not None:
            self.projection.reset_parameters()
        nn.init.constant_(self.alpha, self.alpha_init)

    def _check_input(self, x: Tensor) -> None:
        check_feature_map(x, "input", ndim=5, channels=self.channels, dtype=self.alpha.dtype)

    def _project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self.projection(x) if self.projection is not None else (x, x, x)

    def _step(self, x: Tensor, alpha: Tensor, query: Tensor, key: Tensor, value: Tensor, dim: int) -> tuple[Tensor, Tensor]:
        """``x + alpha * SA_dim(query, key, value)`` and the step's ``(B, L, L)`` map."""
        factor = resolve_scale(self.scale, query.shape, dim)
        return _slice_attention(query, key, value, dim, factor, x, alpha, self.impl)

    def _keep(self, maps: list[Tensor]) -> None:
        if self.save_attention:
            self.attention_maps = tuple(attention.detach() for attention in maps)


class SliceAttention3d(_GatedSliceBlock):
    """Slice-wise attention along one axis with a residual gate: ``M' = alpha * SA(M) + M``.

    Args:
        channels: ``C`` of the ``(B, C, D, H, W)`` input.
        axis: ``"axial"`` (D, dim 2), ``"coronal"`` (H, dim 3), ``"sagittal"`` (W, dim 4), or 2/3/4/-3/-2/-1.
        projection: query/key/value are 1x1x1 convolutions (paper's figure and code) if True,
            the input itself (paper's equations) if False.
        qk_channels: reduce query/key to this many channels (a departure from the paper).
        scale: logit multiplier: None (1, the paper), ``"auto"`` (``1/sqrt(Cq*rest)``, ``Cq`` the
            query's channels: ``qk_channels``, else ``C``; ``rest`` the product of the other two
            spatial sizes), or a float.
        alpha_init: initial gate; 0 makes the block the identity at init.
        impl: ``"fused"`` or the einops ``"reference"`` (the same function).
        save_attention: keep the last forward's map in :attr:`attention_maps` (a 1-tuple holding
            a detached ``(B, L, L)`` tensor); off, it stays ``()`` and costs nothing.
        device, dtype: of the parameters (factory arguments, as for ``nn.Conv3d``).

    Shape:
        ``(B, C, D, H, W)`` -> ``(B, C, D, H, W)``, same dtype (the parameters' dtype outside
        autocast: another input dtype raises ``TypeError``).
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
        impl: Impl = "fused",
        save_attention: bool = False,
        device: Device = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__(channels, None, projection, qk_channels, scale, alpha_init, impl, save_attention, device, dtype)
        self.dim = resolve_axis(axis)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, D, H, W)`` -> ``(B, C, D, H, W)``."""
        self._check_input(x)
        out, attention = self._step(x, self.alpha, *self._project(x), self.dim)
        self._keep([attention])
        return out

    def extra_repr(self) -> str:
        return f"{self.channels}, axis={_DIM_NAMES[self.dim]!r}, scale={self.scale!r}, impl={self.impl!r}"


class RecurrentSliceAttention3d(_GatedSliceBlock):
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
        scale: logit multiplier: None (1, the paper), ``"auto"`` (``1/sqrt(Cq*rest)``, ``Cq`` =
            ``qk_channels``, else ``C``) or a float.
        alpha_init: initial value of every step's gate ``alpha`` (0: identity at init).
        impl: ``"fused"`` or the einops ``"reference"`` (the same function).
        save_attention: keep the last forward's maps in :attr:`attention_maps`: one detached
            ``(B, L, L)`` tensor per step, in step order (``L`` the length of that step's axis);
            off, it stays ``()`` and costs nothing.
        device, dtype: of the parameters (factory arguments, as for ``nn.Conv3d``).

    Shape:
        ``(B, C, D, H, W)`` -> ``(B, C, D, H, W)``, same dtype (the parameters' dtype outside
        autocast: another input dtype raises ``TypeError``).
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
        impl: Impl = "fused",
        save_attention: bool = False,
        device: Device = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        if isinstance(order, str) or not isinstance(order, Sequence) or len(order) == 0:
            raise TypeError(f"order must be a non-empty sequence of axes, got {order!r}")
        dims = tuple(resolve_axis(axis, name="order") for axis in order)
        if len(set(dims)) != len(dims):
            raise ValueError(f"order must name distinct axes, got {tuple(order)!r}")
        if project_once and not projection:
            raise ValueError("project_once=True needs projection=True")
        super().__init__(channels, len(dims), projection, qk_channels, scale, alpha_init, impl, save_attention, device, dtype)
        self.dims, self.project_once, self.checkpoint = dims, bool(project_once), bool(checkpoint)

    @property
    def order(self) -> tuple[str, ...]:
        """Step order as axis names."""
        return tuple(_DIM_NAMES[dim] for dim in self.dims)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, D, H, W)`` -> ``(B, C, D, H, W)``."""
        self._check_input(x)
        if self.checkpoint and torch.is_grad_enabled():
            return recompute(self._steps, x, use_reentrant=False)
        return self._steps(x)

    def _steps(self, x: Tensor) -> Tensor:
        # project_once: every step uses the block input's projections (the residual stream still
        # runs through the steps); otherwise each step projects the previous step's output
        query, key, value = self._project(x)
        maps = []
        for step, dim in enumerate(self.dims):
            if step > 0 and not self.project_once:
                query, key, value = self._project(x)
            x, attention = self._step(x, self.alpha[step], query, key, value, dim)
            maps.append(attention)
        self._keep(maps)
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
        coronal, sagittal and axial steps. Channels are read from the weights; the reference's
        step order, full ``C -> C`` projections recomputed at every step, and gates (read from
        ``betas``) are fixed, so the options that set them (``order``, ``projection``,
        ``qk_channels``, ``project_once``, ``alpha_init``) are refused.

        ``scale`` is not refused although it changes the function: ``None`` (the default) is the
        reference's ``s = 1`` and computes the reference block's function; ``"auto"`` or a float
        computes the scaled variant with the reference's weights (how the mixed-precision tests
        and benchmarks compare the two).

        Args:
            state_dict: the reference block's ``state_dict()`` (a prefix such as ``"rsa."`` must
                be stripped first).
            **kwargs: other constructor options: ``impl``, ``checkpoint``, ``save_attention``,
                ``scale`` (see above), and ``device``/``dtype`` (default: the weights'), to which
                the weights are converted.

        Returns:
            The block: ``(B, C, D, H, W)`` -> ``(B, C, D, H, W)``.

        Raises:
            KeyError: missing or unexpected keys, listed by name.
            ValueError: weights of inconsistent shapes; a refused option (named).
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
        options = {"device": weight.device, "dtype": weight.dtype, **kwargs}
        block = cls(channels, **options)  # type: ignore[arg-type]
        with torch.no_grad():
            block.projection.weight.copy_(torch.cat([state_dict[f"{c}.weight"] for c in ("theta_conv", "phi_conv", "g_conv")]))
            block.projection.bias.copy_(torch.cat([state_dict[f"{c}.bias"] for c in ("theta_conv", "phi_conv", "g_conv")]))
            block.alpha.copy_(torch.stack([state_dict[f"betas.{i}"].reshape(()) for i in range(3)]))
        return block
