"""The one module that writes and reads a run's ``model.pt`` and ``checkpoint.pt``.

Both files hold the run's record (``RunRecord``: the whole ``TrainingConfig``, the lesion prior ``r``,
the split, a content hash of every input file and the training subjects' voxel spacings) and
``"model"``, the weights to predict with: the moving average with ``--ema``, else the last weights.
``checkpoint.pt`` adds ``"resume"``, what ``--resume`` continues (``ResumeState``). The network is
rebuilt from the recorded configuration (``TrainingConfig.network_config``), so the method and the
filters are recorded once. A file of another layout is refused with one line naming what it lacks.

Layout (``LAYOUT = 2``)::

    {"layout": 2, "training": TrainingConfig.record(), "r": float, "split": {"train": [ids], "test": [ids]},
     "files": {id: {role: digest}}, "spacings": {training id: [D, H, W] mm}, "model": state_dict,
     "resume": {"iteration", "seconds", "optimizer", "scaler", "rng", "network", "ema_count"}}  # checkpoint.pt

``resume["network"]`` holds the last weights only with ``--ema`` (without it they are ``"model"``), and
``resume["ema_count"]`` the moving average's step count (None without ``--ema``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import TrainingConfig
from .model.unet import UNet3d, build_model
from .run import UsageError, save_atomically

LAYOUT = 2
RECORD_KEYS = ("training", "r", "split", "files", "spacings")
RESUME_KEYS = ("iteration", "seconds", "optimizer", "scaler", "rng", "network", "ema_count")
# A scan whose voxel size on an axis is more than this fraction above the largest training value (or
# below the smallest divided by 1 + it) gets a warning: 4x4x6 mm training scans segmented a 1x1x3 mm
# one with Dice 0.14 against 0.76 (docs/ms_lesion_training.md); 0.94 against 1 mm stays quiet.
SPACING_TOLERANCE = 0.25


@dataclass(frozen=True)
class RunRecord:
    """What a run records with its weights: its configuration, the lesion prior, the split, the inputs."""

    training: TrainingConfig
    r: float                                        # mean lesion fraction of the training subjects
    split: dict[str, list[str]]
    files: dict[str, dict[str, str]]                # subject -> role -> content digest
    spacings: dict[str, tuple[float, float, float]]  # training subject -> voxel size (D, H, W) in mm

    def spacing_range(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """The smallest and the largest training voxel size per axis ``(D, H, W)``, in mm."""
        values = list(self.spacings.values())
        return tuple(map(min, zip(*values))), tuple(map(max, zip(*values)))


@dataclass
class ResumeState:
    """What ``--resume`` continues from ``checkpoint.pt``."""

    iteration: int
    seconds: float
    network: dict[str, Any]          # the last weights
    optimizer: dict[str, Any]
    scaler: dict[str, Any]
    rng: dict[str, Any]
    ema: dict[str, Any] | None       # ``AveragedModel.state_dict()`` with ``--ema``, else None


@dataclass
class Checkpoint:
    """A read ``model.pt`` or ``checkpoint.pt``."""

    path: Path
    record: RunRecord
    weights: dict[str, Any]          # the weights to predict with (with --ema: the moving average)
    state: ResumeState | None        # checkpoint.pt only

    def build_model(self, device: torch.device | str = "cpu") -> UNet3d:
        """The trained network in eval mode on ``device``.

        Raises:
            UsageError: the weights do not fit the recorded network.
        """
        model = build_model(**self.record.training.network_config)
        try:
            model.load_state_dict(self.weights)
        except RuntimeError as exc:
            raise UsageError(f"checkpoint {self.path}: the weights do not fit its own model config: {exc}") from None
        return model.to(device).eval()


# ------------------------------------------------------------------------------------------------ write


def _record(record: RunRecord) -> dict[str, Any]:
    return {"layout": LAYOUT, "training": record.training.record(), "r": float(record.r), "split": record.split,
            "files": record.files, "spacings": {k: [float(v) for v in s] for k, s in record.spacings.items()}}


def write_model(path: str | Path, record: RunRecord, weights: Mapping[str, Any]) -> Path:
    """Write ``model.pt``: the record and the weights to predict with, atomically."""
    content = {**_record(record), "model": dict(weights)}
    return save_atomically(path, lambda tmp: torch.save(content, tmp))


def write_checkpoint(path: str | Path, record: RunRecord, state: ResumeState) -> Path:
    """Write ``checkpoint.pt``: the record, the weights to predict with and the resume state, atomically."""
    if state.ema is not None:  # the average is "model"; the last weights go beside it
        weights = {k.removeprefix("module."): v for k, v in state.ema.items() if k.startswith("module.")}
        network, count = state.network, state.ema["n_averaged"]
    else:
        weights, network, count = state.network, None, None
    resume = {"iteration": state.iteration, "seconds": state.seconds, "optimizer": state.optimizer,
              "scaler": state.scaler, "rng": state.rng, "network": network, "ema_count": count}
    content = {**_record(record), "model": weights, "resume": resume}
    return save_atomically(path, lambda tmp: torch.save(content, tmp))


# ------------------------------------------------------------------------------------------------- read


def _load(path: Path) -> dict[str, Any]:
    """The file's dict, refusing a missing, unreadable, foreign or older file with one line."""
    if not path.is_file():
        raise UsageError(f"checkpoint {path} does not exist")
    try:
        content = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch raises many types for damaged files; all mean "unreadable"
        raise UsageError(f"checkpoint {path} cannot be read (truncated or not a torch file): {exc}") from None
    if isinstance(content, dict) and "layout" not in content and {"config", "model", "training"} <= content.keys():
        raise UsageError(f"checkpoint {path} has an older layout (no training voxel spacing, the network recorded "
                         "apart from the configuration): retrain it with this version of train.py")
    if not isinstance(content, dict) or content.get("layout") != LAYOUT:
        found = content.get("layout") if isinstance(content, dict) else None
        raise UsageError(f"{path} is not a checkpoint written by this train.py (layout {found!r}, expected "
                         f"{LAYOUT}): retrain it with this version")
    missing = [key for key in (*RECORD_KEYS, "model") if key not in content]
    if missing:
        raise UsageError(f"checkpoint {path} lacks {', '.join(missing)}: retrain it with this version of train.py")
    return content


