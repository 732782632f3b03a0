"""Optional integrations imported on first use, one way: ``optional_import(module, extra=...)``."""

from __future__ import annotations

import importlib
from types import ModuleType


def optional_import(module: str, *, extra: str, needed_by: str) -> ModuleType:
    """Import ``module``, or raise an ``ImportError`` saying which extra installs it.

    Args:
        module: dotted name, e.g. ``"monai.networks.nets"``.
        extra: the ``sliceattn`` extra that brings it, e.g. ``"monai"``.
        needed_by: what needs it, for the message, e.g. ``"sliceattn.monai.RSAUNet"``.

    Raises:
        ImportError: ``module`` (or one of its own imports) cannot be imported; the message names
            ``pip install 'sliceattn[<extra>]'`` and the original error, which stays chained.
    """
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(f"{needed_by} needs {module} ({error}): pip install 'sliceattn[{extra}]'") from error
