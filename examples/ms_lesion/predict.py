"""Segment new subjects with a trained model: one uint8 lesion mask NIfTI per subject.

    python examples/ms_lesion/predict.py --checkpoint runs/rsa-010/model.pt --data DIR --out DIR

``DIR`` holds subjects in the layouts data.py reads (no lesion masks needed). Each mask
(``<out>/<id>.nii.gz``: 1 lesion, 0 background) is in the subject's original orientation, shape
and affine, and is written atomically. A subject that fails (unreadable file, wrong shape...) is
reported on stderr and skipped; the exit status is 1 if any failed.
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

from data import CasePaths, DataError, find_cases, load_case
from inference import add_inference_options, predict_mask, select_device
from model import load_trained, save_atomically


def predict_case(
    model: nn.Module, paths: CasePaths, out: Path, meta: dict, *, overlap: float, device: torch.device
) -> Path:
    """Load, segment and write one subject; returns the mask file."""
    case = load_case(paths, modalities=meta["modalities"])
    mask = predict_mask(model, case.image, meta["crop"], overlap=overlap, device=device)
    image = case.to_original(mask.astype(np.uint8))
    image.set_data_dtype(np.uint8)
    return save_atomically(out / f"{case.id}.nii.gz", lambda tmp: nib.save(image, tmp))


def discover(root: Path, layout: str, modalities: Sequence[str]) -> tuple[list[CasePaths], list[str]]:
    """The usable subjects of ``root``, and the ids of those with missing or ambiguous files
    (reported on stderr), so one bad subject does not stop the others."""
    errors: dict[str, DataError] = {}
    subjects = find_cases(root, layout=layout, modalities=modalities, require_mask=False, errors=errors)
    for case_id, error in errors.items():
        print(f"error: subject {case_id}: {error}", file=sys.stderr)
    return subjects, list(errors)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="model.pt (or checkpoint.pt) written by train.py")
    parser.add_argument("--data", required=True, help="folder of subjects to segment")
    parser.add_argument("--out", required=True, help="output folder, one <id>.nii.gz per subject")
    parser.add_argument("--layout", choices=("auto", "nnunet", "subject-folders"), default="auto",
                        help="dataset layout (default: auto)")
    add_inference_options(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = select_device(args.device)
    try:
        model, meta = load_trained(args.checkpoint, device)
        subjects, unreadable = discover(Path(args.data), args.layout, meta["modalities"])
    except (OSError, ValueError) as error:  # DataError is a ValueError
        print(f"error: {error}", file=sys.stderr)
        return 2
    out = Path(args.out)
    failed = list(unreadable)
    for paths in subjects:
        try:
            written = predict_case(model, paths, out, meta, overlap=args.overlap, device=device)
        except (DataError, OSError, ValueError, RuntimeError) as error:
            failed.append(paths.id)
            print(f"error: subject {paths.id}: {error}", file=sys.stderr)
            continue
        print(f"{paths.id}: {written}")
    total = len(subjects) + len(unreadable)
    print(f"{total - len(failed)} of {total} subjects segmented into {out}"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
