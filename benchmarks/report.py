"""Turn pytest-benchmark JSON into a benchmark page (Markdown) and its PNG plots.

Usage::

    MALLOC_MMAP_THRESHOLD_=17179869184 MALLOC_TRIM_THRESHOLD_=17179869184 \\
        pytest --benchmark-only --benchmark-json=bench.json
    python benchmarks/report.py bench.json                    # writes benchmark-report/benchmarks.md + img/
    python benchmarks/report.py bench.json --out docs --overwrite    # regenerate the published page
    python benchmarks/report.py --best-of a.json b.json       # repeats of the suite: minimum time per case

The page reports what the JSON holds: a partial run (``-k``) gives the sections it can fill and
says which ones were not in the run. The prose is ``report_template.md``; every number in it is
computed here from the JSON or from ``sliceattn.cost``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import string
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from benchmarks.bench_common import FLOP_CLAIM, MEMORY_CLAIM  # noqa: E402
from sliceattn import cost  # noqa: E402

Record = dict[str, Any]
Runs = dict[tuple[str, str, str], Record]
TEMPLATE = Path(__file__).with_name("report_template.md")
PAGE, IMAGES = "benchmarks.md", ("img/bench_cost.png", "img/bench_time.png")
SIZE_ORDER = ("bottom", "second", "quarter", "full")
#: a claim ratio this close below the claim is marked ≈
NEAR_CLAIM = 0.95
BF16_ERROR_LIMIT = 1e-2
#: lean RSA / NonLocal3d: FLOPs, time and peak must stay below this at every size
LEAN_LIMIT = 1.0


@dataclass(frozen=True)
class Goal:
    """A ratio of two blocks' ``field`` in the training-mode records, with its limit (None: shown only)."""

    label: str
    block: str
    baseline: str
    field: str
    limit: Optional[float]


GOALS = (
    Goal("faithful RSA fwd+bwd time / naive", "rsa", "naive-rsa", "time", 1.05),
    Goal("training-forward peak / naive", "rsa", "naive-rsa", "train_peak_bytes", 0.85),
    Goal("inference peak / naive", "rsa", "naive-rsa", "inference_peak_bytes", 1.0),
    Goal("saved for backward / naive", "rsa", "naive-rsa", "saved_bytes", 1.0),
    Goal("checkpoint saved / faithful saved", "rsa-checkpoint", "rsa", "saved_bytes", 1 / 3),
    Goal("checkpoint fwd+bwd time / naive", "rsa-checkpoint", "naive-rsa", "time", None),
)


class ReportError(Exception):
    """A JSON file that is not a pytest-benchmark result."""


def not_in_run(what: str) -> str:
    return f"*Not in this run: no {what} records (select them with `pytest --benchmark-only -k ...`).*"


def load(path: Path) -> tuple[dict[str, Any], dict[str, Any], list[Record]]:
    """Machine info, commit info and one record per benchmark: its ``extra_info`` plus ``time`` (min, s).

    The minimum, not the median: on a shared CPU other processes only ever add time.
    """
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ReportError(f"cannot read {path}: {error}") from error
    if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), list):
        raise ReportError(f"{path} is not pytest-benchmark JSON (no 'benchmarks' list); write it with --benchmark-json")
    records = [dict(bench.get("extra_info", {}), time=bench["stats"]["min"]) for bench in data["benchmarks"]]
    return data.get("machine_info", {}), data.get("commit_info", {}), records


def index(records: Iterable[Record]) -> Runs:
    """``(size, block, mode) -> record`` of the CPU speed benchmarks; a later record replaces an earlier one."""
    return {(r["size"], r["block"], r["mode"]): r for r in records if "size" in r and not r["mode"].startswith("cuda")}


