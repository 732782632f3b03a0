"""Command-line plumbing the scripts share: the data, inference and training options, devices, and error lines.

Every script that reads data takes the same data options (``add_data_options``); ``train.py`` records
the resolved values with the model, and ``evaluate.py``/``predict.py``/``experiment.py`` start from the
recorded values (``data_options``). ``train.py``'s options (``add_training_arguments``) and
``make_config``, which turns them into the one ``TrainingConfig`` through ``config.FLAGS``, are here
because ``experiment.py`` makes each of its runs' configuration with them too. A user mistake is one
``error: ...`` line on stderr and exit status 2 (``command``), checked before any long work starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from .config import FLAGS, LR_SCHEDULES, PRESETS, TrainingConfig, parse_attention_scale, parse_filters
from .data.augment import AUGMENTATIONS
from .data.reading import CENTRES, LABEL2_MODES, LAYOUTS, MODALITIES, NNUNET_IMAGES, NORMALISATIONS, DataError, DataOptions, describe, parse_patterns, resolve_layout
from .inference.sliding_window import DEFAULT_OVERLAP, DEFAULT_THRESHOLD
from .inference.lesions import DEFAULT_MIN_LESION_MM3
from .model.loss import LOSSES, WEIGHTINGS
from .model.unet import FILTER_PRESETS, METHODS
from .run import UsageError
from .training.runtime import AMP_CHOICES, select_device

class Parser(argparse.ArgumentParser):
    """argparse with whole option names only (no silent abbreviations) and a one-line ``error:`` message."""

    def __init__(self, description: str | None = None) -> None:
        super().__init__(description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                         allow_abbrev=False)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def add_data_options(parser: argparse.ArgumentParser) -> None:
    """``--layout --modalities --pattern --label2 --resample --normalisation --list`` (defaults: see help)."""
    group = parser.add_argument_group("data options (evaluate/predict/experiment default to the model's)")
    group.add_argument("--layout", choices=LAYOUTS, default=None, help="dataset layout (default: auto = nnU-Net "
                       "if DIR/dataset.json or DIR/imagesTr exists, else one folder per subject)")
    group.add_argument("--modalities", nargs="+", default=None, metavar="NAME",
                       help="input channels in order, comma- or space-separated, e.g. flair,t1 "
                       f"(default: {','.join(MODALITIES)})")
    group.add_argument("--pattern", action="append", default=None, metavar="ROLE=GLOB",
                       help="choose a role's file by a case-insensitive glob instead of the built-in name rules; "
                       "ROLE is a modality, mask or brain_mask; '|' separates alternatives, '!' excludes, a '/' "
                       "matches the path inside the subject folder; repeatable (e.g. --pattern 'mask=*mask1*')")
    group.add_argument("--label2", choices=LABEL2_MODES, default=None,
                       help="what a lesion-mask value 2 means: error, ignore (left out of loss and metrics) or "
                       "lesion (default: error)")
    group.add_argument("--resample", action="store_const", const=True, default=None,
                       help="resample modalities and masks onto the first modality's grid when shapes or affines "
                       "differ (default: refuse)")
    group.add_argument("--normalisation", choices=NORMALISATIONS, default=None,
                       help="z-score each modality over 'foreground' (non-zero voxels: depends only on the images, "
                       "so the model also reads scans without a brain-mask file) or 'brain-mask' (inside each "
                       f"subject's brain-mask file, then required for every scan) (default: {DataOptions.normalisation})")
    group.add_argument("--list", action="store_true",
                       help="print which file took which role for each subject, shapes, spacings and lesion "
                       "fractions, then stop")


def add_nnunet_images_option(parser: argparse.ArgumentParser) -> None:
    """``--nnunet-images``: which image folders of an nnU-Net data set a script reads."""
    parser.add_argument("--nnunet-images", choices=NNUNET_IMAGES, default=NNUNET_IMAGES[0],
                        help="nnU-Net layout: read imagesTr (labels in labelsTr), imagesTs (labels, if any, in "
                        f"labelsTs) or both (default: {NNUNET_IMAGES[0]}); other layouts ignore it")


def say_nnunet_folders(root: str | Path, options: DataOptions, chosen: str) -> None:
    """In the nnU-Net layout, say which image folders are read and which one is left out."""
    root = Path(root)
    if resolve_layout(root, options.layout) != "nnunet":
        return
    read = ("imagesTr", "imagesTs") if chosen == "both" else (chosen,)
    unread = [name for name in ("imagesTr", "imagesTs") if name not in read and (root / name).is_dir()]
    note = f"; {', '.join(unread)} is not read (--nnunet-images {unread[0]} or both)" if unread else ""
    print(f"nnU-Net layout: reading {' and '.join(read)}{note}")


def _modalities(values: Sequence[str]) -> tuple[str, ...]:
    return tuple(name.strip().lower() for value in values for name in value.split(",") if name.strip())


def data_options(args: argparse.Namespace, recorded: DataOptions | None = None) -> DataOptions:
    """The data options of a command: the recorded ones (or the defaults) with the explicit flags on top.

    Raises:
        UsageError: an explicit ``--modalities`` or ``--normalisation`` contradicts the model's.
    """
    base = recorded or DataOptions()
    try:
        patterns = {**base.patterns, **parse_patterns(args.pattern or [])}
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    modalities = base.modalities if args.modalities is None else _modalities(args.modalities)
    normalisation = args.normalisation or base.normalisation
    if recorded is not None:
        if modalities != recorded.modalities:
            raise UsageError(f"--modalities {','.join(modalities)} differs from the model's "
                             f"{','.join(recorded.modalities)}: it was trained on those channels in that order")
        if normalisation != recorded.normalisation:
            raise UsageError(f"--normalisation {normalisation} differs from the model's {recorded.normalisation}")
    try:
        return DataOptions(
            layout=args.layout or base.layout, modalities=modalities, patterns=patterns,
            label2=args.label2 or base.label2, resample=base.resample if args.resample is None else True,
            normalisation=normalisation,
        )
    except ValueError as exc:  # DataOptions checks the names: unknown or repeated modalities, roles
        raise UsageError(str(exc)) from None


def list_cases(root: str | Path, options: DataOptions, *, require_mask: bool) -> int:
    """Print ``describe`` for every subject of ``root`` and one ``error:`` line for each unusable one.

    Returns:
        The exit status: 0, or 1 when a subject cannot be used.
    """
    errors: dict[str, DataError] = {}
    found = options.find(root, require_mask=require_mask, errors=errors)
    for paths in found:
        try:
            print(describe(Path(root), paths, options.load(paths)))
        except DataError as exc:
            errors[paths.id] = exc
    for case_id, error in errors.items():
        print(f"error: subject {case_id}: {error}", file=sys.stderr)
    return 1 if errors else 0


def finite_float(text: str) -> float:
    """argparse ``type=`` of every float option: a number that is neither NaN nor infinite.

    NaN passes every ``>=`` and ``<`` check (``--min-lesion-size nan`` once removed every lesion), so each
    float option is refused here first, and argparse names the flag: ``argument --lr: nan: give a finite
    number``.
    """
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text}: give a finite number")
    return value


def _overlap(text: str) -> float:
    value = finite_float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def add_inference_options(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """The options every script that runs the model shares: ``--overlap`` and ``--device``."""
    parser.add_argument("--overlap", type=_overlap, default=DEFAULT_OVERLAP,
                        help=f"sliding-window tile overlap, in [0, 1) (default: {DEFAULT_OVERLAP:g})")
    parser.add_argument(
        "--device", default="auto", help="'auto' (CUDA if present), 'cpu', 'cuda', 'cuda:1'..., 'mps' (default: auto)"
    )


def _mm3(text: str) -> float:
    value = finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 mm^3, got {text}")
    return value


def _probability(text: str) -> float:
    value = finite_float(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must be a probability in (0, 1), got {text}")
    return value


def add_postprocessing_options(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """``--tta``, ``--threshold`` and ``--min-lesion-size``: what evaluation and prediction do to the network's output."""
    parser.add_argument("--tta", action="store_true",
                        help="average the probabilities over the 8 mirrorings of each tile (8x the time)")
    parser.add_argument("--threshold", type=_probability, default=DEFAULT_THRESHOLD,
                        help=f"a voxel is lesion where its lesion probability is above this (default: {DEFAULT_THRESHOLD:g}, "
                        "the argmax)")
    parser.add_argument("--min-lesion-size", type=_mm3, default=DEFAULT_MIN_LESION_MM3, metavar="MM3",
                        help="remove predicted lesions (26-connected) smaller than this many mm^3 "
                        f"(default: {DEFAULT_MIN_LESION_MM3:g})")


