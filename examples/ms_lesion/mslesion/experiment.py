"""The paper's experiment (Table 1): every method on the same random splits, with paired statistics against unet.

    python examples/ms_lesion/experiment.py --data DIR --out runs/experiment [-- extra train.py flags]
    python examples/ms_lesion/experiment.py --cohort-preset small --out runs/experiment -- --filters tiny ...

Splits: ``<out>/splits/split-<k>.json`` is a random split with seed k (the paper: 20 train / 23 test of
43 subjects; --train-fraction follows the cohort size); ``<out>/splits/parameters.json`` records the
train fraction and the subject ids, and a command with other values is refused (naming them) instead
of reusing splits made for another question. A larger --splits adds splits to the same experiment.

Runs: each (method, split) trains with train.py in its own process (seed k) into
``<out>/runs/<method>/split-<k>/``. Every run is started with --resume: a finished run with the same
options is reused, an unfinished one continues from its checkpoint, and a run made with other options
is refused (train.py lists the differences), so re-running the same command continues the experiment
and a changed command never mixes results. The data options (--modalities, --pattern...) go before
'--': the splits and the figures use them too.

Statistics (stats.py), for sample Dice, voxel Dice and lesion F1: every method is paired with unet on
each split both ran, d = method - unet. The table shows the mean of d in points with its 95 % t
interval (mean ± t(0.975, n-1) sd/sqrt(n); the percentile bootstrap, also in results.json, is too
narrow at 5-15 splits) and the two-sided Wilcoxon signed-rank p (exact; zero differences dropped).
With fewer than 6 non-zero differences no p can fall below 0.05 (the smallest is 2/2^n), so the
table says "n/a" with that bound instead of a p. An interval that excludes 0 is a difference the
splits resolve; one that straddles 0 means this experiment cannot tell, not that the methods are equal.

Run health: a run whose attention blocks train.py recorded as dead, or that predicted no lesion voxel
in any test subject (it never left the all-background start), is listed under the table with its
split. Such runs stay in the statistics (dropping them would keep only the splits where the method
worked); a second table repeats the comparison without the splits where either run is flagged, to show
how much they weigh.

Cost: parameters and forward FLOPs of the network at the training crop (batch 1; matmuls and
convolutions as torch's FlopCounterMode counts them, the attention blocks' custom autograd functions
included), and the training time.

Outputs: ``<out>/table.md`` (the table, the paired statistics, the cost and the run health),
``<out>/results.json`` (every number), ``<out>/paired_differences.png`` (one panel per metric, one row
per method, a point per split, the mean and its interval) and ``<out>/figure.png`` (a Fig. 5-like
comparison of split 0).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .cli import DATA_OPTIONS, Parser, add_data_options, command, data_options, list_cases
from .data.reading import read_json
from .evaluation.report import differences_figure, network_cost, recorded_run, run_problems, write_report
from .evaluation.figures import save_comparison
from .model.unet import METHODS
from .run import UsageError, check_split, check_writable, random_split, read_split, write_json
from .evaluation.stats import BASELINE

#: the folder that holds the mslesion package: the child processes import it from there
PACKAGE_PARENT = Path(__file__).resolve().parents[1]
PAPER_TRAIN_FRACTION = 20 / 43
SPLIT_PARAMETERS = "parameters.json"


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}")
    return value


def _cohort_preset(text: str) -> str:
    from .synthetic.cohort import COHORT_PRESETS  # only the generated cohort needs the generator

    if text not in COHORT_PRESETS:
        raise argparse.ArgumentTypeError(f"invalid choice: {text!r} (choose from {', '.join(sorted(COHORT_PRESETS))})")
    return text


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 < value < 1.0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1) (some subjects train, some test), got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(__doc__)
    parser.add_argument("--data", default=None, help="dataset folder; default: a synthetic cohort in the cache "
                        "(--cohort-preset, --subjects)")
    parser.add_argument("--cohort-preset", type=_cohort_preset, default=None,
                        help="synthetic preset without --data, as make_cohort.py's --preset (default: small)")
    parser.add_argument("--subjects", type=_positive_int, default=None,
                        help="synthetic cohort size without --data, >= 1 (default: 43)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                        help=f"methods to compare, each once; the paired statistics need {BASELINE} (default: all)")
    parser.add_argument("--splits", type=_positive_int, default=5,
                        help="random splits, >= 1; at least 6 for a Wilcoxon p that can fall below 0.05 (default: 5)")
    parser.add_argument("--train-fraction", type=_fraction, default=PAPER_TRAIN_FRACTION,
                        help="training fraction of the subjects, in (0, 1), leaving at least one test subject "
                        "(default: 20/43, the paper)")
    parser.add_argument("--out", default="runs/experiment", help="experiment folder (default: runs/experiment)")
    parser.add_argument("train_args", nargs="*", help="after '--': flags passed to every train.py run")
    add_data_options(parser)
    return parser


def check_arguments(args: argparse.Namespace) -> None:
    """Refuse train.py flags that experiment.py sets itself, a method listed twice, and cohort options with
    ``--data`` (they would be ignored)."""
    for flag, value in (("--subjects", args.subjects), ("--cohort-preset", args.cohort_preset)):
        if args.data is not None and value is not None:
            raise UsageError(f"{flag} {value} applies to the generated synthetic cohort, not to --data {args.data}, "
                             "whose subjects are all used; leave it out, or give a --data folder with only the "
                             "subjects to use")
    forwarded = {"--" + name.replace("_", "-") for name in DATA_OPTIONS} | {"--data", "--split", "--method", "--out",
                                                                             "--seed", "--list"}
    misplaced = sorted({flag.split("=")[0] for flag in args.train_args} & forwarded)
    if misplaced:
        raise UsageError(f"{', '.join(misplaced)} after '--': experiment.py sets these itself; give data options "
                         "before '--' (they also choose the splits' subjects)")
    twice = sorted({m for m in args.methods if args.methods.count(m) > 1})
    if twice:
        raise UsageError(f"--methods lists {', '.join(twice)} more than once; each method runs once per split")


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


# ------------------------------------------------------------------------------------------------ splits


def check_test_subjects(ids: Sequence[str], train_fraction: float) -> None:
    """Refuse a train fraction that leaves no test subject of ``ids`` (before any training)."""
    if len(ids) < 2:
        raise UsageError(f"the data has {len(ids)} subject(s); an experiment needs at least 2 (one to train, one "
                         "to test)")
    if not random_split(ids, 1.0 - train_fraction, seed=0)["test"]:
        raise UsageError(f"--train-fraction {train_fraction:g} leaves no test subject of the {len(ids)}; use at "
                         f"most {(len(ids) - 1) / len(ids):.3g} ({len(ids) - 1} training subjects)")


def _some(ids: Sequence[str]) -> str:
    return ", ".join(ids[:3]) + (f" and {len(ids) - 3} more" if len(ids) > 3 else "")


def check_split_parameters(recorded: Mapping[str, Any], requested: Mapping[str, Any], source: Path) -> None:
    """Refuse a command whose train fraction or subjects differ from the ones its splits were made with."""
    found = []
    if recorded.get("train_fraction") != requested["train_fraction"]:
        found.append(f"--train-fraction: recorded {recorded.get('train_fraction')!r}, now {requested['train_fraction']!r}")
    before, now = set(recorded.get("subjects", [])), set(requested["subjects"])
    if before - now:
        found.append(f"subjects no longer in the data: {_some(sorted(before - now))}")
    if now - before:
        found.append(f"subjects new in the data: {_some(sorted(now - before))}")
    if found:
        raise UsageError(f"the splits in {source.parent} were made for other parameters ({source.name}): "
                         f"{'; '.join(found)}; rerun with the recorded ones or choose another --out")


def make_splits(ids: list[str], count: int, train_fraction: float, out: Path) -> list[Path]:
    """Write (or keep and check) ``count`` split files; split k is a permutation with seed k.

    ``<out>/splits/parameters.json`` records the train fraction and the subjects the splits were made for;
    a later call with others is refused. A folder of older split files without that record is accepted
    only when the files are what these parameters make.
    """
    folder = out / "splits"
    parameters = {"train_fraction": train_fraction, "subjects": sorted(ids), "seeds": "split-<k>.json: seed k"}
    record = folder / SPLIT_PARAMETERS
    if record.is_file():
        check_split_parameters(read_json(record, "split record"), parameters, record)
    else:
        for path in sorted(folder.glob("split-*.json")):
            seed = path.stem.removeprefix("split-")
            if not seed.isdigit() or read_split(path) != random_split(ids, 1.0 - train_fraction, seed=int(seed)):
                raise UsageError(f"{path} was not made by this command (no {SPLIT_PARAMETERS} beside it, and "
                                 "--train-fraction and the subjects give another split); choose another --out")
        write_json(record, parameters)
    paths = []
    for k in range(count):
        path = folder / f"split-{k}.json"
        if path.is_file():
            check_split(read_split(path), ids, str(path))
        else:
            write_json(path, random_split(ids, 1.0 - train_fraction, seed=k))
        paths.append(path)
    return paths


# -------------------------------------------------------------------------------------------------- runs


def run_one(method: str, split: Path, seed: int, data: str, run_dir: Path, train_args: Sequence[str]) -> dict[str, Any]:
    """Train and evaluate one (method, split) in a child process; train.py reuses a finished run with the
    same options and refuses one made with others.

    Returns:
        The run's ``metrics.json`` with ``split`` (the split's name) and ``problems`` (``run_problems``).
    """
    # Split k trains with seed k (weights and crops): the spread over splits then includes the
    # spread over initialisations, which on small budgets is the larger one.
    command = [sys.executable, "-m", "mslesion.train", "--data", data, "--split", str(split), "--method", method,
               "--out", str(run_dir), "--resume", "--no-progress", "--val-every", "0", "--seed", str(seed),
               *train_args]
    print(f"[{time.strftime('%H:%M:%S')}] {method} {split.stem}", flush=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(PACKAGE_PARENT), os.environ.get("PYTHONPATH")]))}
    child = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    if child.returncode:
        lines = [line for line in child.stderr.splitlines() if line.strip()]
        reason = next((line[len("error: "):] for line in reversed(lines) if line.startswith("error: ")), None)
        if reason is None:  # a crash, not a usage error: show the traceback's end
            sys.stderr.write(child.stderr[-3000:])
            raise UsageError(f"train.py failed for {method} {split.stem} (exit {child.returncode}); see above")
        raise UsageError(f"{method} {split.stem} ({run_dir}): {reason}")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {**metrics, "split": split.stem, "problems": run_problems(run_dir, metrics)}


# ------------------------------------------------------------------------------------------------ figure


def comparison_figure(data: str, split: Path, methods: Sequence[str], out: Path) -> Path | None:
    """Fig. 5-like PNG of the split's test subject with the most lesion voxels, read with the data options
    the first method's model recorded."""
    test = set(read_split(split)["test"])
    _, _, options = recorded_run(out / "runs" / methods[0] / split.stem / "model.pt")
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
    check_arguments(args)
    out = Path(args.out)
    if not args.list:
        check_writable(out)  # before the cohort is generated and any run trains
    data = args.data
    if data is None:
        from .synthetic.cohort import default_cache_dir, make_cohort

        preset, subjects = args.cohort_preset or "small", args.subjects or 43
        data = str(default_cache_dir() / f"{preset}-cohort-{subjects}")
        make_cohort(data, subjects=subjects, preset=preset, seed=0, montage=False)
    options = data_options(args)
    if args.list:
        return list_cases(data, options, require_mask=True)
    ids = [p.id for p in options.find(data)]
    check_test_subjects(ids, args.train_fraction)
    splits = make_splits(ids, args.splits, args.train_fraction, out)
    train_args = [*data_flags(args), *args.train_args]
    summary = {"data": data, "train_args": train_args, "train_fraction": args.train_fraction}
    results: dict[str, list[dict[str, Any]]] = {}
    costs: dict[str, dict[str, Any]] = {}
    for method in args.methods:
        for seed, split in enumerate(splits):
            run_dir = out / "runs" / method / split.stem
            results.setdefault(method, []).append(run_one(method, split, seed, data, run_dir, train_args))
            if method not in costs:
                costs[method] = network_cost(run_dir / "model.pt")
            # Rewrite the report after every run, so a long experiment can be read while it goes.
            text = write_report(out, summary, results, costs)
    print(text)
    written = [("table", out / "table.md"), ("results", out / "results.json"),
               ("paired differences", differences_figure(results, out)),
               ("figure", comparison_figure(data, splits[0], args.methods, out))]
    print("\n".join(f"{name}: {path}" for name, path in written if path is not None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
