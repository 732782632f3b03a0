"""A figure like the paper's Fig. 5: one slice, the reference mask and several methods' predictions.

Each panel shows the FLAIR slice in grey with a mask over it: red for lesion voxels that agree with
the reference (or the reference itself), yellow for false positives, blue for missed voxels.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from inference import StepAttention  # noqa: E402
from metrics import case_scores  # noqa: E402
from run import save_atomically  # noqa: E402

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
    """Where the RSA block's three steps look from one lesion (``inference.lesion_attention``).

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
