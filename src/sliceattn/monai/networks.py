"""The MONAI networks of :mod:`sliceattn.monai`: subclasses that add an attention block at the bottom.

Importing this module imports MONAI (``pip install 'sliceattn[monai]'``); without it the
``ImportError`` names the extra. Import the classes from :mod:`sliceattn.monai`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

from torch import nn

from .._checks import check_mapping
from .._optional import optional_import
from ..factory import build_attention

_nets = optional_import("monai.networks.nets", extra="monai", needed_by="sliceattn.monai's networks")
UNet, DynUNet, BasicUNet = _nets.UNet, _nets.DynUNet, _nets.BasicUNet

__all__ = ["RSABasicUNet", "RSADynUNet", "RSAUNet"]


class _BottomAttention:
    """Shared part of the MONAI subclasses: checks, the options, and where the block goes."""

    def __init__(
        self,
        spatial_dims: int = 3,
        *args: Any,
        attention: str = "rsa",
        attention_kwargs: Optional[Mapping[str, Any]] = None,
        **kwargs: Any,
    ) -> None:
        if spatial_dims != 3:
            raise ValueError(
                f"{type(self).__name__} puts a 3-D attention block in the network: spatial_dims must be 3, got {spatial_dims!r}"
            )
        # before the MONAI __init__: UNet's calls _get_bottom_layer, which builds the block
        self.attention_options = (attention, check_mapping(attention_kwargs, "attention_kwargs"))
        super().__init__(spatial_dims, *args, **kwargs)  # the MONAI network
        self._insert_attention()

    def _attention_block(self, channels: int) -> nn.Module:
        attention, options = self.attention_options
        return build_attention(attention, channels, **options)

    def _insert_attention(self) -> None:
        """Add the block after MONAI's ``__init__`` (and its weight initialisation)."""


class RSAUNet(_BottomAttention, UNet):
    """``monai.networks.nets.UNet`` with an attention block after its bottom layer.

    Args:
        spatial_dims: must be 3.
        *args, **kwargs: ``UNet``'s arguments (``in_channels``, ``out_channels``, ``channels``, ``strides``, ...).
        attention: ``"rsa"`` (:class:`~sliceattn.RecurrentSliceAttention3d`) or ``"nonlocal"`` (:class:`~sliceattn.NonLocal3d`).
        attention_kwargs: options of the block, e.g. ``{"save_attention": True}``.

    Shape:
        ``(B, in_channels, D, H, W)`` -> ``(B, out_channels, D, H, W)``.
    """

    def _get_bottom_layer(self, in_channels: int, out_channels: int) -> nn.Module:
        bottom = super()._get_bottom_layer(in_channels, out_channels)
        return nn.Sequential(bottom, self._attention_block(out_channels))


class RSADynUNet(_BottomAttention, DynUNet):
    """``monai.networks.nets.DynUNet`` (the nnU-Net-like MONAI network) with an attention block after its bottleneck.

    The block is added after ``DynUNet`` initialises its convolutions (``initialize_weights``),
    so it keeps its own identity initialisation. It is ``self.bottleneck[1]``.

    Args:
        spatial_dims: must be 3.
        *args, **kwargs: ``DynUNet``'s arguments (``in_channels``, ``out_channels``, ``kernel_size``, ``strides``, ...).
        attention, attention_kwargs: as in :class:`RSAUNet`.

    Shape:
        ``(B, in_channels, D, H, W)`` -> ``(B, out_channels, D, H, W)`` (stacked heads with deep supervision in training).
    """

    def get_bottleneck(self) -> nn.Sequential:
        """``DynUNet``'s bottleneck in an ``nn.Sequential``, to which the block is appended after ``__init__``."""
        return nn.Sequential(super().get_bottleneck())

    def _insert_attention(self) -> None:
        # the skip layers hold this Sequential itself, so appending reaches the forward pass
        self.bottleneck.append(self._attention_block(self.filters[-1]))


class RSABasicUNet(_BottomAttention, BasicUNet):
    """``monai.networks.nets.BasicUNet`` with an attention block after ``down_4`` (its bottom).

    Args:
        spatial_dims: must be 3.
        *args, **kwargs: ``BasicUNet``'s arguments (``in_channels``, ``out_channels``, ``features``, ...).
        attention, attention_kwargs: as in :class:`RSAUNet`.

    Shape:
        ``(B, in_channels, D, H, W)`` -> ``(B, out_channels, D, H, W)``; D, H, W divisible by 16.
    """

    def _insert_attention(self) -> None:
        channels = [m for m in self.down_4.modules() if isinstance(m, nn.Conv3d)][-1].out_channels
        self.down_4 = nn.Sequential(self.down_4, self._attention_block(channels))
