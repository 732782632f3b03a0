"""MONAI networks with slice-wise attention at the bottom of the U-Net (the paper's ``010`` placement).

``pip install 'sliceattn[monai]'``. MONAI has no plug-in registry for blocks; these subclasses
put a block where each network lets one in, and take MONAI's own arguments plus ``attention``
(``"rsa"`` or ``"nonlocal"``) and ``attention_kwargs``:

- :class:`RSAUNet`: ``monai.networks.nets.UNet``, block after the bottom layer (``_get_bottom_layer``);
- :class:`RSADynUNet`: ``monai.networks.nets.DynUNet``, block after the ``bottleneck``;
- :class:`RSABasicUNet`: ``monai.networks.nets.BasicUNet``, block after ``down_4``.

Each block is the identity at init (gates at 0), so a new network computes what the plain one
computes. In a MONAI bundle, ``"_target_": "sliceattn.monai.RSAUNet"``. The classes live in
``sliceattn.monai.networks``, which imports MONAI; this package imports it on first use of a
class, so ``import sliceattn.monai`` works without it. See ``docs/integrations.md``.

Zhang et al., "RSANet: Recurrent Slice-Wise Attention Network for Multiple Sclerosis Lesion
Segmentation", MICCAI 2019.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .._optional import optional_import

if TYPE_CHECKING:
    from .networks import RSABasicUNet, RSADynUNet, RSAUNet

__all__ = ["RSABasicUNet", "RSADynUNet", "RSAUNet"]


def __getattr__(name: str) -> Any:
    # the classes subclass MONAI's, so MONAI is imported when one is first asked for; checked
    # here first so that the error names the class asked for
    if name in __all__:
        optional_import("monai.networks.nets", extra="monai", needed_by=f"{__name__}.{name}")
        return getattr(importlib.import_module(".networks", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
