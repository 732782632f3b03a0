"""MONAI networks with slice-wise attention at the bottom of the U-Net (the paper's ``010`` placement).

``pip install 'sliceattn[monai]'``. MONAI has no plug-in registry for blocks; these subclasses
put a block where each network lets one in, and take MONAI's own arguments plus ``attention``
(``"rsa"`` or ``"nonlocal"``) and ``attention_kwargs``:

- :class:`RSAUNet`: ``monai.networks.nets.UNet``, block after the bottom layer (``_get_bottom_layer``);
- :class:`RSADynUNet`: ``monai.networks.nets.DynUNet``, block after the ``bottleneck``;
- :class:`RSABasicUNet`: ``monai.networks.nets.BasicUNet``, block after ``down_4``.

Each block is the identity at init (gates at 0), so a new network computes what the plain one
computes. In a MONAI bundle, ``"_target_": "sliceattn.monai.RSAUNet"``. MONAI is imported on
first use of a class, so ``import sliceattn.monai`` works without it. See ``docs/integrations.md``.

Zhang et al., "RSANet: Recurrent Slice-Wise Attention Network for Multiple Sclerosis Lesion
Segmentation", MICCAI 2019.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

from torch import nn

from ._checks import check_mapping
from ._optional import optional_import
from .factory import build_attention

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


def _define(name: str) -> type:
    """Build the subclass ``name`` of its MONAI network (MONAI imported here, on first use)."""
    nets = optional_import("monai.networks.nets", extra="monai", needed_by=f"sliceattn.monai.{name}")

    class RSAUNet(_BottomAttention, nets.UNet):
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

    class RSADynUNet(_BottomAttention, nets.DynUNet):
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
            return nn.Sequential(super().get_bottleneck())

        def _insert_attention(self) -> None:
            # the skip layers hold this Sequential itself, so appending reaches the forward pass
            self.bottleneck.append(self._attention_block(self.filters[-1]))

    class RSABasicUNet(_BottomAttention, nets.BasicUNet):
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

    classes = {"RSAUNet": RSAUNet, "RSADynUNet": RSADynUNet, "RSABasicUNet": RSABasicUNet}
    for cls in classes.values():
        cls.__module__ = __name__
        cls.__qualname__ = cls.__name__
    globals().update(classes)
    return classes[name]


def __getattr__(name: str) -> Any:
    # the classes subclass MONAI's, so they are defined when first asked for
    if name in __all__:
        return _define(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
