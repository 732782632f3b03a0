"""Segment new subjects with a trained model: one uint8 lesion mask NIfTI per subject.

    python examples/ms_lesion/predict.py --checkpoint runs/rsa-010/model.pt --data DIR --out DIR

``DIR`` holds subjects in the layouts data.py reads (no lesion masks needed); the data options
default to the ones the model was trained with. For each subject, in its original orientation, shape
and affine, written atomically:

    <out>/<id>.nii.gz            uint8 lesion mask (1 lesion, 0 background)
    <out>/<id>_lesions.csv       one row per lesion: label, volume_ml, centroid_{x,y,z}_mm (world), max_probability
    <out>/<id>_prob.nii.gz       float32 lesion probability        (--probabilities)
    <out>/<id>_lesions.nii.gz    uint16 lesion labels = the CSV's label column   (--label-lesions)
    <out>/report.csv             one row per subject: id, lesions, volume_ml, largest_ml, mean_probability

An existing output is never replaced unless ``--overwrite``, which replaces the whole earlier prediction
of these subjects (every file above, whatever options made it); ``--out`` may not be a folder that holds
input files. Lesion masks in ``DIR`` are ignored. A subject that fails (unreadable file, wrong shape...)
is reported on stderr and skipped; the exit status is 1 if any failed. A subject whose voxel size differs
from the training subjects' by more than ``checkpoint.SPACING_TOLERANCE`` on an axis is segmented with a
``warning:`` line.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path

from typing import Any

import nibabel as nib
import numpy as np
import torch
from torch import nn

from .cli import (
    Parser, add_amp_option, add_data_options, add_inference_options, add_nnunet_images_option, add_postprocessing_options,
    add_runtime_options, command, data_options, list_cases, say_nnunet_folders,
)
from .checkpoint import RunRecord, load_trained, spacing_warning
from .config import TrainingConfig
from .data.reading import CasePaths, DataError, DataOptions, resolve_layout
from .inference.sliding_window import segment
from .inference.lesions import LESION_FIELDS, REPORT_FIELDS, label_lesions, lesion_table, remove_small_lesions, subject_summary
from .run import UsageError, locked, refuse_existing, save_atomically, write_csv
from .training.runtime import amp_dtype, configure_runtime, inference_amp, select_device


REPORT = "report.csv"


def outputs(case_id: str, args: argparse.Namespace | None = None) -> list[str]:
    """The file names ``predict.py`` writes for one subject with these options (None: with every option)."""
    probabilities, label_lesions = (True, True) if args is None else (args.probabilities, args.label_lesions)
    names = [f"{case_id}.nii.gz", f"{case_id}_lesions.csv"]
    return names + [f"{case_id}_prob.nii.gz"] * probabilities + [f"{case_id}_lesions.nii.gz"] * label_lesions


def earlier_prediction(out: Path, case_ids: Sequence[str]) -> list[str]:
    """The files in ``out`` that a prediction of ``case_ids`` (with any options) and its report may have written."""
    names = [name for case_id in case_ids for name in outputs(case_id)] + [REPORT]
    return [name for name in names if (out / name).is_file()]


def predict_case(model: nn.Module, paths: CasePaths, out: Path, tile: Sequence[int], options: DataOptions,
                 args: argparse.Namespace, device: torch.device, record: RunRecord | None = None,
                 autocast: torch.dtype | None = None) -> dict[str, Any]:
    """Load, segment (under ``autocast``, None for float32), post-process and write one subject; returns its
    ``report.csv`` row. With the model's ``record``, a voxel size unlike the training subjects' is a ``warning:``
    line first."""
    case = options.load(dataclasses.replace(paths, mask=None))  # a lesion mask, even a broken one, plays no part
    note = spacing_warning(record, case.id, case.spacing) if record is not None else None
    if note:
        print(f"warning: {note}", file=sys.stderr)
    probability, mask = segment(model, case.image, tile, threshold=args.threshold, overlap=args.overlap, device=device,
                                amp_dtype=autocast, mirror=args.tta)
    mask = remove_small_lesions(mask, np.diag([*case.spacing, 1.0]), args.min_lesion_size)
    labels, count = label_lesions(mask)
    # On the source grid: voxel indices map to millimetres through its affine.
    mask_image, label_image = case.to_original(mask), case.to_original(labels)
    probability_image = case.to_original(probability.astype(np.float32))
    source_probability = np.asanyarray(probability_image.dataobj)
    rows = lesion_table(np.asanyarray(label_image.dataobj), count, source_probability, label_image.affine)
    written = {f"{case.id}.nii.gz": mask_image, f"{case.id}_prob.nii.gz": probability_image,
               f"{case.id}_lesions.nii.gz": label_image}
    for name in outputs(case.id, args):
        if name.endswith(".csv"):
            write_csv(out / name, rows, fields=LESION_FIELDS)
        else:
            save_atomically(out / name, lambda tmp, image=written[name]: nib.save(image, tmp))
    return subject_summary(case.id, rows, np.asanyarray(mask_image.dataobj), source_probability)


def check_out(out: Path, data: Path, subjects: Sequence[CasePaths], nnunet: bool) -> None:
    """Refuse an ``--out`` among the input data.

    In the subject-folder layout any folder inside ``--data`` is (or would become) a subject folder, so
    the masks written there would be read as inputs later, whether or not its files were recognised
    now; in the nnU-Net layout the image and label folders are refused.
    """
    inputs = {p.parent.resolve() for s in subjects for p in (*s.images.values(), s.mask, s.brain_mask) if p}
    inputs |= {(data / name).resolve() for name in ("imagesTr", "labelsTr", "imagesTs", "labelsTs")}
    target = out.resolve()
    if target in inputs or (not nnunet and target.is_relative_to(data.resolve())):
        raise UsageError(f"--out {out} is inside the input data {data}; write the masks to a folder outside it")


def onnx_model(model: nn.Module, tile: Sequence[int], device: torch.device) -> Any:
    """The network exported to onnxruntime (``--engine onnx``).

    Raises:
        UsageError: a device other than the CPU, or the onnx extra missing.
    """
    if device.type != "cpu":
        raise UsageError(f"--engine onnx runs on the CPU, not {device}; use --device cpu or --engine torch")
    try:
        from .inference.onnx_engine import onnx_network
    except ImportError as exc:
        raise UsageError(f"--engine onnx needs the onnx extra (pip install 'sliceattn[onnx]'): {exc}") from None
    return onnx_network(model, tile)


def choose_amp(args: argparse.Namespace, trained: TrainingConfig, device: torch.device) -> str:
    """The autocast of this prediction: ``inference_amp``'s with ``--engine torch``; float32 with onnxruntime.

    Raises:
        UsageError: ``--amp bf16`` or ``fp16`` with ``--engine onnx``.
    """
    if args.engine != "onnx":
        return inference_amp(args.amp, trained.amp, trained.device, device)
    if args.amp in ("bf16", "fp16"):
        raise UsageError(f"--engine onnx runs the network in float32; --amp {args.amp} needs --engine torch")
    print("autocast: none (onnxruntime runs the network in float32)")
    return "none"


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(__doc__)
    parser.add_argument("--checkpoint", required=True, help="model.pt (or checkpoint.pt) written by train.py; with "
                        "--ema both hold the moving average of the weights, and that is what predicts")
    parser.add_argument("--data", required=True, help="folder of subjects to segment")
    parser.add_argument("--out", required=True, help="output folder, one <id>.nii.gz per subject")
    parser.add_argument("--overwrite", action="store_true", help="replace outputs that already exist in --out")
    outputs = parser.add_argument_group("outputs")
    add_postprocessing_options(outputs)
    outputs.add_argument("--probabilities", action="store_true", help="also write <id>_prob.nii.gz (float32)")
    outputs.add_argument("--engine", choices=("torch", "onnx"), default="torch",
                         help="run the network in torch, or export it once and run it in onnxruntime (CPU only, "
                         "needs the onnx extra; faster on a CPU, see docs/benchmarks_example.md) (default: torch)")
    outputs.add_argument("--label-lesions", action="store_true",
                         help="also write <id>_lesions.nii.gz, a uint16 map of the lesions numbered as in the CSV")
    add_data_options(parser)
    add_nnunet_images_option(parser)
    add_inference_options(parser)
    add_runtime_options(parser)
    add_amp_option(parser, "auto, bf16, fp16 or none as in train.py (default: the one the run used for its own "
                   "evaluation; float32 where this device cannot run that one fast, and with --engine onnx)")
    return parser


@command
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = select_device(args.device)
    configure_runtime(args.threads, not args.no_malloc_tuning)
    model, saved = load_trained(args.checkpoint, device)
    trained = saved.record.training
    options = data_options(args, trained.data_options)
    if args.list:
        return list_cases(args.data, options, require_mask=False)
    say_nnunet_folders(args.data, options, args.nnunet_images)
    errors: dict[str, DataError] = {}
    subjects = options.find(args.data, require_mask=False, errors=errors, nnunet_images=args.nnunet_images)
    check_out(Path(args.out), Path(args.data), subjects, resolve_layout(args.data, options.layout) == "nnunet")
    amp = choose_amp(args, trained, device)
    with locked(args.out) as out:  # also the check that --out can be written, before any subject
        earlier = earlier_prediction(out, [*(s.id for s in subjects), *errors])
        refuse_existing(out, earlier, args.overwrite)
        if args.engine == "onnx":
            model = onnx_model(model, trained.crop, device)
        for name in earlier:  # --overwrite: the whole earlier prediction goes, not only the files written now
            (out / name).unlink()
        failed = predict_all(model, subjects, errors, out, trained.crop, options, args, device, saved.record,
                             amp_dtype(amp, device))
    total = len(subjects) + len(errors)
    print(f"{total - len(failed)} of {total} subjects segmented into {out}"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


def predict_all(model: nn.Module, subjects: Sequence[CasePaths], errors: dict[str, DataError], out: Path,
                tile: Sequence[int], options: DataOptions, args: argparse.Namespace, device: torch.device,
                record: RunRecord, autocast: torch.dtype | None) -> list[str]:
    """Segment every subject into ``out`` (under ``autocast``) and write ``report.csv``; a subject that fails is
    reported and skipped (``record``: the model's, for the voxel-size warning).

    Returns:
        The ids that failed, ``errors``' first.
    """
    for case_id, error in errors.items():  # missing or ambiguous files: reported, the others go on
        print(f"error: subject {case_id}: {error}", file=sys.stderr)
    failed, report = list(errors), []
    for paths in subjects:
        try:
            report.append(predict_case(model, paths, out, tile, options, args, device, record, autocast))
        except (DataError, OSError, ValueError, RuntimeError) as error:
            failed.append(paths.id)
            print(f"error: subject {paths.id}: {error}", file=sys.stderr)
            continue
        row = report[-1]
        print(f"{paths.id}: {out / (paths.id + '.nii.gz')} ({row['lesions']} lesions, {row['volume_ml']:.2f} mL)")
    if report:
        write_csv(out / REPORT, report, fields=REPORT_FIELDS)
    return failed


if __name__ == "__main__":
    sys.exit(main())
