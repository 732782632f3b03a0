"""The files of a run: atomic writes, CSV/JSON, splits, and the recorded options a run is compared by.

Everything a script writes goes through ``save_atomically`` (a temporary file in the same folder,
fsync, rename), so a kill never leaves half a file. A run folder holds only the files in
``RUN_FILES`` (and ``predictions/<id>.npz``); ``--overwrite`` removes exactly those, nothing else.
A command that writes into a folder holds its lock (``locked``) while it runs, so that a second one
started into the same folder is refused instead of mixing the two runs' files.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import math
import os
import socket
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .data.reading import read_json
from sliceattn.io import save_atomically  # the scripts import it from here

RUN_FILES: tuple[str, ...] = ("checkpoint.pt", "model.pt", "log.csv", "split.json", "metrics.json", "cases.csv",
                              "figure.png", "attention.png")
PREDICTIONS = "predictions"
LOCK_NAME = ".mslesion.lock"   # held while a command writes into its folder (``locked``)


class UsageError(ValueError):
    """A user mistake on the command line; the scripts print it as one ``error:`` line and exit 2."""


def write_csv(path: str | Path, rows: Sequence[Mapping[str, Any]], fields: Sequence[str] | None = None) -> Path:
    """Write dict rows as CSV, atomically; the columns are ``fields`` or the first row's keys."""
    def write(tmp: Path) -> None:
        with tmp.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(fields or (rows[0] if rows else [])))
            writer.writeheader()
            writer.writerows(rows)
    return save_atomically(path, write)


