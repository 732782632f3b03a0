"""The example's figures: one like the paper's Fig. 5, the RSA block's attention, the experiment's differences.

``save_comparison``: one slice, the reference mask and several methods' predictions. Each panel shows
the FLAIR slice in grey with a mask over it: red for lesion voxels that agree with the reference (or
the reference itself), yellow for false positives, blue for missed voxels.
``save_attention_figure``: where the RSA block's three steps look from one lesion.
``save_montage``: a subject's modalities with the lesion outline (the synthetic cohort's montage).
``save_paired_differences``: each method's per-split difference from the baseline, with the mean and
its interval (``evaluation.stats``).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ..inference.sliding_window import StepAttention  # noqa: E402
from .metrics import case_scores  # noqa: E402
from ..run import save_atomically  # noqa: E402
from .stats import PairedComparison  # noqa: E402
from ..data.reading import Case  # noqa: E402

AGREE, FALSE_POSITIVE, MISSED = (1.0, 0.1, 0.1), (1.0, 0.9, 0.1), (0.2, 0.5, 1.0)


def pick_slice(reference: np.ndarray) -> int:
    """The index along D (the through-plane axis) of the slice with the most lesion voxels."""
    per_slice = (np.asarray(reference) == 1).reshape(reference.shape[0], -1).sum(1)
    return int(per_slice.argmax())


def _overlay(prediction: np.ndarray, reference: np.ndarray) -> np.ndarray:
    rgba = np.zeros((*reference.shape, 4), np.float32)
    pred, ref = prediction != 0, reference == 1
    for mask, colour in ((pred & ref, AGREE), (pred & ~ref, FALSE_POSITIVE), (~pred & ref, MISSED)):
        rgba[mask] = (*colour, 0.8)
    return rgba


def save_comparison(
    path: str | Path,
    image: np.ndarray,
    reference: np.ndarray,
    predictions: Mapping[str, np.ndarray],
    *,
    slice_index: int | None = None,
    title: str = "",
    dpi: int = 110,
) -> Path:
    """Write the PNG.

    Args:
        path: output file (``.png``), written atomically.
        image: ``(D, H, W)`` background volume (FLAIR).
        reference: ``(D, H, W)`` reference labels (1 lesion).
        predictions: method name -> ``(D, H, W)`` mask, one panel each, in this order.
        slice_index: D index to show; default the slice with the most reference lesion.
        title: figure title (e.g. the subject id).
        dpi: resolution.

    Returns:
        ``path``.
    """
    if image.shape != reference.shape or any(p.shape != reference.shape for p in predictions.values()):
        raise ValueError(
            f"image {image.shape}, reference {reference.shape} and predictions "
            f"{ {k: v.shape for k, v in predictions.items()} } must all have the same (D, H, W) shape"
        )
    index = pick_slice(reference) if slice_index is None else int(slice_index)
    panels = [("FLAIR", None), ("reference", reference), *predictions.items()]
    columns = min(len(panels), 5)  # wrap many methods onto several rows
    rows = -(-len(panels) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(2.6 * columns, 3.0 * rows), squeeze=False)
    for axis in axes.flat[len(panels):]:
        axis.axis("off")
    background = image[index]
    limits = np.percentile(background, [1, 99.5])
    for axis, (name, mask) in zip(axes.flat, panels):
        axis.imshow(background, cmap="gray", vmin=limits[0], vmax=limits[1], origin="lower")
        label = name
        if mask is not None:
            axis.imshow(_overlay(mask[index], reference[index]), origin="lower", interpolation="nearest")
            if name != "reference":
                label = f"{name}\ncase Dice {case_scores(mask, reference)['dice']:.3f}"
        axis.set_title(label, fontsize=9)
        axis.axis("off")
    figure.suptitle(f"{title}  slice {index} (red: agrees, yellow: false positive, blue: missed)", fontsize=8)
    figure.tight_layout()
    save_atomically(path, lambda tmp: figure.savefig(tmp, dpi=dpi, format="png"))
    plt.close(figure)
    return Path(path)


def save_attention_figure(
    path: str | Path,
    image: np.ndarray,
    label: np.ndarray,
    steps: Sequence[StepAttention],
    *,
    title: str = "",
    dpi: int = 110,
) -> Path:
    """Where the RSA block's three steps look from one lesion (``inference.sliding_window.lesion_attention``).

    Args:
        path: output PNG, written atomically.
        image: ``(d, h, w)`` FLAIR tile centred on the lesion.
        label: ``(d, h, w)`` reference labels of the tile.
        steps: the block's steps, in order.
        title: figure title.
        dpi: resolution.

    Returns:
        ``path``.
    """
    figure, axes = plt.subplots(1, len(steps) + 1, figsize=(3.0 * (len(steps) + 1), 2.9), squeeze=False)
    index = pick_slice(label)
    limits = np.percentile(image[index], [1, 99.5])
    axes[0, 0].imshow(image[index], cmap="gray", vmin=limits[0], vmax=limits[1], origin="lower")
    if (label[index] == 1).any():
        axes[0, 0].contour(label[index] == 1, levels=[0.5], colors="red", linewidths=0.7, origin="lower")
    axes[0, 0].set_title(f"FLAIR, slice {index} of the tile", fontsize=8)
    axes[0, 0].axis("off")
    for number, (axis, step) in enumerate(zip(axes[0, 1:], steps), start=1):
        offsets = (np.arange(step.weights.size) - step.lesion_slice) * step.mm_per_slice
        colours = ["red" if j == step.lesion_slice else "tab:blue" for j in range(step.weights.size)]
        axis.bar(offsets, step.weights, width=step.mm_per_slice * 0.8, color=colours)
        axis.set_xlabel(f"{step.axis} offset from the lesion (mm)", fontsize=7)
        axis.set_ylim(0, 1)
        axis.tick_params(labelsize=7)
        axis.set_title(f"step {number}: along the {step.axis} axis", fontsize=8)
    axes[0, 1].set_ylabel("attention of the lesion's slice", fontsize=7)
    figure.suptitle(f"{title}  RSA attention from the largest lesion (red bar: its own slice)", fontsize=8)
    figure.tight_layout()
    save_atomically(path, lambda tmp: figure.savefig(tmp, dpi=dpi, format="png"))
    plt.close(figure)
    return Path(path)


def _difference_row(axis: plt.Axes, row: int, comparison: PairedComparison, flagged: Collection[str]) -> None:
    """One method's row: its per-split differences in points, the mean and its t interval."""
    points = 100.0 * np.asarray(comparison.differences)
    bad = np.array([split in flagged for split in comparison.splits], dtype=bool)
    # Spread the points a little vertically so equal differences stay visible.
    offsets = row + 0.25 * (np.arange(points.size) / max(points.size - 1, 1) - 0.5)
    axis.scatter(points[~bad], offsets[~bad], s=14, color="tab:blue", alpha=0.7, zorder=2)
    axis.scatter(points[bad], offsets[bad], s=22, facecolors="none", edgecolors="red", zorder=2)
    low, high = comparison.t_interval
    if np.isfinite(low):
        axis.plot([100.0 * low, 100.0 * high], [row, row], color="black", linewidth=2.0, zorder=3)
    axis.scatter([100.0 * comparison.mean], [row], marker="D", s=30, color="black", zorder=4)


