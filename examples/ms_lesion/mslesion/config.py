"""The training configuration: every value a run uses, resolved once by ``train.py`` and recorded whole.

``train.py`` parses the command line, fills the preset's values, chooses the device and the demo
cohort, and builds one frozen ``TrainingConfig``; ``training.run_training`` takes that object and
nothing else. Checkpoints store ``TrainingConfig.record()`` under ``"training"``; ``evaluate.py``,
``predict.py`` and ``experiment.py`` read the crop and the data options from there
(``recorded_config``). ``--resume`` compares every field except ``RUN_FIELDS``, the short list of
values that cannot change the trained weights.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .data.augment import AUGMENTATIONS
from .data.reading import CENTRES, DataOptions
from .inference.sliding_window import DEFAULT_OVERLAP
from .model.loss import LOSSES, WEIGHTINGS
from .model.unet import FILTER_PRESETS, METHODS, parse_method, resolve_filters
from .run import UsageError
from .training.runtime import AMP_CHOICES

# --preset: the values an explicit flag does not set. "paper" is the paper's protocol (for a GPU); "cpu"
# the best measured configuration for 1 mm scans within 15 minutes on 2 CPU cores; "demo" the no-data
# demo. docs/ms_lesion_training.md ("CPU or GPU") has the measurements that chose them.
PRESETS: dict[str, dict[str, Any]] = {
    "paper": {"iterations": 800, "batch_size": 4, "crop": (32, 128, 128), "filters": "paper",
              "lesion_crop_fraction": 0.0, "val_every": 200, "lr_schedule": "constant", "augment": "none"},
    "cpu": {"iterations": 300, "batch_size": 2, "crop": (64, 64, 64), "filters": "half",
            "lesion_crop_fraction": 0.5, "val_every": 0, "lr_schedule": "poly", "augment": "light"},
    "demo": {"iterations": 150, "batch_size": 2, "crop": (32, 64, 64), "filters": "tiny",
             "lesion_crop_fraction": 0.5, "val_every": 75, "lr_schedule": "constant", "augment": "light"},
}
LR_SCHEDULES: tuple[str, ...] = ("constant", "poly")
# Fields that cannot change the trained weights: --resume accepts other values for them. The data folder
# is here because the training files themselves are compared (by content) instead of their path.
RUN_FIELDS: frozenset[str] = frozenset({
    "data", "demo_cohort", "preset", "out", "device", "threads", "malloc_tuning", "progress", "checkpoint_every",
    "val_every", "overlap", "stop_at", "resume", "overwrite",
})


def _finite(value: float, flag: str, *, low: float, low_open: bool = False, high: float = math.inf,
            high_open: bool = False) -> None:
    """Refuse NaN/inf and values outside the interval, naming the flag."""
    bad_low = value <= low if low_open else value < low
    bad_high = value >= high if high_open else value > high
    if not math.isfinite(value) or bad_low or bad_high:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open or high == math.inf else ']'}"
        raise UsageError(f"{flag} must be a finite number in {interval}, got {value!r}")


def _choice(value: Any, flag: str, choices: tuple[Any, ...]) -> None:
    if value not in choices:
        raise UsageError(f"{flag} must be one of {', '.join(map(str, choices))}, got {value!r}")


def _at_least(value: int | None, flag: str, low: int) -> None:
    if value is not None and value < low:
        raise UsageError(f"{flag} must be >= {low}, got {value}")


@dataclass(frozen=True)
class TrainingConfig:
    """Everything one training run uses, resolved (no ``None`` meaning "decide later").

    The first block has no default: ``train.py`` fills it from the preset and the environment.
    Values are checked on construction; a bad value raises ``UsageError`` naming its flag.
    """

    data: str                               # dataset folder, absolute
    data_options: DataOptions
    preset: str
    iterations: int
    batch_size: int
    crop: tuple[int, int, int]              # (D, H, W), also the inference tile
    filters: tuple[int, ...]                # widths per level
    lesion_crop_fraction: float
    val_every: int                          # 0 = only at the end
    lr_schedule: str
    out: str
    device: str                             # resolved, e.g. "cpu" or "cuda:0"
    demo_cohort: bool = False               # data is the generated demo cohort (made on first use)
    split_file: str | None = None
    test_fraction: float = 23 / 43
    method: str = "rsa-010"
    attention_scale: float | str | None = None   # None (the paper), "auto" or a positive float
    prior_start: bool = True
    lr: float = 1e-3
    weight_decay: float = 1e-5
    attention_weight_decay: float = 0.0
    loss: str = "ce"                        # loss.LOSSES: the weighted cross-entropy, or Dice + cross-entropy
    loss_weights: str = "swapped"
    crop_centre: str = "brain"
    augment: str = "none"                   # augment.AUGMENTATIONS; "none" is the paper's plain random crops
    ema: float = 0.0                        # decay of an exponential moving average of the weights; 0 = final
    seed: int = 0
    amp: str = "auto"
    checkpoint_every: int = 50
    overlap: float = DEFAULT_OVERLAP
    threads: int | None = None              # None: $OMP_NUM_THREADS or the usable cores
    malloc_tuning: bool = True
    progress: bool = True
    stop_at: int | None = None
    resume: bool = False
    overwrite: bool = False

    def __post_init__(self) -> None:
        _choice(self.preset, "--preset", tuple(PRESETS))
        _choice(self.method, "--method", METHODS)
        _choice(self.lr_schedule, "--lr-schedule", LR_SCHEDULES)
        _choice(self.loss, "--loss", LOSSES)
        _choice(self.loss_weights, "--loss-weights", WEIGHTINGS)
        _choice(self.crop_centre, "--crop-centre", CENTRES)
        _choice(self.augment, "--augment", AUGMENTATIONS)
        _choice(self.amp, "--amp", AMP_CHOICES)
        for flag, value, low in (("--iterations", self.iterations, 1), ("--batch-size", self.batch_size, 1),
                                 ("--checkpoint-every", self.checkpoint_every, 1), ("--val-every", self.val_every, 0),
                                 ("--stop-at", self.stop_at, 1), ("--threads", self.threads, 1)):
            _at_least(value, flag, low)
        if len(self.crop) != 3 or min(self.crop) < 1:
            raise UsageError(f"--crop needs three sizes >= 1 (D H W), got {' '.join(map(str, self.crop))}")
        if len(self.filters) < 2 or min(self.filters) < 1:
            raise UsageError(f"--filters needs at least two positive ints (one per level), got {list(self.filters)}")
        _finite(self.lr, "--lr", low=0.0, low_open=True)
        _finite(self.weight_decay, "--weight-decay", low=0.0)
        _finite(self.attention_weight_decay, "--attention-weight-decay", low=0.0)
        _finite(self.ema, "--ema", low=0.0, high=1.0, high_open=True)
        _finite(self.lesion_crop_fraction, "--lesion-crop-fraction", low=0.0, high=1.0)
        _finite(self.test_fraction, "--test-fraction", low=0.0, high=1.0, high_open=True)
        _finite(self.overlap, "--overlap", low=0.0, high=1.0, high_open=True)
        if isinstance(self.attention_scale, float):
            _finite(self.attention_scale, "--attention-scale", low=0.0, low_open=True)
        elif self.attention_scale not in (None, "auto"):
            raise UsageError(f"--attention-scale must be none, auto or a positive number, got {self.attention_scale!r}")
        if self.resume and self.overwrite:
            raise UsageError("--resume and --overwrite contradict each other: continue the run or replace it")

    # -------------------------------------------------------------------------------------- derived

    @property
    def attention(self) -> str | None:
        """The attention kind of ``method`` (``sliceattn.build_attention``'s ``"rsa"`` or ``"nonlocal"``), None for
        the plain U-Net."""
        return parse_method(self.method)[0]

    @property
    def attention_options(self) -> dict[str, Any]:
        """Keyword arguments of the method's attention blocks."""
        return {"scale": self.attention_scale} if self.attention == "rsa" else {}

    def learning_rate(self, iteration: int) -> float:
        """The learning rate of ``iteration`` (1-based): constant, or nnU-Net's polynomial decay
        ``lr * (1 - (iteration - 1) / iterations) ** 0.9``."""
        if self.lr_schedule == "poly":
            return self.lr * (1.0 - (iteration - 1) / self.iterations) ** 0.9
        return self.lr

    # ------------------------------------------------------------------------------------- record

    def record(self) -> dict[str, Any]:
        """A JSON-able dict of every field; ``TrainingConfig.from_record`` rebuilds the config."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {**values, "data_options": self.data_options.record(), "crop": list(self.crop),
                "filters": list(self.filters)}

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> TrainingConfig:
        """The config a checkpoint recorded (``record()``'s inverse)."""
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in record.items() if k in names}  # a field added later takes its default
        return cls(**{**values, "data_options": DataOptions.from_record(record["data_options"]),
                      "crop": tuple(record["crop"]), "filters": tuple(record["filters"])})

    def resume_differences(self, recorded: Mapping[str, Any]) -> list[str]:
        """``--flag: recorded X, now Y`` for each weight-changing field that differs from ``recorded``.

        ``iterations`` is left to the caller: a constant-schedule run may be extended. A field the record
        lacks (added to the config after the run started) counts as its default.
        """
        now = self.record()
        defaults = {f.name: f.default for f in dataclasses.fields(self) if f.default is not dataclasses.MISSING}
        lines = []
        for key in sorted((set(now) | set(recorded)) - RUN_FIELDS - {"iterations"}):
            before, after = recorded.get(key, defaults.get(key, "<unset>")), now.get(key, "<unset>")
            if before != after:
                lines.append(f"--{key.replace('_', '-')}: recorded {before!r}, now {after!r}")
        return lines


def parse_filters(text: str) -> tuple[int, ...]:
    """A ``--filters`` value (a preset name or comma-separated ints) as the widths per level, so that
    ``tiny`` and ``4,8,16,32,64`` are the same configuration."""
    try:
        return resolve_filters(text if text in FILTER_PRESETS else [int(v) for v in text.split(",")])
    except ValueError:
        raise UsageError(f"--filters {text!r}: give a preset {sorted(FILTER_PRESETS)} or at least two "
                         "comma-separated positive ints such as 16,32,64,128,256") from None


def parse_attention_scale(text: str | None) -> float | str | None:
    """``--attention-scale``: ``none`` -> None, ``auto``, or a float."""
    if text is None or text.lower() == "none":
        return None
    if text.lower() == "auto":
        return "auto"
    try:
        return float(text)
    except ValueError:
        raise UsageError(f"--attention-scale must be none, auto or a number, got {text!r}") from None


def recorded_config(checkpoint: Mapping[str, Any], path: str | Path) -> TrainingConfig:
    """The training configuration a ``train.py`` checkpoint recorded.

    Raises:
        UsageError: the checkpoint predates the recorded configuration or holds a damaged one.
    """
    try:
        return TrainingConfig.from_record(checkpoint["training"])
    except (KeyError, TypeError, ValueError) as exc:
        raise UsageError(f"checkpoint {path} holds no usable training configuration ({exc}); it was written by "
                         "another version of train.py: retrain it with this one") from None