def add_runtime_options(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """``--threads`` and ``--no-malloc-tuning``: how the process uses the CPU and memory."""
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads of torch (default: $OMP_NUM_THREADS if set, else the cores this process "
                        "may use; with N processes under torchrun, that number divided by N)")
    parser.add_argument("--no-malloc-tuning", action="store_true",
                        help="keep glibc's default allocator settings (default: large tensors come from the heap "
                        "instead of a fresh mmap each time, as MALLOC_MMAP_MAX_=0 does: faster CPU training steps)")


def add_amp_option(parser: argparse.ArgumentParser | argparse._ArgumentGroup, default: str) -> None:
    """``--amp``: the autocast dtype (``runtime.resolve_amp``); ``default`` is the help's account of the default."""
    parser.add_argument("--amp", choices=AMP_CHOICES, default=None, help=f"autocast dtype: {default}")


def command(main: Callable[[Sequence[str] | None], int]) -> Callable[[Sequence[str] | None], int]:
    """Wrap a script's ``main``: a ``UsageError`` or ``DataError`` becomes one ``error:`` line and exit 2, Ctrl-C
    one line and exit 130."""
    @functools.wraps(main)
    def wrapped(argv: Sequence[str] | None = None) -> int:
        try:
            return main(argv)
        except (UsageError, DataError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        except KeyboardInterrupt as interrupt:  # Ctrl-C: one line (training says where its checkpoint is)
            print(str(interrupt) or "interrupted", file=sys.stderr)
            return 130
        except BrokenPipeError:  # the output went to a pager or `head` that closed early
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (Python's documented recipe)
            return 0
    return wrapped


# ------------------------------------------------------------------------------------- training options


# Each default lives in TrainingConfig (or PRESETS); the parser's defaults are None, "not given".
DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainingConfig) if f.default is not dataclasses.MISSING}


def _default(name: str) -> str:
    return f"(default: {DEFAULTS[name]})"


def _preset_default(key: str) -> str:
    show = (lambda v: " ".join(map(str, v))) if isinstance(PRESETS["paper"][key], tuple) else str
    return "(default: from --preset: " + ", ".join(f"{name} {show(v[key])}" for name, v in PRESETS.items()) + ")"


def add_training_arguments(parser: argparse.ArgumentParser) -> None:
    """Every option of ``train.py``: ``experiment.py`` parses its flags after '--' with them too."""
    parser.add_argument("--data", default=None, help="dataset folder (subject folders or nnU-Net layout); "
                        "default: generate the synthetic demo cohort in the cache and train the demo preset")
    parser.add_argument("--split", dest="split_file", default=None, help="split JSON {'train': [ids], 'test': [ids]} (experiment.py "
                        "writes these); default: a random split with --test-fraction")
    parser.add_argument("--test-fraction", type=finite_float, default=None,
                        help="held-out fraction of subjects when no --split is given (default: 23/43, the paper)")
    add_data_options(parser)
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="the values below that are not given (see the table above; default: demo without "
                        "--data, else paper on CUDA and cpu on the CPU)")
    add_model_options(parser.add_argument_group("model"))
    add_training_options(parser.add_argument_group("training"))
    add_run_options(parser.add_argument_group("run"))