def json_safe(obj: Any) -> Any:
    """``obj`` with NaN/inf floats as ``None`` and numpy scalars as Python numbers (strict JSON)."""
    if isinstance(obj, Mapping):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as indented, strictly valid JSON (NaN becomes null), atomically."""
    text = json.dumps(json_safe(obj), indent=1, allow_nan=False)
    return save_atomically(path, lambda tmp: tmp.write_text(text))


# ------------------------------------------------------------------------------------------------ splits


def random_split(ids: Sequence[str], test_fraction: float, seed: int) -> dict[str, list[str]]:
    """Seeded random split of subject ids into train and test (at least one training subject)."""
    if not 0.0 <= test_fraction < 1.0:
        raise UsageError(f"--test-fraction must be in [0, 1), got {test_fraction!r}")
    order = np.random.default_rng(seed).permutation(len(ids))
    n_test = min(len(ids) - 1, round(test_fraction * len(ids)))
    test = sorted(ids[i] for i in order[:n_test])
    return {"train": sorted(ids[i] for i in order[n_test:]), "test": test}


def fold_splits(ids: Sequence[str], folds: int, *, always_train: Sequence[str] = (), seed: int = 0
                ) -> list[dict[str, list[str]]]:
    """K-fold cross-validation splits: the subjects of ``ids`` not in ``always_train``, in a seeded random
    order, cut into ``folds`` near-equal groups; split k tests group k and trains on every other subject
    (``always_train`` included). The test groups are disjoint and cover the rotating subjects; with
    ``folds`` equal to their number this is leave-one-out."""
    rotating = [i for i in ids if i not in set(always_train)]
    if not 2 <= folds <= len(rotating):
        raise UsageError(f"--folds {folds}: need 2 to {len(rotating)} folds (the subjects that rotate into the test "
                         f"set: {len(rotating)})")
    order = [rotating[i] for i in np.random.default_rng(seed).permutation(len(rotating))]
    groups = [sorted(order[k::folds]) for k in range(folds)]
    return [{"train": sorted(set(ids) - set(test)), "test": test} for test in groups]


def read_split(path: str | Path) -> dict[str, list[str]]:
    """A split file ``{"train": [ids], "test": [ids]}``; a missing, unreadable or malformed file is an error."""
    split = read_json(Path(path), "split file")
    if (not isinstance(split, dict) or not {"train", "test"} <= split.keys()
            or not all(isinstance(split[k], list) for k in ("train", "test"))):
        raise UsageError(f"split file {path} must hold a JSON object with 'train' and 'test' id lists")
    extra = sorted(set(split) - {"train", "test"})
    if extra:  # e.g. a "val" list: this pipeline has no validation set, and silently ignoring it would mislead
        raise UsageError(f"split file {path} has keys {extra} besides 'train' and 'test'; this pipeline reads only "
                         "those two: move the ids into 'train' or 'test', or remove the keys")
    return {"train": [str(i) for i in split["train"]], "test": [str(i) for i in split["test"]]}


def check_split(split: Mapping[str, Sequence[str]], ids: Iterable[str], source: str, *, training: bool = True) -> None:
    """Refuse a split with an id in both parts, an id twice, an id not in the data, or no training id.

    With ``training=False`` (evaluation, which reads only the ``test`` ids) the ``train`` ids may be
    absent from the data and ``train`` may be empty.
    """
    ids = set(ids)
    train, test = list(split["train"]), list(split["test"])
    both = sorted(set(train) & set(test))
    if both:
        raise UsageError(f"split {source}: ids {both} are in both 'train' and 'test'")
    twice = sorted({i for i in train + test if (train + test).count(i) > 1})
    if twice:
        raise UsageError(f"split {source}: ids {twice} are listed twice")
    unknown = sorted(set(train + test if training else test) - ids)
    if unknown:
        raise UsageError(f"split {source}: ids {unknown} are not in the data (it has {sorted(ids)})")
    if training and not train:
        raise UsageError(f"split {source}: 'train' is empty")


# --------------------------------------------------------------------------------------------- run folder


def run_files(out: Path) -> list[Path]:
    """The files a run wrote in ``out`` (``RUN_FILES`` and ``predictions/*.npz``) that exist."""
    found = [out / name for name in RUN_FILES if (out / name).is_file()]
    return found + sorted((out / PREDICTIONS).glob("*.npz"))


def remove_run(out: Path) -> None:
    """Delete the files a run writes (and an emptied ``predictions/``); anything else in ``out`` stays."""
    for path in run_files(out):
        path.unlink()
    predictions = out / PREDICTIONS
    if predictions.is_dir() and not any(predictions.iterdir()):
        predictions.rmdir()


def refuse_existing(out: Path, names: Sequence[str], overwrite: bool) -> None:
    """Refuse to write ``names`` into ``out`` where any of them exists, unless ``overwrite``.

    Raises:
        UsageError: naming the first files found and ``--overwrite``.
    """
    existing = [name for name in names if (out / name).exists()]
    if existing and not overwrite:
        shown = ", ".join(existing[:3]) + (f" and {len(existing) - 3} more" if len(existing) > 3 else "")
        raise UsageError(f"--out {out} already holds {shown}; pass --overwrite to replace them, or choose another --out")


# ------------------------------------------------------------------------------- writable folders, locks


def _make_folders(out: Path, flag: str) -> list[Path]:
    """Create ``out`` and its missing parents; returns the folders created, outermost first.

    Raises:
        UsageError: ``out`` or a folder above it is a file, or a folder cannot be created.
    """
    chain = [out.absolute(), *out.absolute().parents]
    first = next(i for i, folder in enumerate(chain) if folder.exists())
    if not chain[first].is_dir():
        where = f"{flag} {out} is" if first == 0 else f"{flag} {out}: {chain[first]} is"
        raise UsageError(f"{where} a file, not a folder; choose another {flag}")
    created: list[Path] = []
    try:
        for folder in reversed(chain[:first]):
            folder.mkdir()
            created.append(folder)
    except OSError as exc:
        _remove_folders(created)
        raise UsageError(f"{flag} {out} cannot be created ({exc.strerror}); fix the permissions of "
                         f"{chain[first]} or choose another {flag}") from None
    return created


def _remove_folders(created: Sequence[Path]) -> None:
    """Remove the folders ``_make_folders`` created, innermost first, as long as they are empty."""
    for folder in reversed(created):
        try:
            folder.rmdir()
        except OSError:  # something was written there: keep it and the folders above
            return


def _not_writable(out: Path, flag: str, exc: OSError) -> UsageError:
    return UsageError(f"{flag} {out} cannot be written ({exc.strerror}); fix its permissions or choose another {flag}")


def check_writable(out: str | Path, flag: str = "--out") -> None:
    """Refuse an output folder that cannot be written, before any work: create it (and its parents) if
    needed, create and remove a probe file in it, then remove the folders this created.

    Raises:
        UsageError: ``out`` is a file, lies inside a file, or cannot be created or written.
    """
    out = Path(out)
    created = _make_folders(out, flag)
    try:
        handle, name = tempfile.mkstemp(prefix=".write-probe-", dir=out)
        os.close(handle)
        os.unlink(name)
    except OSError as exc:
        raise _not_writable(out, flag, exc) from None
    finally:
        _remove_folders(created)


def _read_lock(path: Path) -> dict[str, Any]:
    try:
        holder = json.loads(path.read_text())
    except (OSError, ValueError):
        holder = None
    return holder if isinstance(holder, dict) else {}


def _running(pid: Any) -> bool:
    """Whether process ``pid`` of this machine runs (True where that cannot be told)."""
    if not isinstance(pid, int) or os.name == "nt":  # Windows' os.kill(pid, 0) would send it a Ctrl-C
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. another user's process
        return True
    return True


def _holder(record: Mapping[str, Any]) -> str:
    return (f"process {record.get('pid', '?')} on {record.get('host', '?')}, started {record.get('started', '?')}"
            if record else "a process that left an unreadable lock")


def _acquire(path: Path, flag: str) -> dict[str, Any]:
    """Create the lock file ``path`` (it must not exist); a stale lock of a process gone is taken over.

    Raises:
        UsageError: another live process holds the lock, naming it; or the folder cannot be written.
    """
    record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
              "command": " ".join(sys.argv)}
    took_over = False
    while True:
        try:
            handle = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            holder = _read_lock(path)
            if took_over or not holder or holder.get("host") != record["host"] or _running(holder.get("pid")):
                raise UsageError(f"{flag} {path.parent} is in use by {_holder(holder)} (lock file {path}); wait for "
                                 f"it to finish or choose another {flag}; if that process is gone, delete {path}"
                                 ) from None
            print(f"note: taking over the stale lock {path} of {_holder(holder)}, which no longer runs",
                  file=sys.stderr)
            path.unlink(missing_ok=True)
            took_over = True
        except OSError as exc:
            raise _not_writable(path.parent, flag, exc) from None
    with os.fdopen(handle, "w") as lock:
        json.dump(record, lock)
    return record


@contextlib.contextmanager
def locked(out: str | Path, flag: str = "--out") -> Iterator[Path]:
    """Hold the lock of the output folder ``out`` while the block runs (creating ``out`` if needed).

    The lock file (``LOCK_NAME``) records the pid, host and start time; a second command into the same
    folder is refused naming them, and a lock left by a process that no longer runs (same host) is taken
    over with a note. The lock is released however the block ends (return, error, Ctrl-C); folders
    created here that are still empty then are removed. Creating the lock file is also the check that
    ``out`` can be written.

    Raises:
        UsageError: ``out`` is in use, is a file, or cannot be created or written.
    """
    out = Path(out)
    created = _make_folders(out, flag)
    try:
        record = _acquire(out / LOCK_NAME, flag)
        try:
            yield out
        finally:
            if _read_lock(out / LOCK_NAME) == record:  # never remove a lock another process took over
                (out / LOCK_NAME).unlink(missing_ok=True)
    finally:
        _remove_folders(created)


def file_digest(path: str | Path) -> str:
    """A short content hash of a file (BLAKE2b), to notice input files that changed between runs."""
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def changed_files(recorded: Mapping[str, Mapping[str, str]], now: Mapping[str, Mapping[str, str]]) -> list[str]:
    """``subject role`` for every file whose digest differs (or that appeared or went) between two records."""
    return [f"{case} {role}" for case in sorted(set(recorded) | set(now))
            for role in sorted(set(recorded.get(case, {})) | set(now.get(case, {})))
            if recorded.get(case, {}).get(role) != now.get(case, {}).get(role)]
