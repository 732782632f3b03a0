"""Naive permute-and-copy baselines, written the way the paper's reference code is.

They are the yardstick of the benchmarks (same run, same shapes) and the ground truth of the
checkpoint-conversion test: ``NaiveRSABlock`` has the reference RSA block's parameter names
(``theta_conv``, ``phi_conv``, ``g_conv``, ``betas.0/1/2``) and its semantics (three separate
1x1x1 convolutions recomputed at every step, unscaled logits, order coronal, sagittal, axial).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

# dim index of each anatomical axis in (B, C, D, H, W)
AXIS_DIM = {"axial": 2, "coronal": 3, "sagittal": 4}


def naive_slice_attention(query: Tensor, key: Tensor, value: Tensor, dim: int) -> Tensor:
    """Slice attention along ``dim`` with explicit permute + contiguous copies.

    Args:
        query, key, value: ``(B, C, D, H, W)``.
        dim: 2, 3 or 4.

    Returns:
        ``(B, C, D, H, W)``: ``out_i = sum_j softmax_j(<q_i, k_j>) v_j``.
    """
    batch, length = query.shape[0], query.shape[dim]
    order = [0, dim] + [d for d in range(1, 5) if d != dim]
    q = query.permute(order).contiguous().view(batch, length, -1)
    k = key.permute(order).contiguous().view(batch, length, -1)
    v = value.permute(order)
    moved_shape = v.shape
    v = v.contiguous().view(batch, length, -1)
    attention = torch.softmax(torch.matmul(q, k.transpose(1, 2)), dim=-1)
    out = torch.matmul(attention, v).view(moved_shape)
    inverse = [order.index(d) for d in range(5)]
    return out.permute(inverse)


class NaiveSliceAttention(nn.Module):
    """One slice-attention step with three separate 1x1x1 projections (baseline)."""

    def __init__(self, channels: int, axis: str = "axial") -> None:
        super().__init__()
        self.dim = AXIS_DIM[axis]
        self.theta_conv = nn.Conv3d(channels, channels, 1)
        self.phi_conv = nn.Conv3d(channels, channels, 1)
        self.g_conv = nn.Conv3d(channels, channels, 1)
        self.beta = nn.Parameter(torch.zeros(()))

    def forward(self, x: Tensor) -> Tensor:
        out = naive_slice_attention(self.theta_conv(x), self.phi_conv(x), self.g_conv(x), self.dim)
        return x + out * self.beta


class NaiveRSABlock(nn.Module):
    """The reference RSA block: coronal, sagittal, axial steps, shared projections (baseline)."""

    order = ("coronal", "sagittal", "axial")

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.theta_conv = nn.Conv3d(channels, channels, 1)
        self.phi_conv = nn.Conv3d(channels, channels, 1)
        self.g_conv = nn.Conv3d(channels, channels, 1)
        self.betas = nn.ParameterList([nn.Parameter(torch.zeros(())) for _ in self.order])

    def forward(self, x: Tensor) -> Tensor:
        for axis, beta in zip(self.order, self.betas):
            out = naive_slice_attention(self.theta_conv(x), self.phi_conv(x), self.g_conv(x), AXIS_DIM[axis])
            x = x + out * beta
        return x


class NaiveNonLocal3d(nn.Module):
    """The non-local block as the public reference implementations write it (baseline).

    Embedded Gaussian (Wang et al., CVPR 2018): ``nn.Conv3d`` projections to ``C' = C // 2``,
    ``view`` + ``permute`` to ``(B, N, C')``, ``softmax(theta phi)`` as an ``N x N'`` map, a
    ``permute(...).contiguous()`` back, then ``W`` (conv + BatchNorm, zero-initialised) and the
    residual. ``sub_sample`` max-pools ``phi`` and ``g`` by 2 in H and W.
    """

    def __init__(self, channels: int, *, sub_sample: bool = False) -> None:
        super().__init__()
        inter = max(channels // 2, 1)
        self.inter_channels = inter
        self.g = nn.Conv3d(channels, inter, 1)
        self.theta = nn.Conv3d(channels, inter, 1)
        self.phi = nn.Conv3d(channels, inter, 1)
        self.W = nn.Sequential(nn.Conv3d(inter, channels, 1), nn.BatchNorm3d(channels))
        nn.init.zeros_(self.W[1].weight)
        nn.init.zeros_(self.W[1].bias)
        if sub_sample:
            self.g = nn.Sequential(self.g, nn.MaxPool3d((1, 2, 2)))
            self.phi = nn.Sequential(self.phi, nn.MaxPool3d((1, 2, 2)))

    def forward(self, x: Tensor) -> Tensor:
        batch = x.shape[0]
        g_x = self.g(x).view(batch, self.inter_channels, -1).permute(0, 2, 1)
        theta_x = self.theta(x).view(batch, self.inter_channels, -1).permute(0, 2, 1)
        phi_x = self.phi(x).view(batch, self.inter_channels, -1)
        attention = torch.softmax(torch.matmul(theta_x, phi_x), dim=-1)
        y = torch.matmul(attention, g_x).permute(0, 2, 1).contiguous()
        return self.W(y.view(batch, self.inter_channels, *x.shape[2:])) + x
