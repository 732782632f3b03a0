"""Evaluate a trained model on labelled subjects: sliding-window inference, then the metrics.

    python examples/ms_lesion/evaluate.py --checkpoint runs/rsa-010/model.pt --data DIR [--split FILE] --out DIR

The data options (modalities, file patterns, label policy, normalisation) default to the ones the
model was trained with. Writes ``<out>/metrics.json`` (cohort summary, see ``metrics.summarise``, and its
``warnings``) and ``<out>/cases.csv`` (one row per subject); existing files there are kept unless
``--overwrite``. A subject whose voxel size differs from the training subjects' by more than
``checkpoint.SPACING_TOLERANCE`` on an axis gets a ``warning:`` line (and an entry in ``warnings``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from .cli import (
    Parser, add_amp_option, add_data_options, add_inference_options, add_nnunet_images_option, add_postprocessing_options,
    add_runtime_options, command, data_options, list_cases, say_nnunet_folders,
)
from .checkpoint import load_trained, spacing_warning
from .data.reading import check_lesion_masks
from .inference.sliding_window import evaluate_cases
from .run import UsageError, check_split, locked, read_split, refuse_existing, write_csv, write_json
from .training.runtime import amp_dtype, configure_runtime, inference_amp, select_device

OUTPUTS = ("metrics.json", "cases.csv")
AMP_HELP = ("auto, bf16, fp16 or none as in train.py (default: the one the run used for its own evaluation, so that "
            "its metrics.json is reproduced; float32 where this device cannot run that one fast)")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(__doc__)
    parser.add_argument("--checkpoint", required=True, help="model.pt or checkpoint.pt written by train.py (with "
                        "--ema both hold the moving average, and that is what is evaluated)")
    parser.add_argument("--data", required=True, help="dataset folder (subject folders or nnU-Net layout)")
    parser.add_argument("--split", default=None, help="split JSON; evaluate its 'test' ids (default: all subjects)")
    parser.add_argument("--out", required=True, help="output folder for metrics.json and cases.csv")
    parser.add_argument("--overwrite", action="store_true", help="replace metrics.json and cases.csv in --out")
    parser.add_argument("--include-training-subjects", action="store_true",
                        help="score subjects the model was trained on too (refused by default: their scores "
                        "are optimistic and would be read as held-out results)")
    add_data_options(parser)
    add_nnunet_images_option(parser)
    add_inference_options(parser)
    add_postprocessing_options(parser)
    add_runtime_options(parser)
    add_amp_option(parser, AMP_HELP)
    return parser


def refuse_training_subjects(ids: list[str], trained_on: list[str], include: bool) -> list[str]:
    """Refuse to score the model's own training subjects unless ``--include-training-subjects``.

    Returns:
        The training subjects among ``ids`` (scored with ``include``), sorted.
    """
    seen = sorted(set(ids) & set(trained_on))
    if seen and not include:
        shown = ", ".join(seen[:5]) + (f" and {len(seen) - 5} more" if len(seen) > 5 else "")
        raise UsageError(f"{len(seen)} of the subjects to evaluate ({shown}) are subjects the model was trained on; "
                         "evaluate held-out subjects (--split with their ids in 'test'), or pass "
                         "--include-training-subjects to score them anyway")
    return seen


def warnings_for(summary: dict[str, float], rows: list[dict], trained_on: Sequence[str] = ()) -> list[str]:
    """What a reader of the scores must know: training subjects among the scored ones, or that every
    reference mask is empty."""
    notes = []
    if trained_on:
        notes.append(f"{len(trained_on)} of the {len(rows)} subjects scored were used to train the model "
                     f"(--include-training-subjects: {', '.join(trained_on)}): their scores are optimistic, these "
                     "are not held-out results")
    if rows and all(row["reference_voxels"] == 0 for row in rows):
        notes.append(f"every reference mask is empty ({len(rows)} subjects): Dice and IoU are 1 only where nothing is "
                     "predicted, and lesion-wise scores are undefined; these are not lesion-segmentation scores")
    return notes


@command
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = select_device(args.device)
    configure_runtime(args.threads, not args.no_malloc_tuning)
    model, saved = load_trained(args.checkpoint, device)
    trained = saved.record.training
    options = data_options(args, trained.data_options)
    if args.list:
        return list_cases(args.data, options, require_mask=True)
    amp = inference_amp(args.amp, trained.amp, trained.device, device)
    with locked(args.out) as out:  # also the check that --out can be written, before the evaluation
        refuse_existing(out, OUTPUTS, args.overwrite)
        say_nnunet_folders(args.data, options, args.nnunet_images)
        found = options.find(args.data, nnunet_images=args.nnunet_images)
        if args.split:
            split = read_split(args.split)
            check_split(split, [p.id for p in found], args.split, training=False)  # only its test ids are read
            found = [p for p in found if p.id in set(split["test"])]
        if not found:
            raise UsageError(f"no subject to evaluate in {args.data}")
        seen = refuse_training_subjects([p.id for p in found], saved.record.split["train"],
                                        args.include_training_subjects)
        cases = [options.load(p) for p in found]
        check_lesion_masks(cases, training=False)
        spacing = [note for case in cases if (note := spacing_warning(saved.record, case.id, case.spacing))]
        for note in spacing:  # before the long part
            print(f"warning: {note}", file=sys.stderr)
        summary, rows, _ = evaluate_cases(model, cases, trained.crop, overlap=args.overlap, device=device,
                                          amp_dtype=amp_dtype(amp, device), mirror=args.tta,
                                          min_lesion_mm3=args.min_lesion_size, threshold=args.threshold)
        notes = warnings_for(summary, rows, seen)
        write_json(out / "metrics.json", {**summary, "amp": amp, "warnings": spacing + notes})
        write_csv(out / "cases.csv", rows)
    print(json.dumps({k: round(v, 4) for k, v in summary.items()}, indent=1))
    for note in notes:
        print(f"warning: {note}", file=sys.stderr)
    print(f"metrics: {out / 'metrics.json'}\nper case: {out / 'cases.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