def merge(paths: list[Path], best_of: bool) -> tuple[dict[str, Any], dict[str, Any], list[Record], list[str]]:
    """Records of all files (later ones add or replace cases; ``best_of``: minimum time per case) and notes."""
    machine, commit, records = load(paths[0])
    notes = []
    first = index(records)
    for path in paths[1:]:
        extra_machine, _, extra = load(path)
        if best_of:
            for record in extra:
                key = (record.get("size"), record.get("block"), record.get("mode"))
                if key in first:
                    first[key]["time"] = min(first[key]["time"], record["time"])
            continue
        records += extra
        notes.append(
            f"- {len(extra)} cases added or re-run (replacing the first run's) by a later run "
            f"(`SLICEATTN_BENCH={extra_machine.get('bench_mode', '?')}`, rounds {extra_machine.get('bench_rounds', '?')}, "
            f"torch threads {extra_machine.get('torch_threads', '?')}): "
            + ", ".join(sorted({str(r.get("size", r.get("block", "?"))) for r in extra}))
        )
    if best_of and len(paths) > 1:
        notes.append(f"- best of {len(paths)} runs of the whole suite: each time is the minimum over the runs, for every block and its baseline alike")
    return machine, commit, records, notes


def size_key(size: str) -> tuple[int, int, int]:
    crop, level, batch = size.split("-")
    width, height, depth = (int(v) for v in crop.split("x"))
    return (int(batch[1:]), width * height * depth, SIZE_ORDER.index(level))


def fmt_ratio(x: Optional[float]) -> str:
    return "—" if x is None or not math.isfinite(x) else f"{x:.2f}"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def ratio(runs: Runs, size: str, block: str, baseline: str, mode: str, field: str) -> Optional[float]:
    a, b = runs.get((size, block, mode)), runs.get((size, baseline, mode))
    if a is None or b is None or not b.get(field):
        return None
    return a[field] / b[field]


def sizes_of(runs: Runs, block: Optional[str] = None) -> list[str]:
    return sorted({k[0] for k in runs if block is None or k[1] == block}, key=size_key)


def any_record(runs: Runs, size: str, block: str) -> Record:
    """A record of ``block`` at ``size`` (the mode-independent fields are the same in every mode)."""
    return next(r for k, r in runs.items() if k[0] == size and k[1] == block)


def speed_section(runs: Runs) -> str:
    """Time of each block against its baseline, per size and mode (a mode not in the run shows —)."""
    rows = []
    for size in sizes_of(runs):
        for block in sorted({k[1] for k in runs if k[0] == size}):
            baseline = any_record(runs, size, block)["baseline"]
            if baseline is None:
                continue
            cells = [size, f"`{block}`", f"`{baseline}`"]
            for mode in ("forward", "train", "inference"):
                mine, theirs = runs.get((size, block, mode)), runs.get((size, baseline, mode))
                if mine is None:
                    cells.append("—")
                    continue
                base_ms = f"{theirs['time'] * 1e3:.1f}" if theirs else "not run"
                cells.append(f"{mine['time'] * 1e3:.1f} / {base_ms} ({fmt_ratio(ratio(runs, size, block, baseline, mode, 'time'))})")
            rows.append(cells)
    if not rows:
        return not_in_run("block/baseline speed")
    header = ["size", "block", "baseline", "forward ms (ratio)", "fwd+bwd ms (ratio)", "inference ms (ratio)"]
    return table(header, rows)


def memory_section(runs: Runs) -> str:
    """FLOPs (analytic, flagged where the measured count differs), peaks and saved bytes per block and size."""
    rows = []
    for size in sizes_of(runs):
        for block in sorted({k[1] for k in runs if k[0] == size}):
            r = any_record(runs, size, block)
            exact = r["flops_forward"] == r["flops_forward_measured"]
            rows.append(
                [size, f"`{block}`", f"{r['flops_forward'] / 1e9:.3f}" + ("" if exact else " (≠ measured)")]
                + [cost.format_bytes(r[f]) for f in ("map_bytes", "train_peak_bytes", "inference_peak_bytes", "saved_bytes")]
            )
    if not rows:
        return not_in_run("block")
    return table(["size", "block", "fwd GFLOP", "attention maps", "train-fwd peak", "inference peak", "saved for bwd"], rows)


