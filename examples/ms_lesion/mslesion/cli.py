"""Command-line plumbing the scripts share: the data and inference options, devices, and error lines.

Every script that reads data takes the same data options (``add_data_options``); ``train.py`` records
the resolved values with the model, and ``evaluate.py``/``predict.py``/``experiment.py`` start from the
recorded values (``data_options``). A user mistake is one ``error: ...`` line on stderr and exit
status 2 (``command``), checked before any long work starts.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from .data.reading import LABEL2_MODES, LAYOUTS, MODALITIES, NNUNET_IMAGES, NORMALISATIONS, DataError, DataOptions, describe, parse_patterns, resolve_layout
from .inference.sliding_window import DEFAULT_OVERLAP, DEFAULT_THRESHOLD
from .inference.lesions import DEFAULT_MIN_LESION_MM3
from .run import UsageError
from .training.runtime import AMP_CHOICES

class Parser(argparse.ArgumentParser):
    """argparse with whole option names only (no silent abbreviations) and a one-line ``error:`` message."""

    def __init__(self, description: str | None = None) -> None:
        super().__init__(description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                         allow_abbrev=False)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


# The data options' attribute names, for scripts that forward or compare them.
DATA_OPTIONS: tuple[str, ...] = ("layout", "modalities", "pattern", "label2", "resample", "normalisation")


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


def _overlap(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def add_inference_options(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """The options every script that runs the model shares: ``--overlap`` and ``--device``."""
    parser.add_argument("--overlap", type=_overlap, default=DEFAULT_OVERLAP,
                        help=f"sliding-window tile overlap, in [0, 1) (default: {DEFAULT_OVERLAP:g})")
    parser.add_argument(
        "--device", default="auto", help="'auto' (CUDA if present), 'cpu', 'cuda', 'cuda:1'... (default: auto)"
    )


def _mm3(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 mm^3, got {text}")
    return value


def _probability(text: str) -> float:
    value = float(text)
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
