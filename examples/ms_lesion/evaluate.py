"""Evaluate a trained model on labelled subjects: sliding-window inference, then the metrics.

    python examples/ms_lesion/evaluate.py --checkpoint runs/rsa-010/model.pt --data DIR [--split FILE] --out DIR

Writes ``<out>/metrics.json`` (cohort summary, see ``metrics.summarise``) and ``<out>/cases.csv``
(one row per subject).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from data import Case, load_dataset
from inference import add_inference_options, predict_mask, select_device
from metrics import case_counts, scores, summarise
from model import load_trained, save_atomically


def evaluate_cases(
    model: nn.Module,
    cases: Sequence[Case],
    tile: Sequence[int],
    *,
    overlap: float = 0.5,
    device: torch.device | str = "cpu",
    amp_dtype: torch.dtype | None = None,
) -> tuple[dict[str, float], list[dict[str, Any]], dict[str, np.ndarray]]:
    """Segment each labelled case whole and score it.

    Args:
        model: the network (put in eval mode here, left in it).
        cases: labelled cases.
        tile: sliding-window tile ``(d, h, w)``, usually the training crop.
        overlap: tile overlap in [0, 1).
        device: where the model runs.
        amp_dtype: CUDA autocast dtype or None.

    Returns:
        The cohort summary, one row of scores per case (with ``id``), and the ``(D, H, W)`` uint8
        predictions by case id.
    """
    model.eval()
    counts, rows, predictions = [], [], {}
    for case in cases:
        if case.label is None:
            raise ValueError(f"case {case.id!r} has no lesion mask; evaluation needs labelled cases")
        mask = predict_mask(model, case.image, tile, overlap=overlap, device=device, amp_dtype=amp_dtype)
        count = case_counts(mask, case.label, case.spacing)
        counts.append(count)
        rows.append({"id": case.id, **scores(count), "predicted_voxels": count.tp + count.fp,
                     "reference_voxels": count.tp + count.fn})
        predictions[case.id] = mask
    return summarise(counts), rows, predictions


def write_csv(path: str | Path, rows: Sequence[dict[str, Any]]) -> Path:
    """Write dict rows (same keys) as CSV, atomically."""
    def write(tmp: Path) -> None:
        with tmp.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else [])
            writer.writeheader()
            writer.writerows(rows)
    return save_atomically(path, write)


def write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as indented JSON, atomically."""
    return save_atomically(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=1, default=float)))


def read_split(path: str | Path) -> dict[str, list[str]]:
    """A split file: ``{"train": [ids], "test": [ids]}``."""
    split = json.loads(Path(path).read_text())
    if not isinstance(split, dict) or not {"train", "test"} <= split.keys():
        raise ValueError(f"split file {path} must hold a JSON object with 'train' and 'test' id lists")
    return {"train": list(split["train"]), "test": list(split["test"])}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="model.pt or checkpoint.pt written by train.py")
    parser.add_argument("--data", required=True, help="dataset folder (subject folders or nnU-Net layout)")
    parser.add_argument("--split", default=None, help="split JSON; evaluate its 'test' ids (default: all subjects)")
    parser.add_argument("--out", required=True, help="output folder for metrics.json and cases.csv")
    add_inference_options(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = select_device(args.device)
    model, meta = load_trained(args.checkpoint, device)
    cases = load_dataset(args.data, modalities=meta["modalities"])
    if args.split:
        wanted = set(read_split(args.split)["test"])
        cases = [c for c in cases if c.id in wanted]
        if not cases:
            raise SystemExit(f"error: none of the test ids of {args.split} is in {args.data}")
    summary, rows, _ = evaluate_cases(model, cases, meta["crop"], overlap=args.overlap, device=device)
    out = Path(args.out)
    write_json(out / "metrics.json", summary)
    write_csv(out / "cases.csv", rows)
    print(json.dumps({k: round(v, 4) for k, v in summary.items()}, indent=1))
    print(f"metrics: {out / 'metrics.json'}\nper case: {out / 'cases.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
