"""The paper's experiment (Table 1): every method on the same 5 random splits, mean ± std.

    python examples/ms_lesion/experiment.py --data DIR --out runs/experiment [-- extra train.py flags]
    python examples/ms_lesion/experiment.py --cohort-preset small --out runs/experiment -- --filters tiny ...

Each split is saved as ``<out>/splits/split-<k>.json`` (the paper: 20 train / 23 test of 43 subjects;
the fraction follows the cohort size) and each (method, split) trains with train.py in its own
process (seed k) into ``<out>/runs/<method>/split-<k>/``. A run with a ``metrics.json`` is done and skipped,
an unfinished one resumes from its checkpoint: re-running the same command continues the
experiment. The table goes to ``<out>/table.md``, all numbers to ``<out>/results.json`` and a
Fig. 5-like comparison of split 0 to ``<out>/figure.png``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from data import find_cases, load_case
from evaluate import write_json
from figures import save_comparison
from model import METHODS, save_atomically
from train import random_split

HERE = Path(__file__).resolve().parent
COLUMNS = (("sample_dice", "Sample-avg Dice"), ("voxel_dice", "Voxel-avg Dice"), ("sample_iou", "Sample-avg IoU"),
           ("voxel_iou", "Voxel-avg IoU"), ("voxel_lesion_f1", "Lesion F1"))
PAPER_TRAIN_FRACTION = 20 / 43


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=None, help="dataset folder; default: a synthetic cohort in the cache "
                        "(--cohort-preset, --subjects)")
    parser.add_argument("--cohort-preset", default="small", help="synthetic preset without --data (default: small)")
    parser.add_argument("--subjects", type=int, default=43, help="synthetic cohort size without --data (default: 43)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                        help="methods to compare (default: all)")
    parser.add_argument("--splits", type=int, default=5, help="random splits (default: 5)")
    parser.add_argument("--train-fraction", type=float, default=PAPER_TRAIN_FRACTION,
                        help="training fraction of the subjects (default: 20/43, the paper)")
    parser.add_argument("--out", default="runs/experiment", help="experiment folder (default: runs/experiment)")
    parser.add_argument("train_args", nargs="*", help="after '--': flags passed to every train.py run")
    return parser


def make_splits(data: str, count: int, train_fraction: float, out: Path) -> list[Path]:
    """Write (or keep) ``count`` split files; split k is a seeded permutation with seed k."""
    ids = [c.id for c in find_cases(data)]
    paths = []
    for k in range(count):
        path = out / "splits" / f"split-{k}.json"
        if not path.is_file():
            write_json(path, random_split(ids, 1.0 - train_fraction, seed=k))
        paths.append(path)
    return paths


def run_one(method: str, split: Path, seed: int, data: str, run_dir: Path, train_args: Sequence[str]) -> dict[str, Any]:
    """Train and evaluate one (method, split) in a child process, unless already done."""
    metrics = run_dir / "metrics.json"
    if not metrics.is_file():
        # Split k trains with seed k (weights and crops): the spread over splits then includes the
        # spread over initialisations, which on small budgets is the larger one.
        command = [sys.executable, str(HERE / "train.py"), "--data", data, "--split", str(split), "--method", method,
                   "--out", str(run_dir), "--resume", "--no-progress", "--val-every", "0", "--seed", str(seed),
                   *train_args]
        print(f"[{time.strftime('%H:%M:%S')}] {method} {split.stem}: training", flush=True)
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return json.loads(metrics.read_text())


def mean_std(values: Sequence[float], percent: bool = True) -> str:
    scale = 100.0 if percent else 1.0
    values = np.asarray(values, dtype=float) * scale
    return f"{values.mean():.2f} ± {values.std(ddof=1) if values.size > 1 else 0.0:.2f}"


def table(results: dict[str, list[dict[str, Any]]]) -> str:
    """The Markdown table: Table 1's columns (in %) plus lesion F1, training time and peak memory."""
    header = ["Method", *(title for _, title in COLUMNS), "Train time (s)", "Peak memory (MB)", "Splits"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, runs in results.items():
        cells = [mean_std([r["summary"][key] for r in runs]) for key, _ in COLUMNS]
        cells += [mean_std([r["train_seconds"] for r in runs], percent=False),
                  f"{np.mean([r['peak_memory_mb'] for r in runs]):.0f}", str(len(runs))]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    kinds = {r["peak_memory_kind"] for runs in results.values() for r in runs}
    lines.append("")
    lines.append(f"Scores in % (mean ± std over splits); peak memory: {', '.join(sorted(kinds))}.")
    return "\n".join(lines) + "\n"


def comparison_figure(data: str, split: Path, methods: Sequence[str], out: Path) -> Path | None:
    """Fig. 5-like PNG of the split's test subject with the most lesion voxels."""
    test = json.loads(split.read_text())["test"]
    paths = {c.id: c for c in find_cases(data) if c.id in test}
    cases = [load_case(paths[i]) for i in sorted(paths)]
    shown = max(cases, key=lambda c: int(np.count_nonzero(c.label == 1)))
    predictions = {}
    for method in methods:
        file = out / "runs" / method / split.stem / "predictions" / f"{shown.id}.npz"
        if file.is_file():
            predictions[method] = np.load(file)["mask"]
    if not predictions:
        return None
    flair = shown.modalities.index("flair") if "flair" in shown.modalities else 0
    return save_comparison(out / "figure.png", shown.image[flair], shown.label, predictions, title=shown.id)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    data = args.data
    if data is None:
        from synthetic import default_cache_dir, make_cohort

        data = str(default_cache_dir() / f"{args.cohort_preset}-cohort-{args.subjects}")
        make_cohort(data, subjects=args.subjects, preset=args.cohort_preset, seed=0, montage=False)
    splits = make_splits(data, args.splits, args.train_fraction, out)
    results: dict[str, list[dict[str, Any]]] = {}
    for method in args.methods:
        for seed, split in enumerate(splits):
            run = run_one(method, split, seed, data, out / "runs" / method / split.stem, args.train_args)
            results.setdefault(method, []).append(run)
            # Rewrite the summary after every run, so a long experiment can be read while it goes.
            write_json(out / "results.json", {"data": data, "train_args": args.train_args, "results": results})
            text = table(results)
            save_atomically(out / "table.md", lambda tmp, t=text: tmp.write_text(t))
    print(table(results))
    figure = comparison_figure(data, splits[0], args.methods, out)
    print(f"table: {out / 'table.md'}\nresults: {out / 'results.json'}" + (f"\nfigure: {figure}" if figure else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