def verdict(ok: bool) -> str:
    return "met" if ok else "**missed**"


def goals_section(runs: Runs, numerics: list[Record]) -> str:
    """Each goal's worst ratio over the sizes where both blocks ran, then the per-size detail."""
    rows, detail = [], []
    sizes = [s for s in sizes_of(runs) if any((s, g.block, "train") in runs and (s, g.baseline, "train") in runs for g in GOALS)]
    values = {size: [ratio(runs, size, g.block, g.baseline, "train", g.field) for g in GOALS] for size in sizes}
    for column, goal in enumerate(GOALS):
        measured = [v[column] for v in values.values() if v[column] is not None]
        if goal.limit is None or not measured:
            continue
        worst = max(measured)
        rows.append([goal.label, f"≤ {goal.limit:.3g}", fmt_ratio(worst), verdict(worst <= goal.limit)])
    lean = lean_worst(runs)
    if lean:
        best = min(lean, key=lean.get)
        rows.append(
            ["lean RSA (best option) vs NonLocal3d: FLOPs, time, peak", f"< {LEAN_LIMIT:g} at every size",
             f"`{best}`: worst {lean[best]:.2f}", verdict(lean[best] < LEAN_LIMIT)]
        )
    for r in sorted(numerics, key=lambda r: r["block"]):
        ok = r["nonfinite"] == 0 and r["max_update_error"] <= BF16_ERROR_LIMIT
        rows.append(
            [f"bf16 autocast `{r['block']}`: non-finite / max update error", f"0 / ≤ {BF16_ERROR_LIMIT:g}",
             f"{r['nonfinite']} / {r['max_update_error']:.2e}", verdict(ok)]
        )
    if not rows:
        return not_in_run("`rsa`/`naive-rsa` training, lean or bf16")
    parts = [table(["goal", "target", "achieved (worst size)", "verdict"], rows)]
    detail = [[size] + [fmt_ratio(v) for v in values[size]] for size in sizes]
    if detail:
        parts.append("Per size (same run):\n\n" + table(["size"] + [g.label for g in GOALS], detail))
    return "\n\n".join(parts)


def lean_pairs(runs: Runs) -> list[tuple[str, str, Record, Optional[Record]]]:
    """``(block, size, lean record, NonLocal3d record or None)`` of every lean option's training case."""
    lean = sorted({k[1] for k, r in runs.items() if r["baseline"] == "nonlocal"})
    return [
        (block, size, runs[(size, block, "train")], runs.get((size, "nonlocal", "train")))
        for block in lean
        for size in sizes_of(runs, block)
        if (size, block, "train") in runs
    ]


def lean_values(mine: Record, other: Record) -> list[float]:
    return [mine[f] / other[f] for f in ("flops_forward", "time", "train_peak_bytes")]


def lean_worst(runs: Runs) -> dict[str, float]:
    """Each lean option's worst ratio (FLOPs, time, peak) against NonLocal3d over the sizes where both ran."""
    worst: dict[str, float] = {}
    for block, _, mine, other in lean_pairs(runs):
        if other is not None:
            worst[block] = max(worst.get(block, 0.0), *lean_values(mine, other))
    return worst


def lean_section(runs: Runs) -> str:
    rows = []
    for block, size, mine, other in lean_pairs(runs):
        if other is None:
            note = f"runs ({mine['time']:.2f} s, peak {cost.format_bytes(mine['train_peak_bytes'])}); NonLocal3d not run here"
            rows.append([size, f"`{block}`", "—", "—", "—", note])
        else:
            rows.append([size, f"`{block}`"] + [fmt_ratio(v) for v in lean_values(mine, other)] + [""])
    if not rows:
        return not_in_run("lean-option training")
    return table(["size", "option", "FLOPs", "fwd+bwd time", "train-fwd peak", "note"], rows)


def mark(value: float, claim: float) -> str:
    """``✓`` at or above the claim, ``≈`` within ``NEAR_CLAIM`` below it, ``✗`` otherwise."""
    return f"{value:,.1f} " + ("✓" if value >= claim else "≈" if value >= NEAR_CLAIM * claim else "✗")


