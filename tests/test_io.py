"""``sliceattn.io.save_atomically``: whole files or none, usual permissions, the final suffixes."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from sliceattn.io import save_atomically


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_writes_through_a_temporary_file_with_the_final_suffixes(tmp_path: Path) -> None:
    seen: list[Path] = []

    def write(temporary: Path) -> None:
        seen.append(temporary)
        temporary.write_bytes(b"scan")

    path = tmp_path / "new" / "folder" / "case_001.nii.gz"  # missing parents are created
    assert save_atomically(str(path), write) == path
    assert path.read_bytes() == b"scan"
    (temporary,) = seen
    assert temporary.parent == path.parent and temporary != path
    assert temporary.suffixes[-2:] == [".nii", ".gz"] and temporary.name.startswith(".case_001")
    assert sorted(p.name for p in path.parent.iterdir()) == ["case_001.nii.gz"]


def test_a_new_file_gets_the_usual_permissions(tmp_path: Path) -> None:
    # mkstemp makes a 0o600 file; a file written by open() gets 0o666 less the umask
    path = save_atomically(tmp_path / "metrics.json", lambda temporary: temporary.write_text("{}"))
    assert _mode(path) == 0o666 & ~_umask()


def test_a_replaced_file_keeps_its_permissions(tmp_path: Path) -> None:
    path = tmp_path / "nnUNetPlans.json"
    path.write_text("old")
    path.chmod(0o640)
    save_atomically(path, lambda temporary: temporary.write_text("new"))
    assert path.read_text() == "new" and _mode(path) == 0o640


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()])
def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path, error: BaseException) -> None:
    path = tmp_path / "checkpoint.pt"
    path.write_text("old")

    def write(temporary: Path) -> None:
        temporary.write_text("half")
        raise error

    with pytest.raises(type(error)):
        save_atomically(path, write)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_a_failed_rename_removes_the_temporary(tmp_path: Path) -> None:
    path = tmp_path / "out.csv"
    path.mkdir()  # a folder where the file should go: os.replace refuses
    with pytest.raises(OSError):
        save_atomically(path, lambda temporary: temporary.write_text("a,b\n"))
    assert [p.name for p in tmp_path.iterdir()] == ["out.csv"] and path.is_dir()