def add_model_options(model: argparse._ArgumentGroup) -> None:
    """``--method --filters --attention-scale``."""
    model.add_argument("--method", choices=METHODS, default=None, help=f"network {_default('method')}")
    model.add_argument("--filters", default=None, help=f"filter preset {sorted(FILTER_PRESETS)} or comma-separated "
                       f"ints {_preset_default('filters')}")
    model.add_argument("--attention-scale", default=None, help="RSA logit scale: none (the paper), 'auto' "
                       "(1/sqrt(C*H*W)) or a positive float (default: none)")


def add_training_options(train: argparse._ArgumentGroup) -> None:
    """The optimisation: iterations, batch, crops, learning rate, decay, loss, seed."""
    train.add_argument("--iterations", type=int, default=None, help=f"optimiser steps {_preset_default('iterations')}")
    train.add_argument("--batch-size", type=int, default=None,
                       help=f"crops per step, over all processes {_preset_default('batch_size')}")
    train.add_argument("--crop", type=int, nargs=3, default=None, metavar=("D", "H", "W"),
                       help=f"crop size, also the inference tile; multiples of 16 {_preset_default('crop')}")
    train.add_argument("--lr", type=finite_float, default=None, help=f"Adam learning rate {_default('lr')}")
    train.add_argument("--lr-schedule", choices=LR_SCHEDULES, default=None, help="constant, or nnU-Net's polynomial "
                       f"decay lr*(1-i/iterations)^0.9 {_preset_default('lr_schedule')}")
    train.add_argument("--weight-decay", type=finite_float, default=None, help=f"Adam weight decay {_default('weight_decay')}")
    train.add_argument("--attention-weight-decay", type=finite_float, default=None,
                       help="Adam weight decay of the attention blocks; the paper's 1e-5 collapses an RSA block "
                       f"that starts as the identity (docs/ms_lesion_training.md) {_default('attention_weight_decay')}")
    train.add_argument("--loss-weights", choices=WEIGHTINGS, default=None,
                       help="cross-entropy class weights: 'swapped' (lesion e^(1-r)/..., measured better, see "
                       "docs/ms_lesion_training.md), 'literal' (the paper's formula as printed) or 'none' "
                       f"{_default('loss_weights')}")
    train.add_argument("--loss", choices=LOSSES, default=None,
                       help="ce: the paper's class-weighted cross-entropy; dice-ce: nnU-Net's soft Dice of the lesion "
                       f"class plus that cross-entropy {_default('loss')}")
    train.add_argument("--lesion-crop-fraction", type=finite_float, default=None, help="probability that a crop is centred "
                       f"on a lesion voxel {_preset_default('lesion_crop_fraction')}")
    train.add_argument("--crop-centre", choices=CENTRES, default=None,
                       help=f"other crops are centred on a random brain voxel or anywhere {_default('crop_centre')}")
    train.add_argument("--augment", choices=AUGMENTATIONS, default=None,
                       help="augmentation of each crop (batchgeneratorsv2): none (the paper's plain random crops), "
                       "light (mirroring, intensity), default (nnU-Net's default transforms), heavy (more often, "
                       f"stronger, elastic) {_preset_default('augment')}")
    train.add_argument("--ema", type=finite_float, default=None, metavar="DECAY",
                       help="keep an exponential moving average of the weights with this decay (e.g. 0.98) and "
                       f"save and evaluate it instead of the last weights; 0 = the last weights {_default('ema')}")
    train.add_argument("--no-prior-start", dest="prior_start", action="store_const", const=False, default=None,
                       help="start the output layer at p(lesion) = 0.5 instead of at the weighted lesion prior "
                       "(the prior start is a departure from the paper that saves hundreds of iterations)")
    train.add_argument("--seed", type=int, default=None, help=f"seed of the weights, the crops and the split "
                       f"{_default('seed')}")