def crop_volume(crop: str) -> int:
    return math.prod(int(v) for v in crop.split("x"))


def claims_section(claims: list[Record]) -> str:
    rows = [
        [
            r["placement"],
            r["crop"],
            " + ".join("×".join(str(v) for v in s) for s in r["shapes"]),
            mark(r["map_memory_ratio"], MEMORY_CLAIM),
            mark(r["map_flop_ratio_half"], FLOP_CLAIM),
            mark(r["map_flop_ratio_full"], FLOP_CLAIM),
            f"{r['block_flop_ratio_faithful']:.2f}",
            f"{r['block_flop_ratio_lean']:.2f}",
        ]
        for r in sorted(claims, key=lambda r: (r["placement"], crop_volume(r["crop"])))
    ]
    if not rows:
        return not_in_run("paper-claim")
    header = [
        "placement",
        "crop H×W×D",
        "blocks C×D×H×W",
        f"map memory NL/RSA (≥{MEMORY_CLAIM}?)",
        f"map FLOPs NL/RSA, C'=C/2 (≥{FLOP_CLAIM}?)",
        f"map FLOPs, C'=C (≥{FLOP_CLAIM}?)",
        "block FLOPs NL / faithful RSA",
        "block FLOPs NL / lean RSA (C/8 q/k, once)",
    ]
    return table(header, rows)


def projection_share(shape: tuple[int, ...]) -> float:
    """Fraction of the faithful RSA block's forward FLOPs spent in its 1x1x1 projections."""
    return 1 - cost.rsa_cost(shape, projection=False).forward / cost.rsa_cost(shape).forward


def saved_per_feature_map(runs: Runs, block: str) -> list[float]:
    """Bytes ``block`` saves for backward, maps excluded, in float32 ``B*C*N`` feature maps, per size."""
    return sorted(
        {round((r["saved_bytes"] - r["map_bytes"]) / (4 * math.prod(r["shape"])), 2) for k, r in runs.items() if k[1] == block}
    )


def span(values: list[float], fmt: str) -> str:
    low, high = format(min(values), fmt), format(max(values), fmt)
    return low if low == high else f"{low}–{high}"


def findings(claims: list[Record], runs: Runs) -> str:
    """What the claim rows and the speed records show, each sentence computed from them."""
    lines = []
    if claims:
        memory = sorted(claims, key=lambda r: r["map_memory_ratio"])
        low, high = memory[0], memory[-1]
        holds = "holds everywhere" if low["map_memory_ratio"] >= MEMORY_CLAIM else "does not hold everywhere"
        lines.append(
            f"- **{MEMORY_CLAIM}× map memory** {holds}: the smallest ratio is {low['map_memory_ratio']:,.1f}× "
            f"({low['placement']} at {low['crop']}); the largest {high['map_memory_ratio']:,.0f}× ({high['placement']} at {high['crop']})."
        )
        best_half = max(claims, key=lambda r: r["map_flop_ratio_half"])
        best_full = max(claims, key=lambda r: r["map_flop_ratio_full"])
        near = [f"{r['placement']} {r['crop']}" for r in claims if r["map_flop_ratio_full"] >= NEAR_CLAIM * FLOP_CLAIM]
        lines.append(
            f"- **{FLOP_CLAIM}× map FLOPs** against the non-local block's usual `C' = C/2`: at most "
            f"{best_half['map_flop_ratio_half']:.1f}× ({best_half['placement']} at {best_half['crop']}); with `C' = C` at most "
            f"{best_full['map_flop_ratio_full']:.1f}× ({best_full['placement']} at {best_full['crop']}); within "
            f"{100 * (1 - NEAR_CLAIM):.0f} % of {FLOP_CLAIM}× or above at: {', '.join(near) or 'no placement'}."
        )
        wins = [f"{r['placement']} {r['crop']} ({r['block_flop_ratio_faithful']:.1f}×)" for r in claims if r["block_flop_ratio_faithful"] > 1]
        shares = [projection_share(tuple(r["shape"])) for k, r in runs.items() if k[1] == "rsa"]
        spent = f"spends {span(shares, '.1%')} of its FLOPs in its 1×1×1 projections (recomputed at every step), and " if shares else ""
        lines.append(
            f"- **Whole blocks**: the faithful RSA {spent}costs fewer FLOPs than the non-local block only at: "
            f"{', '.join(wins) or 'no placement'}."
        )
    if runs:
        exact = [r for r in runs.values() if r["flops_forward"] == r["flops_forward_measured"] and r["flops_backward"] == r["flops_backward_measured"]]
        lines.append(f"- Analytic FLOPs (`sliceattn.cost`) equal `FlopCounterMode`'s, forward and backward, in {len(exact)} of {len(runs)} records.")
        faithful, naive = saved_per_feature_map(runs, "rsa"), saved_per_feature_map(runs, "naive-rsa")
        if faithful and naive:
            lines.append(
                f"- Saved for backward, maps excluded: {span(faithful, 'g')}·B·C·N float32 values for the faithful block, "
                f"{span(naive, 'g')}·B·C·N for the naive one."
            )
    return "\n".join(lines) or not_in_run("claim or block")


