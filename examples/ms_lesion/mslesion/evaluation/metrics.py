"""Segmentation metrics: the paper's Dice and IoU, plus lesion-wise detection and volume difference.

Per case, on binary masks (voxels labelled 255 in the reference are left out everywhere):

- Dice ``2|P∩R| / (|P|+|R|)`` and IoU ``|P∩R| / |P∪R|``;
- lesion-wise detection: lesions are 26-connected components (``scipy.ndimage.label``); a reference
  lesion is detected when any of its voxels is predicted; a predicted lesion is a true positive when
  any of its voxels is in the reference. TPR = detected / reference lesions, precision = true
  predicted lesions / predicted lesions, F1 = their harmonic mean;
- volume difference: absolute, in mL (``|V_P - V_R|``), and relative AVD in % (``100 |V_P - V_R| / V_R``).

Empty-reference rule: when a ratio's denominator is 0, the score is 1 if the prediction and the
reference are both empty, else 0 (an empty reference with a non-empty prediction scores Dice 0;
a non-empty reference with an empty prediction has precision 0). The relative AVD of an empty
reference is undefined (NaN) and left out of the averages.

Cohort summaries (``summarise``): the paper's *sample average* (mean of the per-case scores) and
*voxel average* (Dice/IoU of all voxels of all cases pooled), and lesion-wise scores pooled over
the cohort's lesions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ..data.reading import IGNORE_LABEL
CONNECTIVITY_26 = np.ones((3, 3, 3), dtype=bool)


@dataclass(frozen=True)
class CaseCounts:
    """The counts a case contributes; every score is a function of them."""

    tp: int  # voxels
    fp: int
    fn: int
    reference_lesions: int
    detected_lesions: int
    predicted_lesions: int
    true_predicted_lesions: int
    voxel_volume_ml: float


def _ratio(numerator: float, denominator: float, both_empty: bool) -> float:
    # The empty-reference rule of the module docstring.
    if denominator == 0:
        return 1.0 if both_empty else 0.0
    return numerator / denominator


def _binary(mask: np.ndarray, name: str) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim != 3:
        raise ValueError(f"{name} must be a 3-D (D, H, W) mask, got shape {mask.shape}")
    return mask


def case_counts(
    prediction: np.ndarray, reference: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0)
) -> CaseCounts:
    """Voxel and lesion counts of one case.

    Args:
        prediction: ``(D, H, W)`` mask, nonzero = lesion.
        reference: ``(D, H, W)`` labels: 1 lesion, 0 background, 255 ignored.
        spacing: voxel size in mm (for the volumes).

    Returns:
        The ``CaseCounts``.
    """
    prediction, reference = _binary(prediction, "prediction"), _binary(reference, "reference")
    if prediction.shape != reference.shape:
        raise ValueError(f"prediction shape {prediction.shape} differs from reference shape {reference.shape}")
    valid = reference != IGNORE_LABEL
    pred = (prediction != 0) & valid
    ref = (reference == 1) & valid
    ref_labels, n_ref = ndimage.label(ref, structure=CONNECTIVITY_26)
    pred_labels, n_pred = ndimage.label(pred, structure=CONNECTIVITY_26)
    detected = np.unique(ref_labels[pred & ref])
    true_predicted = np.unique(pred_labels[pred & ref])
    return CaseCounts(
        tp=int(np.count_nonzero(pred & ref)),
        fp=int(np.count_nonzero(pred & ~ref)),
        fn=int(np.count_nonzero(ref & ~pred)),
        reference_lesions=int(n_ref),
        detected_lesions=int(detected.size),
        predicted_lesions=int(n_pred),
        true_predicted_lesions=int(true_predicted.size),
        voxel_volume_ml=float(np.prod(spacing)) / 1000.0,
    )


def scores(counts: CaseCounts | Sequence[CaseCounts]) -> dict[str, float]:
    """Dice, IoU, lesion TPR / precision / F1 and volume differences of pooled counts.

    Args:
        counts: one case's counts, or several cases' (then voxels and lesions are pooled).

    Returns:
        ``dice``, ``iou``, ``lesion_tpr``, ``lesion_precision``, ``lesion_f1``, ``avd_ml``, ``avd_percent`` and
        ``volume_ratio`` (predicted / reference lesion volume: above 1 over-segments; NaN for an empty reference).
    """
    items = [counts] if isinstance(counts, CaseCounts) else list(counts)
    if not items:
        raise ValueError("counts is empty; need at least one case")
    tp, fp, fn = (sum(getattr(c, k) for c in items) for k in ("tp", "fp", "fn"))
    ref_lesions = sum(c.reference_lesions for c in items)
    pred_lesions = sum(c.predicted_lesions for c in items)
    empty = tp + fp + fn == 0
    tpr = _ratio(sum(c.detected_lesions for c in items), ref_lesions, empty)
    precision = _ratio(sum(c.true_predicted_lesions for c in items), pred_lesions, empty)
    predicted_ml = sum((c.tp + c.fp) * c.voxel_volume_ml for c in items)
    reference_ml = sum((c.tp + c.fn) * c.voxel_volume_ml for c in items)
    return {
        "dice": _ratio(2 * tp, 2 * tp + fp + fn, empty),
        "iou": _ratio(tp, tp + fp + fn, empty),
        "lesion_tpr": tpr,
        "lesion_precision": precision,
        "lesion_f1": _ratio(2 * tpr * precision, tpr + precision, empty),
        "avd_ml": abs(predicted_ml - reference_ml),
        "avd_percent": 100.0 * abs(predicted_ml - reference_ml) / reference_ml if reference_ml > 0 else math.nan,
        "volume_ratio": predicted_ml / reference_ml if reference_ml > 0 else math.nan,
    }


def case_scores(
    prediction: np.ndarray, reference: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0)
) -> dict[str, float]:
    """``scores`` of one case; see ``case_counts`` for the arguments."""
    return scores(case_counts(prediction, reference, spacing))


def summarise(per_case: Sequence[CaseCounts]) -> dict[str, float]:
    """Cohort summary: ``sample_*`` (mean of per-case scores, NaNs skipped) and ``voxel_*`` (pooled).

    Args:
        per_case: the counts of each case.

    Returns:
        e.g. ``sample_dice``, ``voxel_dice``, ``sample_iou``, ``voxel_iou``, ``voxel_lesion_f1``... and
        ``cases``.
    """
    per_case = list(per_case)
    if not per_case:
        raise ValueError("per_case is empty; need at least one case")
    table = [scores(c) for c in per_case]
    summary: dict[str, float] = {}
    for key in table[0]:
        values = np.array([row[key] for row in table], dtype=float)
        summary[f"sample_{key}"] = float(np.nanmean(values)) if np.isfinite(values).any() else math.nan
    summary.update({f"voxel_{k}": v for k, v in scores(per_case).items()})
    summary["cases"] = len(per_case)
    return summary
