"""The paper's experiment (Table 1): every method on the same 5 random splits, mean ± std.

    python examples/ms_lesion/experiment.py --data DIR --out runs/experiment [-- extra train.py flags]
    python examples/ms_lesion/experiment.py --cohort-preset small --out runs/experiment -- --filters tiny ...

Each split is saved as ``<out>/splits/split-<k>.json`` (the paper: 20 train / 23 test of 43 subjects;
the fraction follows the cohort size) and each (method, split) trains with train.py in its own
process (seed k) into ``<out>/runs/<method>/split-<k>/``. Every run is started with ``--resume``: a
finished run with the same options is reused, an unfinished one continues from its checkpoint, and a
run made with other options is refused (train.py lists the differences), so re-running the same
command continues the experiment and a changed command never mixes results. The data options
(``--modalities``, ``--pattern``...) go before ``--``: the splits and the figure use them too. The table goes to ``<out>/table.md``, all numbers to ``<out>/results.json`` and a
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

from cli import DATA_OPTIONS, Parser, add_data_options, command, data_options, list_cases
from data import DataOptions
from figures import save_comparison
from model import METHODS, read_checkpoint
from run import UsageError, check_split, random_split, read_split, save_atomically, write_json

HERE = Path(__file__).resolve().parent
COLUMNS = (("sample_dice", "Sample-avg Dice"), ("voxel_dice", "Voxel-avg Dice"), ("sample_iou", "Sample-avg IoU"),
           ("voxel_iou", "Voxel-avg IoU"), ("voxel_lesion_f1", "Lesion F1"))
PAPER_TRAIN_FRACTION = 20 / 43


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(__doc__)
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
    add_data_options(parser)
    return parser


def data_flags(args: argparse.Namespace) -> list[str]:
    """The explicit data options, as train.py flags."""
    flags: list[str] = []
    for name in ("layout", "label2", "normalisation"):
        if getattr(args, name) is not None:
            flags += [f"--{name}", getattr(args, name)]
    if args.modalities is not None:
        flags += ["--modalities", *args.modalities]
    for pattern in args.pattern or []:
        flags += ["--pattern", pattern]
    return flags + (["--resample"] if args.resample else [])


def make_splits(ids: list[str], count: int, train_fraction: float, out: Path) -> list[Path]:
    """Write (or keep and check against ``ids``) ``count`` split files; split k is a permutation with seed k."""
    paths = []
    for k in range(count):
        path = out / "splits" / f"split-{k}.json"
        if path.is_file():
            check_split(read_split(path), ids, str(path))
        else:
            write_json(path, random_split(ids, 1.0 - train_fraction, seed=k))
        paths.append(path)
    return paths


def run_one(method: str, split: Path, seed: int, data: str, run_dir: Path, train_args: Sequence[str]) -> dict[str, Any]:
    """Train and evaluate one (method, split) in a child process; train.py reuses a finished run with the
    same options and refuses one made with others."""
    # Split k trains with seed k (weights and crops): the spread over splits then includes the
    # spread over initialisations, which on small budgets is the larger one.
    command = [sys.executable, str(HERE / "train.py"), "--data", data, "--split", str(split), "--method", method,
               "--out", str(run_dir), "--resume", "--no-progress", "--val-every", "0", "--seed", str(seed),
               *train_args]
    print(f"[{time.strftime('%H:%M:%S')}] {method} {split.stem}", flush=True)
    child = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if child.returncode:
        lines = [line for line in child.stderr.splitlines() if line.strip()]
        reason = next((line[len("error: "):] for line in reversed(lines) if line.startswith("error: ")), None)
        if reason is None:  # a crash, not a usage error: show the traceback's end
            sys.stderr.write(child.stderr[-3000:])
            raise UsageError(f"train.py failed for {method} {split.stem} (exit {child.returncode}); see above")
        raise UsageError(f"{method} {split.stem} ({run_dir}): {reason}")
    return json.loads((run_dir / "metrics.json").read_text())


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
    """Fig. 5-like PNG of the split's test subject with the most lesion voxels, read with the data options
    the first method's model recorded."""
    test = set(read_split(split)["test"])
    model = out / "runs" / methods[0] / split.stem / "model.pt"
    options = DataOptions.from_record(read_checkpoint(model)["data"])
    cases = [options.load(p) for p in options.find(data) if p.id in test]
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


@command
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    forwarded = {"--" + name.replace("_", "-") for name in DATA_OPTIONS} | {"--data", "--split", "--method", "--out",
                                                                             "--seed", "--list"}
    misplaced = sorted({flag.split("=")[0] for flag in args.train_args} & forwarded)
    if misplaced:
        raise UsageError(f"{', '.join(misplaced)} after '--': experiment.py sets these itself; give data options "
                         "before '--' (they also choose the splits' subjects)")
    out = Path(args.out)
    data = args.data
    if data is None:
        from synthetic import default_cache_dir, make_cohort

        data = str(default_cache_dir() / f"{args.cohort_preset}-cohort-{args.subjects}")
        make_cohort(data, subjects=args.subjects, preset=args.cohort_preset, seed=0, montage=False)
    options = data_options(args)
    if args.list:
        return list_cases(data, options, require_mask=True)
    splits = make_splits([p.id for p in options.find(data)], args.splits, args.train_fraction, out)
    train_args = [*data_flags(args), *args.train_args]
    results: dict[str, list[dict[str, Any]]] = {}
    for method in args.methods:
        for seed, split in enumerate(splits):
            run = run_one(method, split, seed, data, out / "runs" / method / split.stem, train_args)
            results.setdefault(method, []).append(run)
            # Rewrite the summary after every run, so a long experiment can be read while it goes.
            write_json(out / "results.json", {"data": data, "train_args": train_args, "results": results})
            text = table(results)
            save_atomically(out / "table.md", lambda tmp, t=text: tmp.write_text(t))
    print(table(results))
    figure = comparison_figure(data, splits[0], args.methods, out)
    print(f"table: {out / 'table.md'}\nresults: {out / 'results.json'}" + (f"\nfigure: {figure}" if figure else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