def cuda_section(records: list[Record]) -> str:
    """The tables of ``benchmarks/test_bench_cuda.py`` (``benchmarks/gpu.sh``)."""
    blocks = [r for r in records if r.get("mode") == "cuda-block"]
    cores = [r for r in records if r.get("mode") == "cuda-attention-core"]
    projections = [r for r in records if r.get("mode") == "cuda-projection"]
    if not (blocks or cores or projections):
        return not_in_run("CUDA") + " Run `benchmarks/gpu.sh` on a machine with a CUDA device."
    device = next(r["cuda_device"] for r in blocks + cores + projections)
    parts = [f"Device: {device}. Times are CUDA events (minimum over rounds); peaks `torch.cuda.max_memory_allocated` above the starting level."]
    if blocks:
        by_key = {(r["size"], r["block"]): r for r in blocks}
        rows = []
        for r in sorted(blocks, key=lambda r: (size_key(r["size"]), r["block"])):
            base = by_key.get((r["size"], r["baseline"]))
            time_ratio = fmt_ratio(r["cuda_train_time"] / base["cuda_train_time"]) if base else "—"
            peak_ratio = fmt_ratio(r["cuda_train_peak_bytes"] / base["cuda_train_peak_bytes"]) if base else "—"
            rows.append(
                [r["size"], f"`{r['block']}`", f"`{r['baseline']}`" if r["baseline"] else "—",
                 f"{r['cuda_train_time'] * 1e3:.2f}", time_ratio, f"{r['cuda_inference_time'] * 1e3:.2f}",
                 cost.format_bytes(r["cuda_train_peak_bytes"]), peak_ratio, cost.format_bytes(r["cuda_inference_peak_bytes"])]
            )
        header = ["size", "block", "baseline", "fwd+bwd ms", "/ baseline", "inference ms", "fwd+bwd peak", "/ baseline", "inference peak"]
        parts.append(table(header, rows))
    if cores:
        rows = [
            [r["size"], r["axis"], f"{r['cuda_time'] * 1e3:.3f}", cost.format_bytes(r["bytes_moved"]),
             f"{r['bandwidth'] / 1e9:,.0f}", f"{r['peak_fraction']:.0%}"]
            for r in sorted(cores, key=lambda r: (size_key(r["size"]), r["axis"]))
        ]
        parts.append(
            f"Attention core (fused `slice_attention`, forward, float32): bytes moved at the least (read query, key, "
            f"value; write the output) over the time, against the peak {cores[0]['peak_bandwidth'] / 1e9:,.0f} GB/s.\n\n"
            + table(["size", "axis", "ms", "bytes moved", "GB/s", "of peak"], rows)
        )
    if projections:
        by_kind = {(r["size"], r["kind"]): r for r in projections}
        rows = []
        for size in sorted({r["size"] for r in projections}, key=size_key):
            mine, conv = by_kind.get((size, "matmul")), by_kind.get((size, "conv3d"))
            cells = [size]
            for field, fmt in (("cuda_train_time", lambda v: f"{v * 1e3:.2f}"), ("cuda_train_peak_bytes", cost.format_bytes)):
                cells += [fmt(mine[field]) if mine else "—", fmt(conv[field]) if conv else "—",
                          fmt_ratio(mine[field] / conv[field]) if mine and conv else "—"]
            rows.append(cells)
        header = ["size", "matmul fwd+bwd ms", "conv3d ms", "ratio", "matmul peak", "conv3d peak", "ratio"]
        parts.append("Projections `C → 3C` (1×1×1), forward+backward: the library's batched matmul against `F.conv3d`.\n\n" + table(header, rows))
    return "\n\n".join(parts)


