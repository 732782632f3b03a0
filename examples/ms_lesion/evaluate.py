"""Evaluate a trained model on labelled subjects: sliding-window inference, then the metrics.

    python examples/ms_lesion/evaluate.py --checkpoint runs/rsa-010/model.pt --data DIR [--split FILE] --out DIR

The data options (modalities, file patterns, label policy, normalisation) default to the ones the
model was trained with. Writes ``<out>/metrics.json`` (cohort summary, see ``metrics.summarise``) and
``<out>/cases.csv`` (one row per subject); existing files there are kept unless ``--overwrite``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from cli import (
    Parser, add_data_options, add_inference_options, add_postprocessing_options, add_runtime_options, command,
    configure_runtime, data_options, list_cases, select_device,
)
from data import DataOptions
from inference import evaluate_cases
from model import load_trained
from run import UsageError, check_split, read_split, refuse_existing, write_csv, write_json

OUTPUTS = ("metrics.json", "cases.csv")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(__doc__)
    parser.add_argument("--checkpoint", required=True, help="model.pt or checkpoint.pt written by train.py")
    parser.add_argument("--data", required=True, help="dataset folder (subject folders or nnU-Net layout)")
    parser.add_argument("--split", default=None, help="split JSON; evaluate its 'test' ids (default: all subjects)")
    parser.add_argument("--out", required=True, help="output folder for metrics.json and cases.csv")
    parser.add_argument("--overwrite", action="store_true", help="replace metrics.json and cases.csv in --out")
    add_data_options(parser)
    add_inference_options(parser)
    add_postprocessing_options(parser)
    add_runtime_options(parser)
    return parser


@command
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = select_device(args.device)
    configure_runtime(args)
    out = Path(args.out)
    refuse_existing(out, OUTPUTS, args.overwrite)
    model, meta = load_trained(args.checkpoint, device)
    options = data_options(args, DataOptions.from_record(meta["data"]))
    if args.list:
        return list_cases(args.data, options, require_mask=True)
    found = options.find(args.data)
    if args.split:
        split = read_split(args.split)
        check_split(split, [p.id for p in found], args.split)
        found = [p for p in found if p.id in set(split["test"])]
    if not found:
        raise UsageError(f"no subject to evaluate in {args.data}")
    cases = [options.load(p) for p in found]
    summary, rows, _ = evaluate_cases(model, cases, meta["crop"], overlap=args.overlap, device=device, mirror=args.tta,
                                      min_lesion_mm3=args.min_lesion_size)
    write_json(out / "metrics.json", summary)
    write_csv(out / "cases.csv", rows)
    print(json.dumps({k: round(v, 4) for k, v in summary.items()}, indent=1))
    print(f"metrics: {out / 'metrics.json'}\nper case: {out / 'cases.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
