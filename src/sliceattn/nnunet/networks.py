"""nnU-Net v2 networks with slice-wise attention after chosen encoder stages.

:class:`AttentionPlainConvUNet` and :class:`AttentionResidualEncoderUNet` subclass
``dynamic_network_architectures``' ``PlainConvUNet`` and ``ResidualEncoderUNet`` (nnU-Net's
default and residual-encoder networks). nnU-Net builds them from a plans file
(``architecture.network_class_name`` plus ``arch_kwargs``); the extra keyword arguments are
``attention``, ``attention_stages`` and ``attention_kwargs``.

The attention blocks live in ``self.attention`` (one entry per encoder stage, ``nn.Identity``
where there is none), so every other state-dict key is the plain network's: a plain checkpoint
loads with :func:`sliceattn.nnunet.load_plain_weights`. The blocks keep their own
initialisation (identity: RSA gates at 0, the non-local block's output norm at 0) when nnU-Net
applies ``InitWeights_He``, so at init the network computes what the plain network computes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Optional, Union

import numpy as np
from torch import Tensor, nn

from .. import NonLocal3d, RecurrentSliceAttention3d, cost
from .._checks import check_mapping
from .._optional import optional_import
from ..factory import build_attention
from .plans import resolve_stages

_unet = optional_import(
    "dynamic_network_architectures.architectures.unet", extra="nnunet", needed_by="sliceattn.nnunet's networks"
)
PlainConvUNet, ResidualEncoderUNet = _unet.PlainConvUNet, _unet.ResidualEncoderUNet

__all__ = ["AttentionPlainConvUNet", "AttentionResidualEncoderUNet"]


def _feature_elements(block: nn.Module, shape: tuple[int, ...]) -> int:
    """Values the block keeps for backward on a ``(1, C, D, H, W)`` map, in float32 elements.

    nnU-Net's planner sums feature-map elements (``compute_conv_feature_map_size``) to fit the
    patch size to its memory budget; the block's saved tensors add to that sum.
    """
    if isinstance(block, RecurrentSliceAttention3d):
        projection = block.projection is not None
        saved = cost.rsa_saved_bytes(
            shape,
            steps=len(block.dims),
            projection=projection,
            qk_channels=block.projection.qk_channels if projection else None,
            project_once=block.project_once,
            checkpoint=block.checkpoint,
        )
        return saved // 4
    if isinstance(block, NonLocal3d):
        channels, inter = block.channels, block.inter_channels
        queries = int(np.prod(shape[2:]))
        keys = cost.nonlocal_keys(shape, block.sub_sample)
        # theta (N), phi and g (N'), the N x N' map, their product and the output W(y) (+ its norm)
        return inter * queries + 2 * inter * keys + queries * keys + inter * queries + 2 * channels * queries
    return 0


class _EncoderAttention:
    """Shared part of the attention networks: the blocks, the forward pass, init and size."""

    encoder: nn.Module
    decoder: nn.Module
    attention: nn.ModuleList

    def __init__(
        self,
        *args: Any,
        attention: str = "rsa",
        attention_stages: Union[int, Sequence[int]] = (-1,),
        attention_kwargs: Optional[Mapping[str, Any]] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)  # the dynamic_network_architectures network
        if self.encoder.conv_op is not nn.Conv3d:
            raise ValueError(
                f"{type(self).__name__} needs conv_op=torch.nn.Conv3d (a 3-D configuration), "
                f"got {self.encoder.conv_op.__name__}"
            )
        n_stages = len(self.encoder.stages)
        stages = resolve_stages(attention_stages, n_stages)
        options = check_mapping(attention_kwargs, "attention_kwargs")
        blocks = [
            build_attention(attention, self.encoder.output_channels[stage], **options)
            if stage in stages
            else nn.Identity()
            for stage in range(n_stages)
        ]
        self.attention = nn.ModuleList(blocks)
        self.attention_type, self.attention_stages = attention, stages

    def forward(self, x: Tensor) -> Union[Tensor, list[Tensor]]:
        """``(B, C_in, D, H, W)`` -> logits ``(B, num_classes, D, H, W)`` (a list with deep supervision).

        The encoder's own loop, with each stage's output passed through its attention entry
        before it becomes the next stage's input and the decoder's skip.
        """
        stem = getattr(self.encoder, "stem", None)
        if stem is not None:
            x = stem(x)
        skips = []
        for stage, attend in zip(self.encoder.stages, self.attention):
            x = attend(stage(x))
            skips.append(x)
        return self.decoder(skips)

    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> np.int64:
        """The plain network's feature-map elements plus what the attention blocks keep for backward.

        Args:
            input_size: the patch size ``(D, H, W)``, no batch or channel dims (as nnU-Net's planner calls it).
        """
        total = super().compute_conv_feature_map_size(input_size)  # type: ignore[misc]
        size = [int(s) for s in input_size]
        for stride, block, channels in zip(self.encoder.strides, self.attention, self.encoder.output_channels):
            size = [s // int(step) for s, step in zip(size, stride)]
            total += np.int64(_feature_elements(block, (1, channels, *size)))
        return total

    def initialize(self, module: nn.Module) -> None:
        """nnU-Net's initialisation (``network.apply(network.initialize)``), except inside the blocks.

        The attention blocks keep their own initialisation, which makes them the identity;
        ``InitWeights_He`` would, for example, re-draw a zero-initialised output convolution.
        """
        if any(module is inner for inner in self.attention.modules()):
            return
        super().initialize(module)  # type: ignore[misc]


class AttentionPlainConvUNet(_EncoderAttention, PlainConvUNet):
    """nnU-Net's ``PlainConvUNet`` with slice-wise attention after chosen encoder stages.

    Zhang et al., "RSANet: Recurrent Slice-Wise Attention Network for Multiple Sclerosis
    Lesion Segmentation", MICCAI 2019: ``attention_stages=(-1,)`` is the paper's ``010``
    placement (the bottom of the U-Net).

    Args:
        *args, **kwargs: ``PlainConvUNet``'s arguments (nnU-Net's ``arch_kwargs``); ``conv_op``
            must be ``torch.nn.Conv3d``.
        attention: ``"rsa"`` (:class:`~sliceattn.RecurrentSliceAttention3d`) or ``"nonlocal"``
            (:class:`~sliceattn.NonLocal3d`).
        attention_stages: encoder stage indices whose output passes through a block; ``-1`` is
            the bottleneck. The block's output feeds the next stage and the decoder's skip.
        attention_kwargs: options of each block, e.g. ``{"order": [3, 4, 2]}`` (axes as dim
            indices of ``(B, C, D, H, W)`` in nnU-Net's transposed layout).

    Shape:
        ``(B, input_channels, D, H, W)`` -> ``(B, num_classes, D, H, W)``, or one output per
        decoder level with ``deep_supervision=True``.
    """


class AttentionResidualEncoderUNet(_EncoderAttention, ResidualEncoderUNet):
    """nnU-Net's ``ResidualEncoderUNet`` (the ResEnc presets) with slice-wise attention.

    Args:
        *args, **kwargs: ``ResidualEncoderUNet``'s arguments (nnU-Net's ``arch_kwargs``).
        attention, attention_stages, attention_kwargs: as in :class:`AttentionPlainConvUNet`.

    Shape:
        as :class:`AttentionPlainConvUNet`.
    """