def add_run_options(run: argparse._ArgumentGroup) -> None:
    """Where the run goes and how it runs: folder, resume, checkpoints, validation, device, threads."""
    run.add_argument("--out", default=None, help="run folder (default: runs/<method>)")
    run.add_argument("--resume", action="store_const", const=True, default=None,
                     help="continue from <out>/checkpoint.pt (same options)")
    run.add_argument("--overwrite", action="store_const", const=True, default=None,
                     help="replace the run in --out (removes only the files a run writes)")
    run.add_argument("--checkpoint-every", type=int, default=None,
                     help=f"iterations between checkpoints {_default('checkpoint_every')}")
    run.add_argument("--val-every", type=int, default=None, help="iterations between evaluations of the held-out "
                     f"subjects, 0 = only at the end {_preset_default('val_every')}")
    add_inference_options(run)
    add_runtime_options(run)
    add_amp_option(run, "auto: on CUDA bf16 where supported, else fp16; on the CPU bf16 where the CPU executes it "
                   "natively (AVX-512 BF16 or AMX), else float32; none: float32; fp16 is refused on the CPU; the run "
                   f"records the choice {_default('amp')}")
    run.add_argument("--stop-at", type=int, default=None,
                     help="stop after this iteration as if killed (checkpoint written): for testing --resume")
    run.add_argument("--no-progress", dest="progress", action="store_const", const=False, default=None,
                     help="no progress bar")


