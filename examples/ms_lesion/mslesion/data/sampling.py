"""Training crops: fixed-size random crops centred on lesion, brain or any voxels, and the lesion fraction."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .reading import CENTRES, Case

def sample_crop(
    case: Case,
    size: tuple[int, int, int],
    rng: np.random.Generator,
    *,
    lesion_fraction: float = 1 / 3,
    centre: str = "brain",
) -> tuple[np.ndarray, np.ndarray]:
    """A fixed-size random crop for training.

    With probability ``lesion_fraction`` the crop is centred on a random lesion voxel (nnU-Net's
    oversampling; skipped for cases without lesions); otherwise on a random brain voxel
    (``centre="brain"``) or at a uniformly random position in the volume (``centre="anywhere"``, the
    paper's plain random crops). Crops are shifted to stay inside the volume; a volume smaller than
    ``size`` is zero-padded (label 0).

    Args:
        case: a loaded case with image ``(M, D, H, W)``.
        size: crop size ``(d, h, w)``.
        rng: random generator.
        lesion_fraction: probability of a lesion-centred crop, in [0, 1].
        centre: ``"brain"`` or ``"anywhere"``.

    Returns:
        image ``(M, d, h, w)`` float32 and label ``(d, h, w)`` uint8 (zeros if the case has no label).
    """
    size = tuple(int(s) for s in size)  # type: ignore[assignment]
    if len(size) != 3 or min(size) < 1:
        raise ValueError(f"size must be three positive ints (d, h, w), got {size!r}")
    if not 0.0 <= lesion_fraction <= 1.0:
        raise ValueError(f"lesion_fraction must be in [0, 1], got {lesion_fraction!r}")
    if centre not in CENTRES:
        raise ValueError(f"centre must be one of {CENTRES}, got {centre!r}")
    shape = case.image.shape[1:]
    lesions = case.lesion_voxels()
    if lesions.size and rng.random() < lesion_fraction:
        middle = np.unravel_index(lesions[rng.integers(lesions.size)], shape)
        start = [int(c) - s // 2 for c, s in zip(middle, size)]
    elif centre == "brain" and case.brain_voxels().size:
        brain = case.brain_voxels()
        middle = np.unravel_index(brain[rng.integers(brain.size)], shape)
        start = [int(c) - s // 2 for c, s in zip(middle, size)]
    else:
        start = [int(rng.integers(0, n - s + 1)) if n >= s else 0 for n, s in zip(shape, size)]
    # Keep the crop inside the volume; centre a too-small volume in the crop.
    start = [min(max(b, 0), n - s) if n >= s else (n - s) // 2 for b, n, s in zip(start, shape, size)]
    src = tuple(slice(max(b, 0), min(b + s, n)) for b, s, n in zip(start, size, shape))
    dst = tuple(slice(sl.start - b, sl.stop - b) for sl, b in zip(src, start))
    image = np.zeros((case.image.shape[0], *size), np.float32)
    label = np.zeros(size, np.uint8)
    image[(slice(None), *dst)] = case.image[(slice(None), *src)]
    if case.label is not None:
        label[dst] = case.label[src]
    return image, label


def mean_lesion_fraction(cases: Sequence[Case]) -> float:
    """The paper's ``r``: mean over cases of (lesion voxels / all voxels)."""
    if not cases:
        raise ValueError("cases is empty; need at least one labelled case")
    unlabelled = [c.id for c in cases if c.label is None]
    if unlabelled:
        raise ValueError(f"cases {unlabelled} have no label; the lesion fraction needs masks")
    return float(np.mean([np.count_nonzero(c.label == 1) / c.label.size for c in cases]))  # type: ignore[union-attr]