def save_paired_differences(
    path: str | Path,
    panels: Mapping[str, Mapping[str, PairedComparison]],
    *,
    baseline: str = "unet",
    flagged: Mapping[str, Collection[str]] | None = None,
    title: str = "",
    dpi: int = 110,
) -> Path:
    """One panel per metric, one row per method: each split's difference from the baseline (points), the
    mean (black diamond) and its 95 % t interval (black bar), and the zero line.

    Args:
        path: output PNG, written atomically.
        panels: metric title -> method -> its comparison with the baseline; rows in the first panel's order.
        baseline: the baseline's name, for the axis label.
        flagged: method -> splits where either run is flagged (dead attention, all-background):
            drawn as hollow red circles.
        title: figure title.
        dpi: resolution.

    Returns:
        ``path``.
    """
    if not panels or not any(panels.values()):
        raise ValueError("panels is empty: need at least one metric with one method to draw")
    methods = list(next(iter(panels.values())))
    flagged = flagged or {}
    figure, axes = plt.subplots(1, len(panels), figsize=(3.4 * len(panels), 0.9 + 0.45 * len(methods)),
                                squeeze=False, sharey=True)
    for axis, (metric, comparisons) in zip(axes[0], panels.items()):
        axis.axvline(0.0, color="grey", linewidth=0.8, linestyle="--")
        for row, method in enumerate(methods):
            if method not in comparisons:
                continue
            _difference_row(axis, row, comparisons[method], flagged.get(method, ()))
        axis.set_title(metric, fontsize=9)
        axis.set_xlabel(f"difference from {baseline} (points)", fontsize=8)
        axis.tick_params(labelsize=7)
    axes[0, 0].set_yticks(range(len(methods)), methods)
    axes[0, 0].set_ylim(len(methods) - 0.5, -0.5)
    figure.suptitle(f"{title}  one point per split; diamond and bar: mean and 95 % t interval"
                    "; hollow red: a flagged run", fontsize=8)
    figure.tight_layout()
    save_atomically(path, lambda tmp: figure.savefig(tmp, dpi=dpi, format="png"))
    plt.close(figure)
    return Path(path)


