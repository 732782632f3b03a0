"""Argument checks shared by the public functions and layers (the library's one boundary), and their device helpers."""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Mapping
from typing import Any, Optional, TypeVar, Union

import torch
from torch import Tensor, nn
from torch.types import Device

AxisLike = Union[int, str]
ModuleT = TypeVar("ModuleT", bound=nn.Module)

#: Anatomical names of the spatial dims of a ``(B, C, D, H, W)`` tensor (reference-code convention).
AXIS_NAMES: dict[str, int] = {"axial": 2, "coronal": 3, "sagittal": 4}


def resolve_axis(axis: AxisLike, ndim: int = 5, name: str = "axis") -> int:
    """Turn ``axis`` (a spatial dim index, negative index, or anatomical name) into a dim index.

    Args:
        axis: ``2 .. ndim-1``, ``-(ndim-2) .. -1``, or ``"axial"``/``"coronal"``/``"sagittal"``
            (names need ``ndim == 5``).
        ndim: rank of the ``(B, C, *spatial)`` tensor.
        name: argument name used in error messages.

    Returns:
        The non-negative dim index of a spatial axis.
    """
    if isinstance(axis, str):
        key = axis.lower()
        if key not in AXIS_NAMES:
            raise ValueError(f"{name}={axis!r} is not an axis name; expected one of {sorted(AXIS_NAMES)}")
        if ndim != 5:
            raise ValueError(f"{name}={axis!r}: axis names need a 5-D (B, C, D, H, W) tensor, got {ndim}-D")
        return AXIS_NAMES[key]
    if isinstance(axis, bool) or not isinstance(axis, int):
        raise TypeError(f"{name} must be an int or an axis name, got {type(axis).__name__}")
    dim = axis + ndim if axis < 0 else axis
    if not 2 <= dim < ndim:
        raise ValueError(
            f"{name}={axis} is not a spatial axis of a {ndim}-D (B, C, *spatial) tensor; "
            f"expected 2..{ndim - 1} or -{ndim - 2}..-1"
        )
    return dim


def check_feature_map(
    x: object,
    name: str = "input",
    *,
    ndim: Optional[int] = None,
    channels: Optional[int] = None,
    dtype: Optional[torch.dtype] = None,
) -> None:
    """Check that ``x`` is a floating ``(B, C, *spatial)`` tensor with the given rank and channels.

    ``dtype`` is the dtype of a block's parameters: outside autocast ``x`` must have it (a clear
    ``TypeError`` instead of a matmul's dtype error deep inside the block).
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not (x.is_floating_point()):
        raise TypeError(f"{name} must have a floating dtype, got {x.dtype}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D (B, C, D, H, W), got shape {tuple(x.shape)}")
    if x.dim() < 3:
        raise ValueError(f"{name} must be (B, C, *spatial) with at least one spatial dim, got shape {tuple(x.shape)}")
    if channels is not None and x.shape[1] != channels:
        raise ValueError(f"{name} has {x.shape[1]} channels, but the block was built for channels={channels}")
    if dtype is not None and x.dtype != dtype and not autocast_enabled(x.device):
        raise TypeError(
            f"{name} has dtype {x.dtype}, but the block's parameters are {dtype}; "
            f"convert one of them (block.to({x.dtype}) or input.to({dtype})) or run under torch.autocast"
        )


def check_positive_int(value: object, name: str) -> int:
    """Return ``value`` if it is a positive ``int``, else raise naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def check_bool(value: object, name: str) -> bool:
    """Return ``value`` if it is a ``bool``, else raise naming ``name``."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def check_finite_float(value: object, name: str) -> float:
    """Return ``value`` as a ``float`` if it is a finite real number (not a bool), else raise naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    return float(value)


def check_mapping(value: object, name: str) -> dict[str, Any]:
    """Return a ``dict`` copy of ``value`` if it is ``None`` (empty) or a mapping with string keys, else raise naming ``name``."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise TypeError(f"{name} must be a mapping of option names to values, got {type(value).__name__}")
    keys = [key for key in value if not isinstance(key, str)]
    if keys:
        raise TypeError(f"{name} must have option names (str) as keys, got {keys!r}")
    return dict(value)


def check_choice(value: object, name: str, choices: tuple[str, ...]) -> str:
    """Return ``value`` if it is one of ``choices`` (strings compare case-insensitively), else raise naming ``name``."""
    key = value.lower() if isinstance(value, str) else value
    if key not in choices:
        raise ValueError(f"{name}={value!r} is not supported; expected one of {list(choices)}")
    return key  # type: ignore[return-value]


def autocast_enabled(device: torch.device) -> bool:
    """Whether autocast is on for ``device``'s type (False for types without autocast, e.g. ``meta``)."""
    return torch.amp.is_autocast_available(device.type) and torch.is_autocast_enabled(device.type)


def autocast_off(device: torch.device) -> contextlib.AbstractContextManager:
    """A context that disables autocast on ``device``'s type (nothing to do where autocast does not exist)."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def low_precision(x: Tensor) -> bool:
    """True when ``x`` is half/bfloat16 or autocast is on for its device (so float32 must be forced)."""
    return x.dtype in (torch.float16, torch.bfloat16) or autocast_enabled(x.device)


def allocate(module: ModuleT, device: Device) -> ModuleT:
    """Move ``module``, built on the ``meta`` device, to ``device`` without initialising it.

    For a block whose ``reset_parameters`` draws its submodules' weights: the submodule draws
    nothing when built, so the block draws each weight once (the same random stream as
    building the submodule on ``device``). ``device=None`` is the device a factory function
    would use (the default device, or that of an enclosing ``with torch.device(...)``).
    """
    return module.to_empty(device=torch.empty(0, device=device).device)
