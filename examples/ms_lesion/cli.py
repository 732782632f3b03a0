"""Command-line plumbing the scripts share: the data and inference options, devices, and error lines.

Every script that reads data takes the same data options (``add_data_options``); ``train.py`` records
the resolved values with the model, and ``evaluate.py``/``predict.py``/``experiment.py`` start from the
recorded values (``data_options``). A user mistake is one ``error: ...`` line on stderr and exit
status 2 (``command``), checked before any long work starts.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import functools
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

import torch

from data import (
    LABEL2_MODES, LAYOUTS, MODALITIES, NORMALISATIONS, DataError, DataOptions, describe, parse_patterns,
    resolve_normalisation,
)
from lesions import DEFAULT_MIN_LESION_MM3
from run import UsageError

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
                       help="z-score each modality over 'foreground' (non-zero voxels; the same with or without "
                       "brain-mask files) or 'brain-mask' (inside each subject's brain-mask file, required); "
                       "auto = brain-mask when every training subject has one (default: auto)")
    group.add_argument("--list", action="store_true",
                       help="print which file took which role for each subject, shapes, spacings and lesion "
                       "fractions, then stop")


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
        if normalisation not in ("auto", recorded.normalisation):
            raise UsageError(f"--normalisation {normalisation} differs from the model's {recorded.normalisation}")
        normalisation = recorded.normalisation
    return DataOptions(
        layout=args.layout or base.layout, modalities=modalities, patterns=patterns,
        label2=args.label2 or base.label2, resample=base.resample if args.resample is None else True,
        normalisation=normalisation,
    )


def list_cases(root: str | Path, options: DataOptions, *, require_mask: bool) -> int:
    """Print ``describe`` for every subject of ``root`` and one ``error:`` line for each unusable one.

    Returns:
        The exit status: 0, or 1 when a subject cannot be used.
    """
    errors: dict[str, DataError] = {}
    found = options.find(root, require_mask=require_mask, errors=errors)
    options = dataclasses.replace(options, normalisation=resolve_normalisation(options.normalisation, found))
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
    parser.add_argument("--overlap", type=_overlap, default=0.5,
                        help="sliding-window tile overlap, in [0, 1) (default: 0.5)")
    parser.add_argument(
        "--device", default="auto", help="'auto' (CUDA if present), 'cpu', 'cuda', 'cuda:1'... (default: auto)"
    )


def select_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """``"auto"`` -> this process's CUDA device when CUDA is present, else the CPU; else ``torch.device(name)``.

    Raises:
        UsageError: an unknown device name, or CUDA asked for where there is none.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r} is not a device name; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: this torch ({torch.__version__}) sees no CUDA device; use --device cpu")
        if device.index is None:
            device = torch.device("cuda", local_rank)
        if device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: only {torch.cuda.device_count()} CUDA devices")
    return device


def _mm3(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 mm^3, got {text}")
    return value


def add_postprocessing_options(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """``--tta`` and ``--min-lesion-size``: what evaluation and prediction do to the network's output."""
    parser.add_argument("--tta", action="store_true",
                        help="average the probabilities over the 8 mirrorings of each tile (8x the time)")
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


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask where the platform has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def tune_allocator() -> bool:
    """Make glibc serve large blocks from the heap instead of a fresh ``mmap`` per tensor.

    With the defaults every large tensor is a new mapping that is page-faulted again at every step;
    this is what ``MALLOC_MMAP_MAX_=0`` does, applied from inside the process. A no-op (False) where
    the C library has no ``mallopt`` or the user set ``MALLOC_MMAP_MAX_`` already.
    """
    if "MALLOC_MMAP_MAX_" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    m_mmap_max = -4  # glibc's malloc.h
    return bool(mallopt(m_mmap_max, 0))


def configure_runtime(args: argparse.Namespace, processes: int = 1) -> int:
    """Apply ``--threads`` and the allocator setting; warn when other processes compete for the cores.

    Returns:
        The number of torch threads.
    """
    cores = usable_cores()
    chosen = args.threads if args.threads is not None else os.environ.get("OMP_NUM_THREADS", "").strip()
    try:
        threads = int(chosen) if chosen != "" else max(1, cores // processes)
    except ValueError:
        raise UsageError(f"OMP_NUM_THREADS={chosen!r} is not a number of threads") from None
    if threads < 1:
        raise UsageError(f"--threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)
    if not args.no_malloc_tuning:
        tune_allocator()
    if hasattr(os, "getloadavg"):
        load = os.getloadavg()[0]
        if load > cores - threads * processes + 0.75:
            print(f"warning: the load average is {load:.1f} on {cores} cores: other processes compete for the "
                  f"{threads * processes} threads of this run, which can slow it several times; wait, or use "
                  "fewer --threads", file=sys.stderr)
    return threads


def command(main: Callable[[Sequence[str] | None], int]) -> Callable[[Sequence[str] | None], int]:
    """Wrap a script's ``main``: a ``UsageError`` or ``DataError`` becomes one ``error:`` line and exit 2."""
    @functools.wraps(main)
    def wrapped(argv: Sequence[str] | None = None) -> int:
        try:
            return main(argv)
        except (UsageError, DataError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        except BrokenPipeError:  # the output went to a pager or `head` that closed early
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (Python's documented recipe)
            return 0
    return wrapped
