"""sliceattn: recurrent slice-wise attention (RSANet, MICCAI 2019) for 3-D CNNs."""

from . import cost
from ._checks import AXIS_NAMES
from .functional import slice_attention
from .layers import QKVProjection, RecurrentSliceAttention3d, SliceAttention3d
from .nonlocal_block import NonLocal3d

__version__ = "0.2.0"

__all__ = [
    "AXIS_NAMES",
    "NonLocal3d",
    "QKVProjection",
    "RecurrentSliceAttention3d",
    "SliceAttention3d",
    "__version__",
    "cost",
    "slice_attention",
]