def choose_preset(preset: str | None, data_given: bool, device_type: str) -> tuple[str, str]:
    """The preset of a run and why: ``--preset``, else demo without ``--data``, else by the device."""
    if preset is not None:
        return preset, "--preset"
    if not data_given:
        return "demo", "no --data: the synthetic demo"
    if device_type == "cuda":
        return "paper", "--data on CUDA: the paper's protocol"
    return "cpu", "--data on the CPU: the CPU preset (--preset paper for the paper's protocol, about 9 h here)"


def make_config(args: argparse.Namespace, options: DataOptions | None = None) -> tuple[TrainingConfig, str]:
    """The run's one configuration from the parsed flags, the preset and the environment, and why that preset.

    Every field comes from ``config.FLAGS``: the derived ones below, the others as given (None: not given,
    then the preset's value or the field's default).

    Args:
        args: ``add_training_arguments``' flags, parsed.
        options: the data options, where the caller read them already (``experiment.py``); default: from ``args``.

    Raises:
        UsageError: a value that cannot work, named by its flag.
    """
    device = select_device(args.device, int(os.environ.get("LOCAL_RANK", "0")))
    preset, why = choose_preset(args.preset, args.data is not None, device.type)
    if args.data is None:
        from .synthetic.cohort import default_cache_dir  # only the demo needs the generator

        data, demo = default_cache_dir() / "demo-cohort", True
    elif not Path(args.data).is_dir():
        raise UsageError(f"--data {args.data} does not exist or is not a folder")
    else:
        data, demo = Path(args.data), False
    derived = {
        "data": str(data.resolve()), "demo_cohort": demo, "data_options": options or data_options(args),
        "preset": preset, "device": str(device), "filters": parse_filters(args.filters or PRESETS[preset]["filters"]),
        "attention_scale": parse_attention_scale(args.attention_scale),
        "out": args.out or str(Path("runs") / (args.method or DEFAULTS["method"])),
        "malloc_tuning": not args.no_malloc_tuning,
    }
    given = {key: getattr(args, key) for key in FLAGS if key.split(".")[0] not in derived}
    values = {**PRESETS[preset], **{k: v for k, v in given.items() if v is not None}, **derived}
    return TrainingConfig(**{**values, "crop": tuple(values["crop"])}), why
