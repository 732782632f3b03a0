"""The training configuration: every value a run uses, resolved once and recorded whole.

``cli.make_config`` (``train.py``, ``experiment.py``) parses the command line, fills the preset's values,
chooses the device and the demo cohort, and builds one frozen ``TrainingConfig``;
``training.loop.run_training`` takes that object and nothing else. ``FLAGS`` is the one list of its fields,
each with the flag that sets it: ``make_config`` fills every field from it, and the checks and the
``--resume`` differences name the flags through it. Checkpoints (``checkpoint.py``) store
``TrainingConfig.record()`` under ``"training"``. ``--resume`` compares every field except
``RUN_FIELDS``, the short list of values that cannot change the trained weights.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .data.augment import AUGMENTATIONS
from .data.reading import CENTRES, DataOptions
from .inference.sliding_window import DEFAULT_OVERLAP
from .model.loss import LOSSES, WEIGHTINGS
from .model.unet import FILTER_PRESETS, METHODS, model_config, parse_method, resolve_filters
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
# Each field of TrainingConfig <- the flag of train.py (and experiment.py after '--') that sets it; the fields of
# its DataOptions as "data_options.<field>". The one list of the fields: cli.make_config fills every field from it
# (a field whose flag's argparse dest is the field name is read as given; the others make_config derives), the
# checks name a value by it, and so do the --resume differences. A field missing here fails at import.
FLAGS: dict[str, str] = {
    "data": "--data", "demo_cohort": "--data", "split_file": "--split", "test_fraction": "--test-fraction",
    "data_options.layout": "--layout", "data_options.modalities": "--modalities", "data_options.patterns": "--pattern",
    "data_options.label2": "--label2", "data_options.resample": "--resample",
    "data_options.normalisation": "--normalisation",
    "preset": "--preset", "method": "--method", "filters": "--filters", "attention_scale": "--attention-scale",
    "iterations": "--iterations", "batch_size": "--batch-size", "crop": "--crop", "lr": "--lr",
    "lr_schedule": "--lr-schedule", "weight_decay": "--weight-decay", "attention_weight_decay": "--attention-weight-decay",
    "loss_weights": "--loss-weights", "loss": "--loss", "lesion_crop_fraction": "--lesion-crop-fraction",
    "crop_centre": "--crop-centre", "augment": "--augment", "ema": "--ema", "prior_start": "--no-prior-start",
    "seed": "--seed", "out": "--out", "resume": "--resume", "overwrite": "--overwrite",
    "checkpoint_every": "--checkpoint-every", "val_every": "--val-every", "overlap": "--overlap", "device": "--device",
    "threads": "--threads", "malloc_tuning": "--no-malloc-tuning", "amp": "--amp", "stop_at": "--stop-at",
    "progress": "--no-progress",
}
# The fields with a fixed set of values, and that set: the config checks them, argparse's choices= share them.
CHOICES: dict[str, tuple[str, ...]] = {
    "preset": tuple(PRESETS), "method": METHODS, "lr_schedule": LR_SCHEDULES, "loss": LOSSES, "loss_weights": WEIGHTINGS,
    "crop_centre": CENTRES, "augment": AUGMENTATIONS, "amp": AMP_CHOICES,
}
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
        for name, choices in CHOICES.items():
            _choice(getattr(self, name), FLAGS[name], choices)
        for name, low in (("iterations", 1), ("batch_size", 1), ("checkpoint_every", 1), ("val_every", 0),
                          ("stop_at", 1), ("threads", 1)):
            _at_least(getattr(self, name), FLAGS[name], low)
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

    @property
    def network_config(self) -> dict[str, Any]:
        """The network's ``model_config`` (``build_model(**config.network_config)`` rebuilds it): the method,
        the filters and the attention options are recorded here only."""
        return model_config(self.method, in_channels=len(self.data_options.modalities), filters=self.filters,
                            attention_options=self.attention_options)

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

    def resume_differences(self, recorded: TrainingConfig) -> list[str]:
        """``--flag: recorded X, now Y`` for each weight-changing value that differs from ``recorded``'s.

        ``iterations`` is left to the caller: a constant-schedule run may be extended. The flag comes from
        ``FLAGS``, with the field's name beside it where the two differ (``--no-prior-start (prior_start)``).
        """
        before, now = _flat(recorded.record()), _flat(self.record())
        lines = []
        for key in FLAGS:
            if key.split(".")[0] in RUN_FIELDS or key == "iterations" or before[key] == now[key]:
                continue
            name = key.split(".")[-1]
            shown = FLAGS[key] if FLAGS[key] == "--" + name.replace("_", "-") else f"{FLAGS[key]} ({name})"
            lines.append(f"{shown}: recorded {before[key]!r}, now {now[key]!r}")
        return lines


def _flat(record: Mapping[str, Any]) -> dict[str, Any]:
    """A record with its data options as ``data_options.<field>`` keys, as ``FLAGS`` names them."""
    options = {f"data_options.{k}": v for k, v in record["data_options"].items()}
    return {**{k: v for k, v in record.items() if k != "data_options"}, **options}


def _check_flags() -> None:
    """Every field of ``TrainingConfig`` (and of its ``DataOptions``) has its flag in ``FLAGS``, and nothing else."""
    fields = {f.name for f in dataclasses.fields(TrainingConfig) if f.name != "data_options"}
    fields |= {f"data_options.{f.name}" for f in dataclasses.fields(DataOptions)}
    if fields != set(FLAGS):
        raise RuntimeError(f"config.FLAGS lacks {sorted(fields - set(FLAGS))} and has {sorted(set(FLAGS) - fields)} "
                           "beyond the fields of TrainingConfig: give every field its flag")


_check_flags()


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
