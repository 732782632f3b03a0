"""sliceattn: recurrent slice-wise attention (RSANet, MICCAI 2019) for 3-D CNNs."""

from . import cost
from ._checks import AXIS_NAMES
from .factory import ATTENTION_BLOCKS, build_attention
from .functional import slice_attention
from .layers import QKVProjection, RecurrentSliceAttention3d, SliceAttention3d
from .nonlocal_block import NonLocal3d

__version__ = "0.2.0"

__all__ = [
    "ATTENTION_BLOCKS",
    "AXIS_NAMES",
    "NonLocal3d",
    "QKVProjection",
    "RecurrentSliceAttention3d",
    "SliceAttention3d",
    "__version__",
    "build_attention",
    "cost",
    "slice_attention",
]
