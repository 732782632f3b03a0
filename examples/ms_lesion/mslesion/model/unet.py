"""3-D U-Net with the paper's attention placements (RSANet, Zhang et al., MICCAI 2019).

The backbone is a plain 3-D U-Net (two 3x3x3 conv + GroupNorm + ReLU per level, max-pool down,
transposed-conv up, skip concatenation), filters 32, 64, 128, 256, 512 and 4 down steps by default.
Attention blocks sit after a level's conv block; a placement is three bits:

- ``010``: the bottom level (the bottleneck);
- ``101``: the encoder and the decoder of the second-bottom level;
- ``111``: all three; ``000``: none (the plain U-Net).

Method names (the paper's Table 1): ``unet``, ``rsa-010``, ``rsa-101``, ``rsa-111``, ``ncl-010``,
``ncl-101``, ``ncl-111``. The blocks come from the library's factory, ``sliceattn.build_attention``:
``rsa`` methods use kind ``"rsa"`` (``RecurrentSliceAttention3d``, identity at init), ``ncl`` methods
kind ``"nonlocal"`` (``NonLocal3d``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from sliceattn import ATTENTION_BLOCKS, build_attention

METHODS: tuple[str, ...] = ("unet", "rsa-010", "rsa-101", "rsa-111", "ncl-010", "ncl-101", "ncl-111")
PLACEMENTS: tuple[str, ...] = ("000", "010", "101", "111")
# A method name's prefix (the paper's) -> the library's attention kind.
METHOD_KINDS: dict[str, str] = {"rsa": "rsa", "ncl": "nonlocal"}
# Filters per level. "paper" is the paper's backbone; the others keep its shape for CPU runs ("half" is the
# CPU preset's network).
FILTER_PRESETS: dict[str, tuple[int, ...]] = {
    "paper": (32, 64, 128, 256, 512),
    "half": (16, 32, 64, 128, 256),
    "cpu": (8, 16, 32, 64, 128),
    "tiny": (4, 8, 16, 32, 64),
}


def parse_method(method: str) -> tuple[str | None, str]:
    """Split a method name into (attention kind, placement).

    Args:
        method: one of ``METHODS``.

    Returns:
        ``(None, "000")`` for ``"unet"``, else the ``sliceattn.build_attention`` kind and the
        placement, e.g. ``("rsa", "101")`` or ``("nonlocal", "010")`` for ``"ncl-010"``.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "unet":
        return None, "000"
    prefix, placement = method.split("-")
    return METHOD_KINDS[prefix], placement


def resolve_filters(filters: str | Sequence[int]) -> tuple[int, ...]:
    """A filter preset name or an explicit sequence -> a tuple of channel counts."""
    if isinstance(filters, str):
        if filters not in FILTER_PRESETS:
            raise ValueError(f"filters must be one of {sorted(FILTER_PRESETS)} or a sequence of ints, got {filters!r}")
        return FILTER_PRESETS[filters]
    channels = tuple(int(c) for c in filters)
    if len(channels) < 2 or min(channels) < 1:
        raise ValueError(f"filters must be at least two positive ints (one per level), got {filters!r}")
    return channels


def resolve_strides(strides: Sequence[int | Sequence[int]] | None, steps: int) -> list[tuple[int, int, int]]:
    """Pooling factors per down step as ``(d, h, w)`` triples; ``None`` means 2 everywhere.

    Raises:
        ValueError: not one entry per down step, or a factor below 1.
    """
    strides = [2] * steps if strides is None else list(strides)
    if len(strides) != steps:
        raise ValueError(f"strides must have one entry per down step ({steps}), got {strides!r}")
    triples = [(s, s, s) if isinstance(s, int) else tuple(int(v) for v in s) for s in strides]
    if any(len(t) != 3 or min(t) < 1 for t in triples):
        raise ValueError(f"strides must be positive ints or (d, h, w) triples of them, got {strides!r}")
    return triples  # type: ignore[return-value]


def _divisor(strides: Sequence[tuple[int, int, int]]) -> tuple[int, int, int]:
    return tuple(math.prod(s[axis] for s in strides) for axis in range(3))  # type: ignore[return-value]


