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
import csv
import dataclasses
import json
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from cli import DATA_OPTIONS, Parser, add_data_options, command, data_options, list_cases
from config import recorded_config
from data import DataOptions, read_json
from figures import save_comparison, save_paired_differences
from model import METHODS, build_model, read_checkpoint
from run import UsageError, check_split, random_split, read_split, save_atomically, write_json
from stats import BASELINE, PairedComparison, compare_paired, format_interval, format_p

HERE = Path(__file__).resolve().parent
COLUMNS = (("sample_dice", "Sample-avg Dice"), ("voxel_dice", "Voxel-avg Dice"), ("sample_iou", "Sample-avg IoU"),
           ("voxel_iou", "Voxel-avg IoU"), ("voxel_lesion_f1", "Lesion F1"))
#: The metrics of the paired statistics.
PAIRED_METRICS = (("sample_dice", "Sample Dice"), ("voxel_dice", "Voxel Dice"), ("voxel_lesion_f1", "Lesion F1"))
PAPER_TRAIN_FRACTION = 20 / 43
SPLIT_PARAMETERS = "parameters.json"


def _split_count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}")
    return value


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
    parser.add_argument("--cohort-preset", default="small", help="synthetic preset without --data (default: small)")
    parser.add_argument("--subjects", type=int, default=43, help="synthetic cohort size without --data (default: 43)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                        help=f"methods to compare, each once; the paired statistics need {BASELINE} (default: all)")
    parser.add_argument("--splits", type=_split_count, default=5,
                        help="random splits, >= 1; at least 6 for a Wilcoxon p that can fall below 0.05 (default: 5)")
    parser.add_argument("--train-fraction", type=_fraction, default=PAPER_TRAIN_FRACTION,
                        help="training fraction of the subjects, in (0, 1), leaving at least one test subject "
                        "(default: 20/43, the paper)")
    parser.add_argument("--out", default="runs/experiment", help="experiment folder (default: runs/experiment)")
    parser.add_argument("train_args", nargs="*", help="after '--': flags passed to every train.py run")
    add_data_options(parser)
    return parser


def check_arguments(args: argparse.Namespace) -> None:
    """Refuse train.py flags that experiment.py sets itself, and a method listed twice."""
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
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {**metrics, "split": split.stem, "problems": run_problems(run_dir, metrics)}


def predicted_voxels(run_dir: Path) -> int | None:
    """Lesion voxels the run predicted over all its test subjects (``cases.csv``); None when not recorded."""
    try:
        with (run_dir / "cases.csv").open(newline="") as handle:
            return sum(int(float(row["predicted_voxels"])) for row in csv.DictReader(handle))
    except (OSError, KeyError, ValueError):
        return None


def run_problems(run_dir: Path, metrics: Mapping[str, Any]) -> list[str]:
    """What makes a run's scores not the method's: dead attention blocks (``attention_alive`` false in
    ``metrics.json``), or no lesion voxel predicted in any test subject (the run never left the
    all-background start). Absent records are not problems."""
    problems = []
    if metrics.get("attention_alive") is False:
        blocks = []
        for name, block in (metrics.get("attention") or {}).items():
            alpha = ", ".join(f"{a:.2g}" for a in block.get("alpha", []))
            weight = block.get("max_weight")
            blocks.append(f"{name} α [{alpha}]" + (f", max weight {weight:.2g}" if weight is not None else ""))
        problems.append("attention dead" + (f" ({'; '.join(blocks)})" if blocks else ""))
    if predicted_voxels(run_dir) == 0:
        problems.append(f"no lesion voxel predicted in its {len(metrics.get('test', []))} test subjects "
                        "(never left the all-background start)")
    return problems


# -------------------------------------------------------------------------------------------- recorded run


def recorded_run(model: Path) -> tuple[dict[str, Any], tuple[int, ...], DataOptions]:
    """The network config, training crop and data options a run's ``model.pt`` records.

    The one place that knows the checkpoint's layout: change it here when train.py's record changes.
    """
    checkpoint = read_checkpoint(model)
    trained = recorded_config(checkpoint, model)
    return checkpoint["config"], trained.crop, trained.data_options


def network_cost(model: Path) -> dict[str, Any]:
    """Parameters and forward FLOPs of a run's network on one training crop.

    The network is built on the ``meta`` device (no memory, no arithmetic) and run under
    ``FlopCounterMode``, which counts the matmuls and convolutions that reach the dispatcher, those
    inside the attention blocks' custom autograd functions included; element-wise work is not counted.
    """
    config, crop, _ = recorded_run(model)
    network = build_model(**config).to("meta").eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        network(torch.zeros(1, config["in_channels"], *crop, device="meta"))
    return {"parameters": sum(p.numel() for p in network.parameters()), "forward_flops": counter.get_total_flops(),
            "crop": list(crop)}


# -------------------------------------------------------------------------------------------- statistics


def split_scores(runs: Sequence[Mapping[str, Any]], key: str, skip: frozenset[str] = frozenset()) -> dict[str, float]:
    """Split name -> the run's ``summary[key]`` (runs without a summary or in ``skip`` left out)."""
    return {r["split"]: float(r["summary"][key]) for r in runs if "summary" in r and r["split"] not in skip}


def flagged_splits(results: Mapping[str, Sequence[Mapping[str, Any]]]) -> dict[str, frozenset[str]]:
    """Method -> the splits where its run or the baseline's has a problem."""
    baseline = {r["split"] for r in results.get(BASELINE, []) if r.get("problems")}
    return {method: frozenset(baseline | {r["split"] for r in runs if r.get("problems")})
            for method, runs in results.items() if method != BASELINE}


def paired_comparisons(results: Mapping[str, Sequence[Mapping[str, Any]]],
                       skip: Mapping[str, frozenset[str]] | None = None) -> dict[str, dict[str, PairedComparison]]:
    """Metric key -> method -> its comparison with the baseline over the splits both ran (minus ``skip``)."""
    comparisons: dict[str, dict[str, PairedComparison]] = {key: {} for key, _ in PAIRED_METRICS}
    if BASELINE not in results:
        return comparisons
    for method, runs in results.items():
        if method == BASELINE:
            continue
        left_out = (skip or {}).get(method, frozenset())
        for key, _ in PAIRED_METRICS:
            try:
                comparisons[key][method] = compare_paired(split_scores(runs, key, left_out),
                                                          split_scores(results[BASELINE], key, left_out))
            except ValueError:  # no split in common yet
                continue
    return comparisons


# ----------------------------------------------------------------------------------------------- reports


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


def paired_table(comparisons: Mapping[str, Mapping[str, PairedComparison]]) -> str:
    """Markdown rows: per method, the pairs, and per metric the mean difference [95 % t interval] and p."""
    header = ["Method", "Pairs"]
    for _, title in PAIRED_METRICS:
        header += [f"{title} Δ [95 % CI]", "Wilcoxon p"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    methods = list(dict.fromkeys(m for by_method in comparisons.values() for m in by_method))
    for method in methods:
        cells = []
        for key, _ in PAIRED_METRICS:
            comparison = comparisons[key].get(method)
            cells += ([format_interval(comparison), format_p(comparison.wilcoxon)] if comparison else ["", ""])
        pairs = max(c[method].n for c in comparisons.values() if method in c)
        lines.append(f"| {method} | {pairs} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def cost_table(results: Mapping[str, Sequence[Mapping[str, Any]]], costs: Mapping[str, Mapping[str, Any]]) -> str:
    """Markdown rows: parameters, forward GFLOP at the crop (and against the baseline) and training time."""
    lines = ["| Method | Parameters | Forward GFLOP | vs " + BASELINE + " | Train time (s) |", "|---|---|---|---|---|"]
    base = costs.get(BASELINE)
    for method, runs in results.items():
        cost = costs.get(method)
        if cost is None:
            continue
        ratio = f"{cost['forward_flops'] / base['forward_flops'] - 1:+.1%}" if base else ""
        seconds = mean_std([r["train_seconds"] for r in runs], percent=False)
        lines.append(f"| {method} | {cost['parameters']:,} | {cost['forward_flops'] / 1e9:.4g} | {ratio} | {seconds} |")
    crops = sorted({" × ".join(map(str, c["crop"])) for c in costs.values()})
    lines += ["", f"FLOPs of one forward pass on one {' or '.join(crops)} crop (batch 1; matmuls and convolutions, "
              "FlopCounterMode); train time mean ± std over splits."]
    return "\n".join(lines) + "\n"


def health_section(results: Mapping[str, Sequence[Mapping[str, Any]]]) -> str:
    """Which attention blocks were alive, and every flagged run with its split and why."""
    lines = []
    alive = []
    for method, runs in results.items():
        flags = [r.get("attention_alive") for r in runs]
        if method != BASELINE:
            unknown = flags.count(None)
            alive.append(f"{method} {flags.count(True)}/{len(runs)}" + (f" ({unknown} not recorded)" if unknown else ""))
    if alive:
        lines.append("Attention alive (as train.py recorded it): " + ", ".join(alive) + ".")
    flagged = [f"- {method} {r['split']}: {'; '.join(r['problems'])}" for method, runs in results.items()
               for r in runs if r.get("problems")]
    total = sum(len(runs) for runs in results.values())
    if flagged:
        lines += ["", f"{len(flagged)} of {total} runs flagged (kept in the statistics above):", *flagged]
    else:
        lines += ["", f"No run flagged: in all {total}, no attention block recorded dead and some lesion predicted."]
    return "\n".join(lines) + "\n"


def report(results: dict[str, list[dict[str, Any]]], costs: Mapping[str, Mapping[str, Any]]) -> str:
    """``table.md``: the table, the paired statistics (all runs; then without flagged pairs), cost, health."""
    parts = [table(results), f"\n## Paired differences against {BASELINE} (same splits)\n\n"]
    comparisons = paired_comparisons(results)
    if any(comparisons.values()):
        parts += [paired_table(comparisons), "\nΔ: method − " + BASELINE + " in points, mean over the splits both "
                  "ran, with its 95 % t interval; p: two-sided Wilcoxon signed-rank (exact; zero differences "
                  "dropped); n/a below 6 non-zero differences, where no data can give p < 0.05. All runs, flagged "
                  "ones included.\n"]
        flagged = flagged_splits(results)
        if any(flagged.values()):
            healthy = paired_comparisons(results, flagged)
            parts += ["\nWithout the splits where either run is flagged (see Run health):\n\n",
                      paired_table(healthy) if any(healthy.values()) else "No split is left without a flagged run.\n"]
    else:
        parts.append(f"Needs {BASELINE} and another method on the same splits (--methods {BASELINE} ...).\n")
    if costs:
        parts += ["\n## Cost\n\n", cost_table(results, costs)]
    parts += ["\n## Run health\n\n", health_section(results)]
    return "".join(parts)


def write_report(out: Path, summary: dict[str, Any], results: dict[str, list[dict[str, Any]]],
                 costs: Mapping[str, Mapping[str, Any]]) -> str:
    """Write ``table.md`` and ``results.json`` (with the paired statistics); return the table's text."""
    text = report(results, costs)
    paired = {key: {m: dataclasses.asdict(c) for m, c in by_method.items()}
              for key, by_method in paired_comparisons(results).items()}
    write_json(out / "results.json", {**summary, "results": results, "paired": paired, "cost": costs})
    save_atomically(out / "table.md", lambda tmp: tmp.write_text(text))
    return text


# ----------------------------------------------------------------------------------------------- figures


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


def differences_figure(results: Mapping[str, Sequence[Mapping[str, Any]]], out: Path) -> Path | None:
    """``paired_differences.png`` (``figures.save_paired_differences``); None without a comparison."""
    comparisons = paired_comparisons(results)
    if not any(comparisons.values()):
        return None
    panels = {title: comparisons[key] for key, title in PAIRED_METRICS if comparisons[key]}
    return save_paired_differences(out / "paired_differences.png", panels, baseline=BASELINE,
                                   flagged=flagged_splits(results), title=out.name)


@command
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_arguments(args)
    out = Path(args.out)
    data = args.data
    if data is None:
        from synthetic import default_cache_dir, make_cohort

        data = str(default_cache_dir() / f"{args.cohort_preset}-cohort-{args.subjects}")
        make_cohort(data, subjects=args.subjects, preset=args.cohort_preset, seed=0, montage=False)
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
