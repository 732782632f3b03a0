"""Lesions as clinicians read them: connected components, their volumes and positions in world coordinates.

Everything here works on the subject's original grid (after ``Case.to_original``), so voxel indices map
to millimetres through the NIfTI affine: a lesion's centroid is ``affine @ (i, j, k, 1)`` and its volume
the voxel count times ``|det(affine[:3, :3])|``. Lesions are 26-connected components, as in
``evaluation.metrics``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage

from ..evaluation.metrics import CONNECTIVITY_26

LESION_FIELDS: tuple[str, ...] = ("label", "volume_ml", "centroid_x_mm", "centroid_y_mm", "centroid_z_mm",
                                  "max_probability")
REPORT_FIELDS: tuple[str, ...] = ("id", "lesions", "volume_ml", "largest_ml", "mean_probability")
# The default of --min-lesion-size, chosen by measurement (docs/ms_lesion_training.md, "Prediction outputs and
# options"): 3 mm^3 keeps Dice and raises lesion precision, on the cpu preset's synthetic confirmation runs.
DEFAULT_MIN_LESION_MM3 = 3.0


def voxel_volume_mm3(affine: np.ndarray) -> float:
    """The volume of one voxel in mm³ from a ``(4, 4)`` voxel-to-world affine."""
    return float(abs(np.linalg.det(np.asarray(affine)[:3, :3])))


def label_lesions(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """26-connected components of a binary mask: ``(labels uint16, count)``, labels 1..count, 0 background.

    Components are numbered by decreasing volume (1 = the largest), ties by position.
    """
    labels, count = ndimage.label(np.asarray(mask) != 0, structure=CONNECTIVITY_26)
    if count >= 2**16:
        raise ValueError(f"{count} lesions do not fit a uint16 label map")
    sizes = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    order = np.argsort(-sizes, kind="stable")  # old label (0-based) by decreasing size
    relabel = np.zeros(count + 1, np.uint16)
    relabel[order + 1] = np.arange(1, count + 1, dtype=np.uint16)
    return relabel[labels], int(count)


def remove_small_lesions(mask: np.ndarray, affine: np.ndarray, min_mm3: float) -> np.ndarray:
    """``mask`` without the 26-connected components smaller than ``min_mm3`` (world volume from ``affine``)."""
    if min_mm3 < 0:
        raise ValueError(f"min_mm3 must be >= 0, got {min_mm3}")
    mask = np.asarray(mask) != 0
    if min_mm3 == 0 or not mask.any():
        return mask.astype(np.uint8)
    labels, count = ndimage.label(mask, structure=CONNECTIVITY_26)
    sizes = np.bincount(labels.ravel(), minlength=count + 1) * voxel_volume_mm3(affine)
    keep = sizes >= min_mm3
    keep[0] = False
    return keep[labels].astype(np.uint8)


def lesion_table(labels: np.ndarray, count: int, probability: np.ndarray, affine: np.ndarray) -> list[dict[str, Any]]:
    """One row per lesion of a label map (``label_lesions``): volume, world centroid, maximum probability.

    Args:
        labels: ``(X, Y, Z)`` component labels on the source grid.
        count: number of lesions.
        probability: ``(X, Y, Z)`` lesion probability on the same grid.
        affine: ``(4, 4)`` voxel-to-world (mm) affine of that grid.
    """
    if count == 0:
        return []
    index = np.arange(1, count + 1)
    voxels = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    centroids = np.array(ndimage.center_of_mass(np.ones(labels.shape), labels, index)).reshape(count, 3)
    world = (np.asarray(affine) @ np.vstack([centroids.T, np.ones(count)]))[:3].T
    peaks = ndimage.maximum(probability, labels, index)
    volume = voxel_volume_mm3(affine) / 1000.0
    return [{"label": int(i), "volume_ml": round(float(n * volume), 4), "centroid_x_mm": round(float(x), 2),
             "centroid_y_mm": round(float(y), 2), "centroid_z_mm": round(float(z), 2),
             "max_probability": round(float(p), 4)}
            for i, n, (x, y, z), p in zip(index, voxels, world, np.atleast_1d(peaks))]


def subject_summary(case_id: str, rows: list[dict[str, Any]], mask: np.ndarray, probability: np.ndarray
                    ) -> dict[str, Any]:
    """The ``report.csv`` row of a subject: lesion count, total and largest volume, mean lesion probability."""
    inside = probability[np.asarray(mask) != 0]
    return {"id": case_id, "lesions": len(rows), "volume_ml": round(float(sum(r["volume_ml"] for r in rows)), 4),
            "largest_ml": max((r["volume_ml"] for r in rows), default=0.0),
            "mean_probability": round(float(inside.mean()), 4) if inside.size else ""}