def crop_divisor(config: dict[str, Any]) -> tuple[int, int, int]:
    """What each crop (and padded scan) size must be a multiple of, per axis ``(D, H, W)``, for a model config.

    The product of the pooling factors along each axis: ``2 ** (len(filters) - 1)`` with the default
    strides. ``UNet3d(...).divisor`` is the same, without building the network.

    Args:
        config: a ``model_config`` dict (its ``filters`` and ``strides``).
    """
    return _divisor(resolve_strides(config.get("strides"), len(config["filters"]) - 1))


class ConvBlock(nn.Sequential):
    """Two (3x3x3 conv, GroupNorm, ReLU) layers: ``(B, in, D, H, W) -> (B, out, D, H, W)``."""

    def __init__(self, in_channels: int, out_channels: int, norm_groups: int) -> None:
        groups = _groups(out_channels, norm_groups)
        super().__init__(
            nn.Conv3d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.GroupNorm(groups, out_channels),
            nn.ReLU(inplace=True),
            nn.Conv3d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.GroupNorm(groups, out_channels),
            nn.ReLU(inplace=True),
        )


def _groups(channels: int, norm_groups: int) -> int:
    # The largest divisor of ``channels`` not above ``norm_groups``: tiny CPU presets stay valid.
    return max(g for g in range(1, min(norm_groups, channels) + 1) if channels % g == 0)


class UNet3d(nn.Module):
    """3-D U-Net with optional attention blocks at the paper's placements.

    Args:
        in_channels: input modalities (3: T1, T2, FLAIR).
        out_channels: classes (2: background, lesion); the output is logits.
        channels: filters per level, top to bottom; ``len(channels) - 1`` down steps.
        strides: pooling factor per down step, an int or a (d, h, w) triple each; default 2 everywhere.
        attention: ``None`` or a ``sliceattn.build_attention`` kind (``"rsa"``, ``"nonlocal"``).
        placement: ``"000"``, ``"010"``, ``"101"`` or ``"111"`` (see the module docstring).
        attention_options: keyword arguments of the attention block (e.g. ``{"scale": "auto"}``),
            checked by ``sliceattn.build_attention``.
        norm_groups: GroupNorm groups (fewer when a level has fewer channels).

    Shapes: ``(B, in_channels, D, H, W) -> (B, out_channels, D, H, W)``; ``D, H, W`` must be
    divisible by the product of the strides along each axis (``divisor``, see ``crop_divisor``).
    """

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 2,
        channels: Sequence[int] = FILTER_PRESETS["paper"],
        strides: Sequence[int | Sequence[int]] | None = None,
        *,
        attention: str | None = None,
        placement: str = "000",
        attention_options: dict[str, Any] | None = None,
        norm_groups: int = 8,
    ) -> None:
        super().__init__()
        channels = resolve_filters(channels)
        if placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
        if attention is None and placement != "000":
            raise ValueError(f"placement {placement!r} needs an attention kind {sorted(ATTENTION_BLOCKS)}, got attention=None")
        if attention is not None and attention not in ATTENTION_BLOCKS:
            raise ValueError(f"attention must be None or one of {sorted(ATTENTION_BLOCKS)}, got {attention!r}")
        if len(channels) < 3 and placement[0] == "1":
            raise ValueError(f"placement {placement!r} needs at least 3 levels, got channels={channels}")
        self.strides = resolve_strides(strides, len(channels) - 1)
        self.divisor = _divisor(self.strides)
        options = dict(attention_options or {})

        def maybe_attention(on: str, width: int) -> nn.Module:
            return build_attention(attention, width, **options) if on == "1" else nn.Identity()

        self.encoders = nn.ModuleList()
        previous = in_channels
        for width in channels[:-1]:
            self.encoders.append(ConvBlock(previous, width, norm_groups))
            previous = width
        self.pools = nn.ModuleList(nn.MaxPool3d(s, s) for s in self.strides)
        self.bottom = ConvBlock(channels[-2], channels[-1], norm_groups)
        self.ups = nn.ModuleList(
            nn.ConvTranspose3d(channels[i + 1], channels[i], s, s) for i, s in enumerate(self.strides)
        )
        self.decoders = nn.ModuleList(ConvBlock(2 * w, w, norm_groups) for w in channels[:-1])
        # Attention sites: encoder and decoder of the second-bottom level, and the bottom.
        self.encoder_attention = maybe_attention(placement[0], channels[-2])
        self.bottom_attention = maybe_attention(placement[1], channels[-1])
        self.decoder_attention = maybe_attention(placement[2], channels[-2])
        self.head = nn.Conv3d(channels[0], out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, in_channels, D, H, W)`` -> logits ``(B, out_channels, D, H, W)``."""
        skips = []
        last = len(self.encoders) - 1
        for level, (encoder, pool) in enumerate(zip(self.encoders, self.pools)):
            x = encoder(x)
            if level == last:
                x = self.encoder_attention(x)
            skips.append(x)
            x = pool(x)
        x = self.bottom_attention(self.bottom(x))
        for level in range(last, -1, -1):
            x = self.decoders[level](torch.cat([self.ups[level](x), skips[level]], dim=1))
            if level == last:
                x = self.decoder_attention(x)
        return self.head(x)


def model_config(
    method: str,
    *,
    in_channels: int = 3,
    out_channels: int = 2,
    filters: str | Sequence[int] = "paper",
    strides: Sequence[int | Sequence[int]] | None = None,
    attention_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A JSON-able description of a model; ``build_model(**config)`` rebuilds it (``TrainingConfig.network_config``
    is a run's)."""
    parse_method(method)
    return {
        "method": method,
        "in_channels": int(in_channels),
        "out_channels": int(out_channels),
        "filters": list(resolve_filters(filters)),
        "strides": None if strides is None else [s if isinstance(s, int) else list(s) for s in strides],
        "attention_options": dict(attention_options or {}),
    }