def machine_section(machine: dict[str, Any], commit: dict[str, Any], notes: list[str]) -> str:
    allocator = ", ".join(f"`{k}={v}`" for k, v in machine.get("allocator", {}).items() if v) or "glibc defaults (none set)"
    threads, cores = machine.get("torch_threads", 0), machine.get("cpu_count") or 0
    lines = [
        f"- CPU: {machine.get('cpu_model', machine.get('cpu', {}).get('brand_raw', '?'))}, {cores or '?'} cores, "
        f"torch threads {threads or '?'}" + (" (`SLICEATTN_BENCH_THREADS`)" if threads and threads < cores else ""),
        f"- torch {machine.get('torch', '?')}, Python {machine.get('python_version', '?')}",
        f"- allocator: {allocator}",
        f"- benchmark mode: `SLICEATTN_BENCH={machine.get('bench_mode', 'quick')}`, rounds `{machine.get('bench_rounds', 'default')}` "
        f"(at least; fast cases get more); load average when the run started: {machine.get('load_average') or 0:.1f}",
        f"- commit: {str(commit.get('id', '?'))[:10]}{' (dirty)' if commit.get('dirty') else ''}",
        f"- CUDA device: {machine['cuda_device']}" if "cuda_device" in machine else "- no CUDA device in this run",
    ]
    return "\n".join(lines + notes)


