"""Atomic file writes: a reader (or a crash) never sees half a file."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Union

__all__ = ["save_atomically"]


def _read_umask() -> int:
    # the only portable way to read the umask is to set it; done once, at import
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def save_atomically(path: Union[str, os.PathLike], write: Callable[[Path], None]) -> Path:
    """Call ``write(temporary_path)``, then rename the file to ``path``.

    The temporary file sits in the same folder (a rename across file systems is not atomic) and
    keeps the final name's suffixes (``.nii.gz``: nibabel and others pick the format from them).
    Missing parent folders are created. The file is flushed to disk before the rename, so a
    crash cannot leave an empty file under ``path``. It gets the permissions an ordinary
    ``open(path, "w")`` would give: those of the file it replaces, else ``0o666`` less the umask.
    On any failure (``write`` raising, ``KeyboardInterrupt`` included) the temporary file is
    removed and ``path`` is untouched.

    Args:
        path: the file to write.
        write: writes the whole content to the path it is given, e.g.
            ``lambda tmp: torch.save(state, tmp)`` or ``lambda tmp: tmp.write_text(text)``.

    Returns:
        ``path`` as a ``Path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{path.name.split('.')[0]}-", suffix="".join(path.suffixes), dir=path.parent)
    os.close(handle)
    temporary = Path(name)
    try:
        write(temporary)
        with open(temporary, "rb") as written:
            os.fsync(written.fileno())
        try:
            mode = path.stat().st_mode & 0o777
        except FileNotFoundError:
            mode = 0o666 & ~_UMASK
        os.chmod(temporary, mode)  # mkstemp makes the file private (0o600)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path