def build_model(method: str, **options: Any) -> UNet3d:
    """The U-Net of a method name (see ``METHODS``), e.g. ``build_model("rsa-101", filters="cpu")``.

    Args:
        method: one of ``METHODS``.
        **options: ``in_channels``, ``out_channels``, ``filters``, ``strides``, ``attention_options``
            as in ``model_config``.
    """
    config = model_config(method, **options)
    kind, placement = parse_method(method)
    return UNet3d(
        config["in_channels"],
        config["out_channels"],
        config["filters"],
        config["strides"],
        attention=kind,
        placement=placement,
        attention_options=config["attention_options"] if kind is not None else None,
    )


def training_memory_bytes(config: dict[str, Any], crop: Sequence[int], batch_size: int) -> int:
    """A rough lower bound of the activation memory of one training step (float32).

    Each level keeps about 15 feature maps of its width for backward (two conv/norm/ReLU triples in the
    encoder, the up-sampled map, the concatenation and two triples in the decoder); a non-local block
    adds its ``N x N`` map three times (logits, softmax, gradient).
    """
    filters = config["filters"]
    strides = resolve_strides(config.get("strides"), len(filters) - 1)
    voxels = [math.prod(crop) // math.prod(_divisor(strides[:level])) for level in range(len(filters))]
    total = 15 * sum(w * v for w, v in zip(filters, voxels))
    kind, placement = parse_method(config["method"])
    if kind == "nonlocal":
        sites = [voxels[-1]] * (placement[1] == "1") + [voxels[-2]] * 2 * (placement[0] == "1")
        total += 3 * sum(n * n for n in sites)
    return 4 * batch_size * total


def set_output_prior(model: UNet3d, lesion_probability: float) -> None:
    """Start the head at a constant lesion probability (Lin et al., "Focal loss", 2017, Sec. 4.1).

    With lesions at ~5e-4 of the voxels, a head starting at p = 0.5 spends its first hundreds of Adam
    steps (each moving the bias by about the learning rate) only learning the class prior; starting
    at the prior lets the first steps learn lesion features instead.
    """
    if not 0.0 < lesion_probability < 1.0:
        raise ValueError(f"lesion_probability must be in (0, 1), got {lesion_probability!r}")
    if model.head.out_channels != 2:
        raise ValueError(f"the prior start needs a 2-class head, got out_channels={model.head.out_channels}")
    with torch.no_grad():
        model.head.bias.copy_(torch.tensor([0.0, math.log(lesion_probability / (1.0 - lesion_probability))]))
