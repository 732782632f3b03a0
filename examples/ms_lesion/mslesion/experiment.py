"""The paper's experiment (Table 1): every method on the same random splits, with paired statistics against unet.

    python examples/ms_lesion/experiment.py --data DIR --out runs/experiment [-- extra train.py flags]
    python examples/ms_lesion/experiment.py --cohort-preset small --out runs/experiment -- --filters tiny ...

Splits: ``<out>/splits/split-<k>.json`` is a random split with seed k (the paper: 20 train / 23 test of
43 subjects; --train-fraction follows the cohort size); ``<out>/splits/parameters.json`` records the
train fraction and the subject ids, and a command with other values is refused (naming them) instead
of reusing splits made for another question. A larger --splits adds splits to the same experiment.

Cross-validation (``--folds K`` or ``--folds loo``): instead of random splits, the subjects are cut into
K disjoint test groups that cover them (``<out>/splits/fold-<k>.json``; leave-one-out with ``loo``), each
fold trained on all the other subjects; ``--train-always ID ...`` keeps subjects (e.g. a synthetic cohort
beside a few real scans) in every training set and out of every test set. ``--seeds N`` trains every split
or fold N times (seeds 0..N-1; runs ``<split>-seed-<s>``), and the statistics pair the runs by (fold, seed).

Runs: the flags after '--' are train.py's; each (method, split) gets the configuration train.py would
make of them (``cli.make_config``, seed k), all made and checked before the first training, and trains
in its own process (``train.py --run-config -`` reads that configuration on stdin) into
``<out>/runs/<method>/split-<k>/``. Every run is started with --resume: a finished run with the same
options is reused, an unfinished one continues from its checkpoint, and a run made with other options
is refused (train.py lists the differences), so re-running the same command continues the experiment
and a changed command never mixes results. The data options (--modalities, --pattern...) go before
'--': the splits and the figures use them too.

Statistics (evaluation.stats), for sample Dice, voxel Dice and lesion F1: every method is paired with unet on
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

from .checkpoint import read
from .cli import Parser, add_data_options, add_training_arguments, command, data_options, list_cases, make_config
from .config import FLAGS, TrainingConfig
from .data.reading import DataOptions, read_json
from .evaluation.report import differences_figure, network_cost, run_problems, write_report
from .evaluation.figures import save_comparison
from .model.unet import METHODS
from .run import UsageError, check_split, check_writable, fold_splits, random_split, read_split, write_json
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


def _folds(text: str) -> int | str:
    if text == "loo":
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 2:
        raise argparse.ArgumentTypeError(f"must be 'loo' or a whole number >= 2, got {text!r}")
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
    parser.add_argument("--splits", type=_positive_int, default=None,
                        help="random splits, >= 1; at least 6 for a Wilcoxon p that can fall below 0.05 (default: 5)")
    parser.add_argument("--train-fraction", type=_fraction, default=None,
                        help="training fraction of the subjects, in (0, 1), leaving at least one test subject "
                        "(default: 20/43, the paper)")
    parser.add_argument("--folds", type=_folds, default=None,
                        help="cross-validation instead of random splits: K >= 2 disjoint test folds covering the "
                        "subjects, or 'loo' (leave one out)")
    parser.add_argument("--train-always", nargs="+", default=[], metavar="ID",
                        help="with --folds: subjects in every training set and never tested (e.g. synthetic ones)")
    parser.add_argument("--seeds", type=_positive_int, default=1,
                        help="trainings per split or fold, seeds 0..N-1 (default: 1: split k trains with seed k)")
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
    forwarded = {flag for key, flag in FLAGS.items() if key.split(".")[0] in ("data", "data_options", "split_file",
                                                                          "method", "out", "seed")} | {"--list"}
    misplaced = sorted({flag.split("=")[0] for flag in args.train_args} & forwarded)
    if misplaced:
        raise UsageError(f"{', '.join(misplaced)} after '--': experiment.py sets these itself; give data options "
                         "before '--' (they also choose the splits' subjects)")
    twice = sorted({m for m in args.methods if args.methods.count(m) > 1})
    if twice:
        raise UsageError(f"--methods lists {', '.join(twice)} more than once; each method runs once per split")
    if args.folds is not None:
        given = [flag for flag, value in (("--splits", args.splits), ("--train-fraction", args.train_fraction))
                 if value is not None]
        if given:
            raise UsageError(f"{' and '.join(given)} with --folds: cross-validation makes its own splits (one per "
                             "fold, tested on that fold); give one or the other")
    elif args.train_always:
        raise UsageError("--train-always needs --folds (random splits choose every subject's part)")


def training_parser() -> argparse.ArgumentParser:
    """train.py's options, for the flags after '--'."""
    parser = Parser()
    parser.prog = "train.py"  # its --help documents them
    add_training_arguments(parser)
    return parser