def save_montage(case: Case, path: str | Path, *, slices: int = 4, dpi: int = 110) -> Path:
    """Save a PNG: one row per modality, ``slices`` axial slices with the most lesion plus one coronal
    slice, lesion outline in red.

    Args:
        case: a ``Case`` (image ``(M, D, H, W)``, label ``(D, H, W)``, spacing).
        path: output PNG.
        slices: number of axial slices.
        dpi: resolution of the PNG.
    """
    label = case.label if case.label is not None else np.zeros(case.image.shape[1:], np.uint8)
    per_slice = (label == 1).sum((1, 2))
    chosen: list[int] = []
    for d in np.argsort(-per_slice, kind="stable"):  # most lesion first, at least 2 slices apart
        if all(abs(int(d) - c) >= 2 for c in chosen):
            chosen.append(int(d))
        if len(chosen) == slices:
            break
    chosen.sort()
    coronal = int(np.argmax((label == 1).sum((0, 2)))) if label.any() else label.shape[1] // 2
    sz, sy, sx = case.spacing
    rows = case.image.shape[0]
    fig, axes = plt.subplots(rows, len(chosen) + 1, figsize=(2.4 * (len(chosen) + 1), 2.6 * rows), squeeze=False)
    for m in range(rows):
        inside = case.image[m][case.brain_mask]
        low, high = np.percentile(inside, [0.5, 99.5]) if inside.size else (-3, 3)
        views = [(case.image[m, d], label[d], sy / sx, f"axial {d}") for d in chosen]
        views.append((case.image[m, :, coronal], label[:, coronal], sz / sx, f"coronal {coronal}"))
        for ax, (picture, outline, aspect, title) in zip(axes[m], views):
            ax.imshow(picture, cmap="gray", origin="lower", vmin=low, vmax=high, aspect=aspect)
            if (outline == 1).any():
                ax.contour(outline == 1, levels=[0.5], colors="red", linewidths=0.6, origin="lower")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{case.modalities[m].upper()} {title}", fontsize=8)
    fig.suptitle(f"{case.id}: lesion outline in red", fontsize=9)
    fig.tight_layout()
    path = save_atomically(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format="png"))
    plt.close(fig)
    return path
