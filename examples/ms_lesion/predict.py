"""Segment new subjects with a trained model: one uint8 lesion mask NIfTI per subject.

    python examples/ms_lesion/predict.py --checkpoint runs/rsa-010/model.pt --data DIR --out DIR

``DIR`` holds subjects in the layouts data.py reads (no lesion masks needed); the data options
default to the ones the model was trained with. Each mask (``<out>/<id>.nii.gz``: 1 lesion,
0 background) is in the subject's original orientation, shape and affine, and is written atomically.
An existing mask is never replaced unless ``--overwrite``, and ``--out`` may not be a folder that holds
input files. A subject that fails (unreadable file, wrong shape...) is reported on stderr and
skipped; the exit status is 1 if any failed.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from torch import nn

from cli import (
    Parser, add_data_options, add_inference_options, command, data_options, list_cases, select_device,
)
from data import CasePaths, DataError, DataOptions
from inference import predict_mask
from model import load_trained
from run import UsageError, save_atomically


def predict_case(
    model: nn.Module, paths: CasePaths, out: Path, meta: dict, options: DataOptions, *, overlap: float,
    device: torch.device,
) -> Path:
    """Load, segment and write one subject; returns the mask file."""
    case = options.load(paths)
    mask = predict_mask(model, case.image, meta["crop"], overlap=overlap, device=device)
    image = case.to_original(mask.astype(np.uint8))
    image.set_data_dtype(np.uint8)
    return save_atomically(out / f"{case.id}.nii.gz", lambda tmp: nib.save(image, tmp))


def check_out(out: Path, data: Path, subjects: Sequence[CasePaths], ids: Sequence[str], overwrite: bool) -> None:
    """Refuse an ``--out`` that holds input files, and existing masks unless ``overwrite``."""
    inputs = {p.parent.resolve() for s in subjects for p in (*s.images.values(), s.mask, s.brain_mask) if p}
    inputs |= {(data / name).resolve() for name in ("imagesTr", "labelsTr", "imagesTs", "labelsTs")}
    if out.resolve() in inputs:
        raise UsageError(f"--out {out} is a folder of the input data; write the masks to another folder")
    existing = [out / f"{i}.nii.gz" for i in ids if (out / f"{i}.nii.gz").exists()]
    if existing and not overwrite:
        shown = ", ".join(p.name for p in existing[:3]) + (f" and {len(existing) - 3} more" if len(existing) > 3 else "")
        raise UsageError(f"--out {out} already holds {shown}; pass --overwrite to replace them, or choose another --out")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(__doc__)
    parser.add_argument("--checkpoint", required=True, help="model.pt (or checkpoint.pt) written by train.py")
    parser.add_argument("--data", required=True, help="folder of subjects to segment")
    parser.add_argument("--out", required=True, help="output folder, one <id>.nii.gz per subject")
    parser.add_argument("--overwrite", action="store_true", help="replace masks that already exist in --out")
    add_data_options(parser)
    add_inference_options(parser)
    return parser


@command
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = select_device(args.device)
    model, meta = load_trained(args.checkpoint, device)
    options = data_options(args, DataOptions.from_record(meta["data"]))
    if args.list:
        return list_cases(args.data, options, require_mask=False)
    errors: dict[str, DataError] = {}
    subjects = options.find(args.data, require_mask=False, errors=errors)
    out = Path(args.out)
    check_out(out, Path(args.data), subjects, [s.id for s in subjects], args.overwrite)
    for case_id, error in errors.items():  # missing or ambiguous files: reported, the others go on
        print(f"error: subject {case_id}: {error}", file=sys.stderr)
    failed = list(errors)
    for paths in subjects:
        try:
            written = predict_case(model, paths, out, meta, options, overlap=args.overlap, device=device)
        except (DataError, OSError, ValueError, RuntimeError) as error:
            failed.append(paths.id)
            print(f"error: subject {paths.id}: {error}", file=sys.stderr)
            continue
        print(f"{paths.id}: {written}")
    total = len(subjects) + len(errors)
    print(f"{total - len(failed)} of {total} subjects segmented into {out}"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