def two_panels() -> tuple[Any, Any]:
    """A headless figure with two side-by-side axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, 2, figsize=(10, 4))


def save(fig: Any, axes: Any, path: Path) -> None:
    """Legends, grids, then the PNG."""
    import matplotlib.pyplot as plt

    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_cost(path: Path) -> None:
    """Analytic cost of the attention against volume size: non-local ~N^2, slice ~N(D+H+W)."""
    channels = 256
    cubes = [(d, 2 * d, 2 * d) for d in (2, 3, 4, 6, 8, 12, 16, 24, 32, 48)]
    n = [d * h * w for d, h, w in cubes]
    comparisons = [cost.compare((1, channels, *c)) for c in cubes]
    fig, axes = two_panels()
    axes[0].loglog(n, [c.nonlocal_maps.forward for c in comparisons], "o-", label="non-local maps, 4·N²·C'")
    axes[0].loglog(n, [c.rsa_maps.forward for c in comparisons], "s-", label="slice-attention maps, 4·C·N·(D+H+W)")
    axes[0].loglog(n, [c.rsa_block.forward for c in comparisons], "^--", label="faithful RSA block (with projections)")
    axes[0].set(xlabel="voxels N (D×2D×2D)", ylabel="forward FLOPs", title=f"FLOPs, C = {channels}")
    axes[1].loglog(n, [c.nonlocal_maps.map_bytes for c in comparisons], "o-", label="non-local map, 4·N² bytes")
    axes[1].loglog(n, [c.rsa_maps.map_bytes for c in comparisons], "s-", label="slice maps, 4·(D²+H²+W²) bytes")
    axes[1].set(xlabel="voxels N (D×2D×2D)", ylabel="bytes", title="attention-map memory")
    save(fig, axes, path)


def plot_time(runs: Runs, path: Path) -> None:
    """Measured forward+backward time and training peak against B·N, one line per block."""
    fig, axes = two_panels()
    for block in ("naive-rsa", "rsa", "rsa-qk8-once", "rsa-noproj", "nonlocal", "nonlocal-sub"):
        points = sorted(
            (r["voxels"] * r["shape"][0], r["time"], r["train_peak_bytes"])
            for (size, name, mode), r in runs.items()
            if name == block and mode == "train"
        )
        if points:
            axes[0].loglog([p[0] for p in points], [p[1] for p in points], "o-", label=block)
            axes[1].loglog([p[0] for p in points], [p[2] for p in points], "o-", label=block)
    axes[0].set(xlabel="B·N (all levels)", ylabel="fwd+bwd seconds (min)", title="measured time")
    axes[1].set(xlabel="B·N (all levels)", ylabel="bytes", title="training-forward peak")
    save(fig, axes, path)


def render(json_paths: list[Path], out: Path, best_of: bool = False) -> list[Path]:
    """Write ``out/benchmarks.md`` and ``out/img/bench_*.png`` from the JSON files; return the paths written.

    Without matplotlib (the ``examples`` extra) the page is written without its plots.
    """
    machine, commit, records, notes = merge(json_paths, best_of)
    runs = index(records)
    numerics = [r for r in records if r.get("mode") == "bf16-autocast-forward"]
    claims = [row for r in records if r.get("block") == "claims" for row in r["claims"]]
    plots = importlib.util.find_spec("matplotlib") is not None
    no_plot = "*(plot not made: matplotlib is not installed)*"
    page = string.Template(TEMPLATE.read_text()).substitute(
        machine=machine_section(machine, commit, notes),
        findings=findings(claims, runs),
        goals=goals_section(runs, numerics),
        lean=lean_section(runs),
        memory_claim=MEMORY_CLAIM,
        flop_claim=FLOP_CLAIM,
        near_percent=f"{100 * (1 - NEAR_CLAIM):.0f}",
        claims=claims_section(claims),
        cost_plot=f"![analytic cost against volume size]({IMAGES[0]})" if plots else no_plot,
        speed=speed_section(runs),
        time_plot=f"![measured time and peak]({IMAGES[1]})" if plots and runs else no_plot if runs else "",
        memory=memory_section(runs),
        cuda=cuda_section(records),
    )
    written = []
    if plots:
        written.append(out / IMAGES[0])
        plot_cost(written[-1])
        if runs:
            written.append(out / IMAGES[1])
            plot_time(runs, written[-1])
    out.mkdir(parents=True, exist_ok=True)
    (out / PAGE).write_text(page)
    return [out / PAGE, *written]


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", type=Path, nargs="+", help="pytest-benchmark JSON (--benchmark-json); later files add or replace cases")
    parser.add_argument("--best-of", action="store_true", help="the JSON files are repeats of one suite: keep each case's minimum time")
    parser.add_argument(
        "--out", type=Path, default=Path("benchmark-report"),
        help=f"folder for {PAGE} and {', '.join(IMAGES)} (default: ./benchmark-report); --out docs regenerates the published page",
    )
    parser.add_argument("--overwrite", action="store_true", help=f"replace {PAGE} and the images in --out if they exist")
    args = parser.parse_args(argv)
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {args.out} is a file; give a folder")
    existing = [str(args.out / name) for name in (PAGE, *IMAGES) if (args.out / name).exists()]
    if existing and not args.overwrite:
        parser.error(f"{', '.join(existing)} exist; pass --overwrite to replace them, or choose another --out")
    try:
        for path in args.json:
            load(path)
    except ReportError as error:
        parser.error(str(error))
    written = render(args.json, args.out, best_of=args.best_of)
    print("wrote " + ", ".join(str(path) for path in written))


if __name__ == "__main__":
    main()
