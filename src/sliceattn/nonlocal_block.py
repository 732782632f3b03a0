"""The non-local block (Wang et al., "Non-local Neural Networks", CVPR 2018), embedded Gaussian.

The baseline RSANet is measured against: every voxel attends to every voxel through an
``N x N`` map (``N = D*H*W``), which is what slice attention avoids.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ._checks import autocast_off, check_bool, check_feature_map, check_positive_int
from .pointwise import pointwise_conv


class NonLocal3d(nn.Module):
    """Embedded-Gaussian non-local block: ``z = BN(W(softmax(theta^T phi) g)) + x``.

    Args:
        channels: ``C`` of the ``(B, C, D, H, W)`` input.
        inter_channels: ``C'`` of theta/phi/g (default ``channels // 2``, at least 1).
        sub_sample: max-pool phi and g by 2 in H and W (the map shrinks to ``N x N/4``).
        norm: BatchNorm after ``W`` with weight and bias at zero (identity at init); without it
            ``W`` itself starts at zero.
        save_attention: keep the last forward's map in :attr:`attention_maps` (a 1-tuple holding
            a detached ``(B, N, N')`` tensor, large: ``4 * B * N * N'`` bytes); off, it stays
            ``()`` and costs nothing.

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
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        check_positive_int(channels, "channels")
        self.save_attention = check_bool(save_attention, "save_attention")
        self.attention_maps: tuple[Tensor, ...] = ()
        inter = max(channels // 2, 1) if inter_channels is None else check_positive_int(inter_channels, "inter_channels")
        factory = {"device": device, "dtype": dtype}
        self.channels, self.inter_channels, self.sub_sample = channels, inter, bool(sub_sample)
        self.theta = nn.Conv3d(channels, inter, 1, **factory)
        self.phi = nn.Conv3d(channels, inter, 1, **factory)
        self.g = nn.Conv3d(channels, inter, 1, **factory)
        self.pool = nn.MaxPool3d((1, 2, 2)) if sub_sample else nn.Identity()
        out = nn.Conv3d(inter, channels, 1, **factory)
        if norm:
            bn = nn.BatchNorm3d(channels, **factory)
            nn.init.zeros_(bn.weight)
            nn.init.zeros_(bn.bias)
            self.W: nn.Module = nn.Sequential(out, bn)
        else:
            nn.init.zeros_(out.weight)
            nn.init.zeros_(out.bias)
            self.W = out

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, D, H, W)`` -> ``(B, C, D, H, W)``."""
        check_feature_map(x, "input", ndim=5, channels=self.channels, dtype=self.theta.weight.dtype)
        if self.sub_sample and (x.shape[2] < 1 or x.shape[3] < 2 or x.shape[4] < 2):
            raise ValueError(f"sub_sample=True needs D >= 1 and H, W >= 2 (max pooling), got input shape {tuple(x.shape)}")
        batch = x.shape[0]
        # the same matmul form of the 1x1x1 convolutions as the slice attention, for a fair comparison
        theta = pointwise_conv(x, self.theta.weight, self.theta.bias).flatten(2)  # (B, C', N)
        phi = self.pool(pointwise_conv(x, self.phi.weight, self.phi.bias)).flatten(2)  # (B, C', N')
        g = self.pool(pointwise_conv(x, self.g.weight, self.g.bias)).flatten(2)  # (B, C', N')
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
        out_conv = self.W[0] if isinstance(self.W, nn.Sequential) else self.W
        z = pointwise_conv(y.reshape(batch, self.inter_channels, *x.shape[2:]), out_conv.weight, out_conv.bias)
        if isinstance(self.W, nn.Sequential):
            z = self.W[1](z)
        return z + x