def run_config(flags: argparse.Namespace, options: DataOptions, data: str, method: str, split: Path, seed: int,
               run_dir: Path) -> TrainingConfig:
    """The configuration of one (method, split), made as train.py makes it (``cli.make_config``): the flags
    after '--' with this run's data, split, method, seed and folder, resumed, without a progress bar, and
    evaluated only at the end unless '--' gives ``--val-every``."""
    given = {**vars(flags), "data": data, "split_file": str(split), "method": method, "out": str(run_dir),
             "seed": seed, "resume": True, "progress": False, "val_every": flags.val_every or 0}
    return make_config(argparse.Namespace(**given), options)[0]


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


#: the split parameters a command can change, by the flag that sets them
SPLIT_FLAGS = {"train_fraction": "--train-fraction", "folds": "--folds", "train_always": "--train-always"}


def check_split_parameters(recorded: Mapping[str, Any], requested: Mapping[str, Any], source: Path) -> None:
    """Refuse a command whose split parameters (``SPLIT_FLAGS``) or subjects differ from the ones its splits
    were made with."""
    found = [f"{flag}: recorded {recorded.get(key)!r}, now {requested.get(key)!r}" for key, flag in SPLIT_FLAGS.items()
             if recorded.get(key) != requested.get(key)]
    before, now = set(recorded.get("subjects", [])), set(requested["subjects"])
    if before - now:
        found.append(f"subjects no longer in the data: {_some(sorted(before - now))}")
    if now - before:
        found.append(f"subjects new in the data: {_some(sorted(now - before))}")
    if found:
        raise UsageError(f"the splits in {source.parent} were made for other parameters ({source.name}): "
                         f"{'; '.join(found)}; rerun with the recorded ones or choose another --out")


def split_path(out: Path, k: int) -> Path:
    """The file of split ``k`` (seed ``k``)."""
    return out / "splits" / f"split-{k}.json"


def make_splits(ids: list[str], count: int, train_fraction: float, out: Path, *, write: bool = True) -> list[Path]:
    """Write (or keep and check) ``count`` split files; split k is a permutation with seed k.

    ``<out>/splits/parameters.json`` records the train fraction and the subjects the splits were made for;
    a later call with others is refused. A folder of older split files without that record is accepted
    only when the files are what these parameters make. With ``write=False`` only the checks run.
    """
    folder = split_path(out, 0).parent
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
        if write:
            write_json(record, parameters)
    paths = []
    for k in range(count):
        path = split_path(out, k)
        if path.is_file():
            check_split(read_split(path), ids, str(path))
        elif write:
            write_json(path, random_split(ids, 1.0 - train_fraction, seed=k))
        paths.append(path)
    return paths


# -------------------------------------------------------------------------------------------------- runs


