"""The non-local block (Wang et al., "Non-local Neural Networks", CVPR 2018), embedded Gaussian.

The baseline RSANet is measured against: every voxel attends to every voxel through an
``N x N`` map (``N = D*H*W``), which is what slice attention avoids.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn
from torch.types import Device

from ._checks import allocate, autocast_off, check_bool, check_feature_map, check_positive_int
from .pointwise import pointwise_conv


def _undrawn_conv(in_channels: int, out_channels: int, device: Device, dtype: Optional[torch.dtype]) -> nn.Conv3d:
    """A 1x1x1 ``nn.Conv3d`` on ``device`` with uninitialised parameters (no random draws)."""
    return allocate(nn.Conv3d(in_channels, out_channels, 1, device="meta", dtype=dtype), device)


class NonLocal3d(nn.Module):
    """Embedded-Gaussian non-local block: ``z = BN(W(softmax(theta^T phi) g)) + x``.

    Args:
        channels: ``C`` of the ``(B, C, D, H, W)`` input.
        inter_channels: ``C'`` of theta/phi/g (default ``channels // 2``, at least 1).
        sub_sample: max-pool phi and g by 2 in H and W (the map shrinks to ``N x N/4``); a
            non-empty input needs ``H, W >= 2``.
        norm: BatchNorm after ``W`` with weight and bias at zero (identity at init); without it
            ``W`` itself starts at zero.
        save_attention: keep the last forward's map in :attr:`attention_maps` (a 1-tuple holding
            a detached ``(B, N, N')`` tensor, large: ``4 * B * N * N'`` bytes); off, it stays
            ``()`` and costs nothing.
        device, dtype: of the parameters (factory arguments, as for ``nn.Conv3d``).

    Shape:
        ``(B, C, D, H, W)`` -> ``(B, C, D, H, W)``, same dtype (the parameters' dtype outside
        autocast: another input dtype raises ``TypeError``). Memory grows as ``B * N^2``
        (float32 map).
    """

    def __init__(
        self,
        channels: int,
        *,
        inter_channels: Optional[int] = None,
        sub_sample: bool = False,
        norm: bool = True,
        save_attention: bool = False,
        device: Device = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        check_positive_int(channels, "channels")
        self.save_attention = check_bool(save_attention, "save_attention")
        self.attention_maps: tuple[Tensor, ...] = ()
        inter = max(channels // 2, 1) if inter_channels is None else check_positive_int(inter_channels, "inter_channels")
        self.channels, self.inter_channels, self.sub_sample = channels, inter, bool(sub_sample)
        # the convolutions are built undrawn: reset_parameters below draws each once, in this
        # order (the random stream of building them as plain nn.Conv3d)
        self.theta = _undrawn_conv(channels, inter, device, dtype)
        self.phi = _undrawn_conv(channels, inter, device, dtype)
        self.g = _undrawn_conv(channels, inter, device, dtype)
        self.pool = nn.MaxPool3d((1, 2, 2)) if sub_sample else nn.Identity()
        out = _undrawn_conv(inter, channels, device, dtype)
        self.W: nn.Module = nn.Sequential(out, nn.BatchNorm3d(channels, device=device, dtype=dtype)) if norm else out
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise the parameters (and the norm's running statistics) as a new block has them.

        ``theta``, ``phi``, ``g`` and ``W``'s convolution get ``nn.Conv3d``'s default draw; the
        norm's weight and bias (``W`` itself with ``norm=False``) are zero, so the block is the
        identity. ``__init__`` calls it; call it again after ``to_empty`` has materialised a block
        built on the ``meta`` device (uninitialised memory until then).
        """
        out_conv = self._out_conv()
        for conv in (self.theta, self.phi, self.g, out_conv):
            conv.reset_parameters()
        # W's last layer at zero makes its output zero: the identity
        last = self.W[1] if isinstance(self.W, nn.Sequential) else out_conv
        if last is not out_conv:
            last.reset_parameters()  # the norm: its running statistics too
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)

    def _out_conv(self) -> nn.Conv3d:
        return self.W[0] if isinstance(self.W, nn.Sequential) else self.W  # type: ignore[return-value]

    def _pool(self, features: Tensor, empty: bool) -> Tensor:
        """``self.pool``; for an empty input the empty result of its shape (max pooling refuses empty inputs)."""
        if self.sub_sample and empty:
            return features[..., 1::2, 1::2]  # (B, C', D, H // 2, W // 2), the pooled shape
        return self.pool(features)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, D, H, W)`` -> ``(B, C, D, H, W)``."""
        check_feature_map(x, "input", ndim=5, channels=self.channels, dtype=self.theta.weight.dtype)
        empty = x.shape[0] == 0 or x.shape[2] == 0 or x.shape[3] == 0 or x.shape[4] == 0
        if self.sub_sample and not empty and (x.shape[3] < 2 or x.shape[4] < 2):
            raise ValueError(
                f"sub_sample=True needs H, W >= 2 (max pooling) for a non-empty input, got input shape {tuple(x.shape)}"
            )
        batch = x.shape[0]
        # the same matmul form of the 1x1x1 convolutions as the slice attention, for a fair comparison
        theta = pointwise_conv(x, self.theta.weight, self.theta.bias).flatten(2)  # (B, C', N)
        phi = self._pool(pointwise_conv(x, self.phi.weight, self.phi.bias), empty).flatten(2)  # (B, C', N')
        g = self._pool(pointwise_conv(x, self.g.weight, self.g.bias), empty).flatten(2)  # (B, C', N')
        with autocast_off(x.device):
            dtype = torch.promote_types(theta.dtype, torch.float32)
            # logits sum C' products per pair: float32 at least, like the slice attention
            attention = torch.softmax(torch.bmm(theta.mT.to(dtype), phi.to(dtype)), dim=-1)  # (B, N, N')
            # (B, N, C') then a small transpose copy: multiplying by attention.mT instead would make
            # softmax backward copy the whole N x N' gradient to make it contiguous
            y = torch.bmm(attention.to(g.dtype), g.mT).mT  # (B, C', N)
        if self.save_attention:
            self.attention_maps = (attention.detach(),)
        # W's convolution as a matmul too (nn.Conv3d refuses an empty spatial size), then its norm
        out_conv = self._out_conv()
        z = pointwise_conv(y.reshape(batch, self.inter_channels, *x.shape[2:]), out_conv.weight, out_conv.bias)
        if isinstance(self.W, nn.Sequential):
            z = self.W[1](z)
        return z + x