def _resume_state(resume: Mapping[str, Any], weights: dict[str, Any], path: Path) -> ResumeState:
    missing = [key for key in RESUME_KEYS if key not in resume]
    if missing:
        raise UsageError(f"checkpoint {path} lacks the resume entries {', '.join(missing)}: start a new run "
                         "(--overwrite)")
    ema = None
    if resume["ema_count"] is not None:
        ema = {**{f"module.{k}": v for k, v in weights.items()}, "n_averaged": resume["ema_count"]}
    network = resume["network"] if resume["network"] is not None else weights
    return ResumeState(resume["iteration"], resume["seconds"], network, resume["optimizer"], resume["scaler"],
                       resume["rng"], ema)


def read(path: str | Path) -> Checkpoint:
    """Read ``model.pt`` or ``checkpoint.pt``.

    Raises:
        UsageError: the file is missing, truncated, foreign, of an older layout or lacks an entry; the
            message names the file (and what it lacks).
    """
    path = Path(path)
    content = _load(path)
    try:
        training = TrainingConfig.from_record(content["training"])
        spacings = {str(k): (float(s[0]), float(s[1]), float(s[2])) for k, s in content["spacings"].items()}
        record = RunRecord(training, float(content["r"]), content["split"], content["files"], spacings)
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise UsageError(f"checkpoint {path} holds no usable training record ({exc}): retrain it with this version "
                         "of train.py") from None
    state = _resume_state(content["resume"], content["model"], path) if "resume" in content else None
    return Checkpoint(path, record, content["model"], state)


def load_trained(path: str | Path, device: torch.device | str = "cpu") -> tuple[UNet3d, Checkpoint]:
    """The trained network of ``model.pt`` or ``checkpoint.pt`` (the same weights: with ``--ema`` both hold
    the moving average), in eval mode on ``device``, and the read checkpoint (``record.training`` for the
    crop and the data options, ``record.split``, ``record.spacings``...)."""
    checkpoint = read(path)
    return checkpoint.build_model(device), checkpoint


# ---------------------------------------------------------------------------------------------- spacing


def _mm(values: Sequence[float]) -> str:
    return "x".join(f"{v:g}" for v in values)


def spacing_warning(record: RunRecord, case_id: str, spacing: Sequence[float]) -> str | None:
    """A warning when a scan's voxel size ``(D, H, W)`` mm is outside the training range by more than
    ``SPACING_TOLERANCE`` on some axis, else None."""
    low, high = record.spacing_range()
    if not low or all(lo / (1 + SPACING_TOLERANCE) <= s <= hi * (1 + SPACING_TOLERANCE)
                      for s, lo, hi in zip(spacing, low, high)):
        return None
    trained = _mm(low) if low == high else f"{_mm(low)} to {_mm(high)}"
    return (f"subject {case_id}: the model was trained at {trained} mm (D, H, W) and this scan is {_mm(spacing)} mm, "
            f"more than {SPACING_TOLERANCE:.0%} apart on an axis; its results may be worse than on scans like the "
            "training ones")
