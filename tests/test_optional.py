"""``optional_import``: the one way the integrations import MONAI and nnU-Net."""

from __future__ import annotations

import sys

import pytest

from sliceattn._optional import optional_import


def test_returns_the_module() -> None:
    assert optional_import("json", extra="none", needed_by="test") is sys.modules["json"]


def test_missing_module_names_the_extra_and_keeps_the_cause(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "monai.networks.nets", None)
    with pytest.raises(ImportError, match=r"^sliceattn.monai.RSAUNet needs monai.networks.nets \(.*\): pip install 'sliceattn\[monai\]'$") as info:
        optional_import("monai.networks.nets", extra="monai", needed_by="sliceattn.monai.RSAUNet")
    assert isinstance(info.value.__cause__, ImportError)
