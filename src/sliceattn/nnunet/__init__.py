"""nnU-Net v2 integration: attention networks for plans files, a plans editor and warm start.

``pip install 'sliceattn[nnunet]'``. The networks import ``dynamic_network_architectures`` on
first use, so this package (and ``python -m sliceattn.nnunet add-config``) loads without it.

    python -m sliceattn.nnunet add-config PLANS_JSON --name 3d_fullres_rsa --base 3d_fullres
    nnUNetv2_train DATASET 3d_fullres_rsa FOLD

See ``docs/nnunet.md``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .plans import add_attention_configuration, resolve_configuration
from .warm_start import load_plain_weights, warm_start_state_dict

if TYPE_CHECKING:
    from .networks import AttentionPlainConvUNet, AttentionResidualEncoderUNet

__all__ = [
    "AttentionPlainConvUNet",
    "AttentionResidualEncoderUNet",
    "add_attention_configuration",
    "load_plain_weights",
    "resolve_configuration",
    "warm_start_state_dict",
]

_LAZY = {"AttentionPlainConvUNet": "networks", "AttentionResidualEncoderUNet": "networks"}


def __getattr__(name: str) -> Any:
    # nnU-Net finds the networks with pydoc.locate("sliceattn.nnunet.AttentionPlainConvUNet"),
    # which lands here; the import error without the extra names the extra
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
