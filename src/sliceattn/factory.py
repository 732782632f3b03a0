"""One factory for the attention blocks: ``build_attention(kind, channels, **options)``.

The nnU-Net networks, the MONAI networks and the MS-lesion example build their blocks here, so
a kind has one spelling everywhere and an option is checked the same way wherever it comes
from (a plans file, a MONAI bundle, a training run's recorded configuration).
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from .layers import RecurrentSliceAttention3d
from .nonlocal_block import NonLocal3d

__all__ = ["ATTENTION_BLOCKS", "attention_option_names", "build_attention"]

#: The block class of each attention kind.
ATTENTION_BLOCKS: dict[str, type[nn.Module]] = {"nonlocal": NonLocal3d, "rsa": RecurrentSliceAttention3d}


def _block_class(kind: object) -> type[nn.Module]:
    if not isinstance(kind, str):
        raise TypeError(f"attention kind must be a str, got {type(kind).__name__}")
    if kind not in ATTENTION_BLOCKS:
        raise ValueError(f"attention kind must be one of {sorted(ATTENTION_BLOCKS)}, got {kind!r}")
    return ATTENTION_BLOCKS[kind]


def attention_option_names(kind: str) -> tuple[str, ...]:
    """The keyword options the block of ``kind`` takes (``device``/``dtype`` included), sorted.

    Raises:
        TypeError: ``kind`` is not a string.
        ValueError: ``kind`` is not a key of :data:`ATTENTION_BLOCKS`.
    """
    parameters = inspect.signature(_block_class(kind).__init__).parameters.values()
    return tuple(sorted(p.name for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY))


def build_attention(kind: str, channels: int, /, **options: Any) -> nn.Module:
    """One attention block for a ``(B, channels, D, H, W)`` feature map, identity at init.

    Args:
        kind: ``"rsa"`` (:class:`~sliceattn.RecurrentSliceAttention3d`, the paper's block) or
            ``"nonlocal"`` (:class:`~sliceattn.NonLocal3d`, its reference).
        channels: ``C`` of the feature map.
        **options: keyword arguments of the block, ``device=``/``dtype=`` included, e.g.
            ``order=(3, 4, 2)``, ``qk_channels=16``, ``sub_sample=True``.

    Returns:
        The block: ``(B, channels, D, H, W)`` -> ``(B, channels, D, H, W)``.

    Raises:
        TypeError: ``kind`` is not a string; an option of the wrong type (the block's message).
        ValueError: unknown ``kind``; options the block does not take (named, with those it
            takes); a bad option value (the block's message).
    """
    block = _block_class(kind)
    unknown = sorted(set(options) - set(attention_option_names(kind)))
    if unknown:
        raise ValueError(
            f"attention kind {kind!r} ({block.__name__}) takes no option {', '.join(map(repr, unknown))}; "
            f"its options are {list(attention_option_names(kind))}"
        )
    return block(channels, **options)
