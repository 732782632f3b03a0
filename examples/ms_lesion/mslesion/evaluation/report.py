"""The experiment's report: ``table.md`` (Table 1's columns, the paired statistics against unet, the cost,
the run health), ``results.json`` and ``paired_differences.png``.

``experiment.py`` runs the (method, split) trainings and calls ``write_report`` after every run and
``differences_figure`` at the end; its docstring states what the numbers mean. Run health: ``run_problems``
names what makes a run's scores not the method's; flagged runs stay in the statistics, and a second table
repeats the comparison without their splits. Cost: ``network_cost`` counts a run's parameters and forward
FLOPs at its training crop.
"""

from __future__ import annotations

import csv
import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from ..checkpoint import read
from .figures import save_paired_differences
from ..model.unet import build_model
from ..run import save_atomically, write_json
from ..training.runtime import recorded_amp
from .stats import BASELINE, PairedComparison, compare_paired, format_interval, format_p

COLUMNS = (("sample_dice", "Sample-avg Dice"), ("voxel_dice", "Voxel-avg Dice"), ("sample_iou", "Sample-avg IoU"),
           ("voxel_iou", "Voxel-avg IoU"), ("voxel_lesion_f1", "Lesion F1"))
#: The metrics of the paired statistics.
PAIRED_METRICS = (("sample_dice", "Sample Dice"), ("voxel_dice", "Voxel Dice"), ("voxel_lesion_f1", "Lesion F1"))


# -------------------------------------------------------------------------------------------- run health


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
            blocks.append(f"{name}: " + ", ".join(f"{key} {value:.2g}" for key, value in block.items()))
        problems.append("attention dead" + (f" ({'; '.join(blocks)})" if blocks else ""))
    if predicted_voxels(run_dir) == 0:
        problems.append(f"no lesion voxel predicted in its {len(metrics.get('test', []))} test subjects "
                        "(never left the all-background start)")
    return problems


# -------------------------------------------------------------------------------------------------- cost


def network_cost(model: Path) -> dict[str, Any]:
    """Parameters and forward FLOPs of a run's network on one training crop.

    The network is built on the ``meta`` device (no memory, no arithmetic) and run under
    ``FlopCounterMode``, which counts the matmuls and convolutions that reach the dispatcher, those
    inside the attention blocks' custom autograd functions included; element-wise work is not counted.
    """
    trained = read(model).record.training
    config, crop = trained.network_config, trained.crop
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


# ------------------------------------------------------------------------------------------------ tables


def mean_std(values: Sequence[float], percent: bool = True) -> str:
    """``"mean ± std"`` (sample std; 0 for one value) with two decimals, in % of the values when ``percent``."""
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
    amps = {recorded_amp(r["training"].get("amp", "auto"), r["training"].get("device", "cpu"))
            for runs in results.values() for r in runs if "training" in r}
    lines.append("")
    lines.append(f"Scores in % (mean ± std over splits); peak memory: {', '.join(sorted(kinds))}"
                 + (f"; autocast: {', '.join(sorted(amps))}" if amps else "") + ".")
    return "\n".join(lines) + "\n"


def per_run_table(results: Mapping[str, Sequence[Mapping[str, Any]]]) -> str:
    """Markdown rows: every run (split or fold and seed) with its test subjects and each method's sample Dice and
    predicted/reference lesion volume, then the worst and the mean run per method (settings are chosen by the
    worst seed, not the best)."""
    methods = list(results)
    names = list(dict.fromkeys(r["split"] for runs in results.values() for r in runs))
    by_run = {m: {r["split"]: r for r in runs if "summary" in r} for m, runs in results.items()}
    lines = ["| Run | Test subjects | " + " | ".join(f"{m} Dice (volume)" for m in methods) + " |",
             "|" + "---|" * (len(methods) + 2)]
    for name in names:
        test = next((r.get("test", []) for m in methods for r in [by_run[m].get(name, {})] if r), [])
        cells = [f"{r['summary']['sample_dice']:.3f} ({r['summary'].get('voxel_volume_ratio', float('nan')):.2f}×)"
                 if (r := by_run[m].get(name)) else "" for m in methods]
        lines.append(f"| {name} | {', '.join(test)} | " + " | ".join(cells) + " |")
    for label, pick in (("worst", min), ("mean", lambda v: float(np.mean(v)))):
        cells = [f"{pick(d):.3f}" if (d := [r["summary"]["sample_dice"] for r in by_run[m].values()]) else ""
                 for m in methods]
        lines.append(f"| **{label}** | | " + " | ".join(cells) + " |")
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
    parts = [table(results), "\n## Every run\n\nSample Dice of the run's test subjects (predicted/reference lesion "
             "volume, all voxels pooled).\n\n", per_run_table(results),
             f"\n## Paired differences against {BASELINE} (same splits)\n\n"]
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


# ------------------------------------------------------------------------------------------------ figure


def differences_figure(results: Mapping[str, Sequence[Mapping[str, Any]]], out: Path) -> Path | None:
    """``paired_differences.png`` (``evaluation.figures.save_paired_differences``); None without a comparison."""
    comparisons = paired_comparisons(results)
    if not any(comparisons.values()):
        return None
    panels = {title: comparisons[key] for key, title in PAIRED_METRICS if comparisons[key]}
    return save_paired_differences(out / "paired_differences.png", panels, baseline=BASELINE,
                                   flagged=flagged_splits(results), title=out.name)