def run_one(config: TrainingConfig, name: str) -> dict[str, Any]:
    """Train and evaluate one (method, split, seed) in a child process, from ``config``; train.py reuses a
    finished run with the same options and refuses one made with others.

    Returns:
        The run's ``metrics.json`` with ``split`` (the run's name: the statistics pair runs by it) and
        ``problems`` (``run_problems``).
    """
    label = f"{config.method} {name}"
    print(f"[{time.strftime('%H:%M:%S')}] {label}", flush=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(PACKAGE_PARENT), os.environ.get("PYTHONPATH")]))}
    child = subprocess.run([sys.executable, "-m", "mslesion.train", "--run-config", "-"], input=json.dumps(config.record()),
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    run_dir = Path(config.out)
    if child.returncode:
        lines = [line for line in child.stderr.splitlines() if line.strip()]
        reason = next((line[len("error: "):] for line in reversed(lines) if line.startswith("error: ")), None)
        if reason is None:  # a crash, not a usage error: show the traceback's end
            sys.stderr.write(child.stderr[-3000:])
            raise UsageError(f"train.py failed for {label} (exit {child.returncode}); see above")
        raise UsageError(f"{label} ({run_dir}): {reason}")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {**metrics, "split": name, "problems": run_problems(run_dir, metrics)}


def make_folds(ids: list[str], folds: int | str, always_train: Sequence[str], out: Path, *, write: bool = True
               ) -> list[Path]:
    """Write (or keep and check) the cross-validation splits ``<out>/splits/fold-<k>.json`` (``run.fold_splits``),
    with the record of the parameters beside them, as ``make_splits`` does for random splits (``write=False``:
    only the checks)."""
    unknown = sorted(set(always_train) - set(ids))
    if unknown:
        raise UsageError(f"--train-always: {_some(unknown)} not in the data (it has {_some(sorted(ids))})")
    count = len(ids) - len(set(always_train)) if folds == "loo" else int(folds)
    splits = fold_splits(ids, count, always_train=always_train)
    folder = out / "splits"
    parameters = {"folds": folds, "train_always": sorted(always_train), "subjects": sorted(ids),
                  "seeds": "fold-<k>.json: fold k of a permutation with seed 0"}
    record = folder / SPLIT_PARAMETERS
    if record.is_file():
        check_split_parameters(read_json(record, "split record"), parameters, record)
    elif any(folder.glob("*.json")):
        raise UsageError(f"{folder} holds splits without {SPLIT_PARAMETERS}; choose another --out")
    paths = [folder / f"fold-{k}.json" for k in range(count)]
    for path, split in zip(paths, splits):
        if path.is_file() and read_split(path) != split:
            raise UsageError(f"{path} is not fold {path.stem} of these subjects; choose another --out")
        if write:
            write_json(path, split)
    if write:
        write_json(record, parameters)
    return paths


def plan_runs(splits: Sequence[Path], seeds: int) -> list[tuple[str, Path, int]]:
    """Every run of one method as (run name, split file, seed): split k trains with seed k when ``seeds`` is
    1 (the runs are named after their splits), else every split trains with seeds 0..seeds-1."""
    if seeds == 1:
        return [(split.stem, split, k) for k, split in enumerate(splits)]
    return [(f"{split.stem}-seed-{s}", split, s) for split in splits for s in range(seeds)]


# ------------------------------------------------------------------------------------------------ figure


def comparison_figure(data: str, run: tuple[str, Path, int], methods: Sequence[str], out: Path) -> Path | None:
    """Fig. 5-like PNG of a run's (``plan_runs``) test subject with the most lesion voxels, read with the data
    options the first method's model recorded."""
    name, split, _ = run
    test = set(read_split(split)["test"])
    options = read(out / "runs" / methods[0] / name / "model.pt").record.training.data_options
    cases = [options.load(p) for p in options.find(data) if p.id in test]
    shown = max(cases, key=lambda c: int(np.count_nonzero(c.label == 1)))
    predictions = {}
    for method in methods:
        file = out / "runs" / method / name / "predictions" / f"{shown.id}.npz"
        if file.is_file():
            predictions[method] = np.load(file)["mask"]
    if not predictions:
        return None
    flair = shown.modalities.index("flair") if "flair" in shown.modalities else 0
    return save_comparison(out / "figure.png", shown.image[flair], shown.label, predictions, title=shown.id)


def choose_splits(args: argparse.Namespace, ids: list[str], out: Path, *, write: bool) -> list[Path]:
    """The split files of this experiment, checked (and written with ``write``): cross-validation folds with
    ``--folds``, else random splits."""
    if args.folds is not None:
        return make_folds(ids, args.folds, args.train_always, out, write=write)
    args.train_fraction = PAPER_TRAIN_FRACTION if args.train_fraction is None else args.train_fraction
    check_test_subjects(ids, args.train_fraction)
    return make_splits(ids, 5 if args.splits is None else args.splits, args.train_fraction, out, write=write)


@command
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_arguments(args)
    flags = training_parser().parse_args(args.train_args)
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
    # Every run's configuration first: a bad flag after '--' is refused before anything is written (the split
    # files are named, then written). Split k trains with seed k (weights and crops): the spread over splits
    # then includes the spread over initialisations, which on small budgets is the larger one.
    splits = choose_splits(args, ids, out, write=False)
    plan = plan_runs(splits, args.seeds)
    configs = {(method, name): run_config(flags, options, data, method, split, seed, out / "runs" / method / name)
               for method in args.methods for name, split, seed in plan}
    choose_splits(args, ids, out, write=True)
    summary = {"data": data, "data_options": options.record(), "train_args": args.train_args,
               "train_fraction": args.train_fraction, "folds": args.folds, "train_always": args.train_always,
               "seeds": args.seeds}
    results: dict[str, list[dict[str, Any]]] = {}
    costs: dict[str, dict[str, Any]] = {}
    for (method, name), config in configs.items():
        results.setdefault(method, []).append(run_one(config, name))
        if method not in costs:
            costs[method] = network_cost(Path(config.out) / "model.pt")
        # Rewrite the report after every run, so a long experiment can be read while it goes.
        text = write_report(out, summary, results, costs)
    print(text)
    written = [("table", out / "table.md"), ("results", out / "results.json"),
               ("paired differences", differences_figure(results, out)),
               ("figure", comparison_figure(data, plan_runs(splits, args.seeds)[0], args.methods, out))]
    print("\n".join(f"{name}: {path}" for name, path in written if path is not None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
