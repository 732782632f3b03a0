"""Full-volume sliding-window inference (overlapping tiles, Gaussian-weighted blending), and scoring it.

Tiles of the training crop size cover the volume with the requested overlap (the last tile of an
axis is flush with the end, as in nnU-Net); each tile's softmax is weighted by a Gaussian centred on
the tile, because a fully convolutional network sees less context near a tile's border. Volumes
smaller than a tile are zero-padded. Any volume size works.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor, nn

from ..data.reading import Case
from .lesions import DEFAULT_MIN_LESION_MM3, remove_small_lesions
from ..evaluation.metrics import CONNECTIVITY_26, case_counts, scores, summarise
from sliceattn import RecurrentSliceAttention3d

# The tile overlap of every script's --overlap and of the functions below.
DEFAULT_OVERLAP = 0.5
# The lesion-probability threshold of the masks; 0.5 is the argmax (docs/ms_lesion_training.md measures others).
DEFAULT_THRESHOLD = 0.5

def gaussian_weight(size: Sequence[int], sigma_scale: float = 1 / 8) -> Tensor:
    """A ``(d, h, w)`` Gaussian importance map, peak 1, sigma = ``sigma_scale * size`` per axis.

    The minimum is clamped above 0 so that every voxel of a tile gets some weight.
    """
    axes = []
    for n in size:
        position = torch.arange(n, dtype=torch.float32) - (n - 1) / 2
        axes.append(torch.exp(-0.5 * (position / max(sigma_scale * n, 1e-6)) ** 2))
    weight = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    return weight.clamp_min(1e-3)


def tile_starts(length: int, tile: int, overlap: float) -> list[int]:
    """Start indices of tiles of ``tile`` voxels covering ``length`` voxels with ``overlap`` in [0, 1)."""
    if length <= tile:
        return [0]
    step = max(1, int(tile * (1.0 - overlap)))
    count = math.ceil((length - tile) / step) + 1
    return [round(i * (length - tile) / (count - 1)) for i in range(count)]


def _tiles(shape: Sequence[int], tile: Sequence[int], overlap: float) -> Iterator[tuple[slice, ...]]:
    for d in tile_starts(shape[0], tile[0], overlap):
        for h in tile_starts(shape[1], tile[1], overlap):
            for w in tile_starts(shape[2], tile[2], overlap):
                yield tuple(slice(s, s + t) for s, t in zip((d, h, w), tile))


@torch.no_grad()
def sliding_window_probabilities(
    model: nn.Module,
    image: np.ndarray | Tensor,
    tile: Sequence[int],
    *,
    overlap: float = DEFAULT_OVERLAP,
    batch_size: int = 2,
    device: torch.device | str = "cpu",
    amp_dtype: torch.dtype | None = None,
    mirror: bool = False,
) -> Tensor:
    """Class probabilities of a whole volume.

    Args:
        model: ``(B, M, d, h, w) -> (B, C, d, h, w)`` logits; put in eval mode by the caller.
        image: ``(M, D, H, W)`` volume.
        tile: tile size ``(d, h, w)`` (divisible by the model's down-sampling factors).
        overlap: fraction of a tile shared with its neighbour, in [0, 1).
        batch_size: tiles per forward pass.
        device: where the model runs.
        amp_dtype: autocast dtype (``torch.bfloat16``; ``torch.float16`` on CUDA), or None for float32.
        mirror: test-time augmentation: average each tile's probabilities over its 8 mirrorings
            (every subset of the three axes flipped, as nnU-Net does); 8 times the work.

    Returns:
        ``(C, D, H, W)`` float32 probabilities on the CPU.
    """
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap!r}")
    tile = tuple(int(t) for t in tile)
    if len(tile) != 3 or min(tile) < 1:
        raise ValueError(f"tile must be three positive ints (d, h, w), got {tile!r}")
    volume = torch.as_tensor(np.asarray(image, dtype=np.float32) if not isinstance(image, Tensor) else image).float()
    if volume.ndim != 4:
        raise ValueError(f"image must be (M, D, H, W), got shape {tuple(volume.shape)}")
    shape = volume.shape[1:]
    # Pad volumes smaller than a tile; the padding is cropped off at the end.
    padded = [max(n, t) for n, t in zip(shape, tile)]
    if list(shape) != padded:
        pad = [p - n for n, p in zip(shape, padded)]
        volume = torch.nn.functional.pad(volume, (0, pad[2], 0, pad[1], 0, pad[0]))
    device = torch.device(device)
    weight = gaussian_weight(tile).to(device)
    total: Tensor | None = None
    norm = torch.zeros(padded, device=device)
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()
    windows = list(_tiles(padded, tile, overlap))
    for first in range(0, len(windows), batch_size):
        chunk = windows[first : first + batch_size]
        batch = torch.stack([volume[(slice(None), *w)] for w in chunk]).to(device)
        with autocast:
            probabilities = _tile_probabilities(model, batch, mirror)
        if total is None:
            total = torch.zeros((probabilities.shape[1], *padded), device=device)
        for window, p in zip(chunk, probabilities):
            total[(slice(None), *window)] += p * weight
            norm[window] += weight
    assert total is not None  # at least one tile
    out = total / norm
    return out[(slice(None), *(slice(0, n) for n in shape))].cpu()


MIRRORS: tuple[tuple[int, ...], ...] = ((), (2,), (3,), (4,), (2, 3), (2, 4), (3, 4), (2, 3, 4))


def _tile_probabilities(model: nn.Module, batch: Tensor, mirror: bool) -> Tensor:
    """Softmax of a batch of tiles ``(B, M, d, h, w)``, averaged over the mirrorings when ``mirror``."""
    if not mirror:
        return torch.softmax(model(batch).float(), dim=1)
    total = sum(torch.softmax(model(batch.flip(axes)).float(), dim=1).flip(axes) for axes in MIRRORS)
    return total / len(MIRRORS)


def foreground_box(image: np.ndarray) -> tuple[slice, slice, slice]:
    """The bounding box of the voxels non-zero in any channel of ``(M, D, H, W)`` (the whole volume if none)."""
    nonzero = np.any(np.asarray(image) != 0, axis=0)
    if not nonzero.any():
        return tuple(slice(0, n) for n in nonzero.shape)  # type: ignore[return-value]
    box = []
    for axis in range(3):
        hit = np.flatnonzero(nonzero.any(axis=tuple(a for a in range(3) if a != axis)))
        box.append(slice(int(hit[0]), int(hit[-1]) + 1))
    return tuple(box)  # type: ignore[return-value]


def segment(model: nn.Module, image: np.ndarray, tile: Sequence[int], threshold: float = DEFAULT_THRESHOLD,
            **kwargs: Any) -> tuple[np.ndarray, np.ndarray]:
    """Lesion probability and mask of a whole ``(M, D, H, W)`` volume.

    Only the bounding box of the non-zero voxels is tiled (nnU-Net crops to it too): on skull-stripped
    scans that is the brain, about a quarter of a 1 mm MNI grid; outside it the prediction is background.

    Args:
        model: the network in eval mode.
        image: ``(M, D, H, W)`` volume.
        tile: the sliding-window tile.
        threshold: a voxel is lesion where its lesion probability is above this (0.5: the argmax).
        **kwargs: ``overlap``, ``batch_size``, ``device``, ``amp_dtype``, ``mirror`` of
            ``sliding_window_probabilities``.

    Returns:
        ``(D, H, W)`` float32 lesion probability (class 1) and ``(D, H, W)`` uint8 mask (probability > threshold).
    """
    box = foreground_box(image)
    probabilities = sliding_window_probabilities(model, np.asarray(image)[(slice(None), *box)], tile, **kwargs)
    lesion = np.zeros(np.asarray(image).shape[1:], np.float32)
    lesion[box] = probabilities[1].numpy()
    return lesion, (lesion > threshold).astype(np.uint8)


def predict_mask(model: nn.Module, image: np.ndarray | Tensor, tile: Sequence[int], **kwargs: Any) -> np.ndarray:
    """``(M, D, H, W)`` -> ``(D, H, W)`` uint8 lesion mask (``segment``'s mask)."""
    return segment(model, np.asarray(image), tile, **kwargs)[1]


def evaluate_cases(
    model: nn.Module,
    cases: Sequence[Case],
    tile: Sequence[int],
    *,
    overlap: float = DEFAULT_OVERLAP,
    device: torch.device | str = "cpu",
    amp_dtype: torch.dtype | None = None,
    mirror: bool = False,
    min_lesion_mm3: float = DEFAULT_MIN_LESION_MM3,
    threshold: float = DEFAULT_THRESHOLD,
) -> tuple[dict[str, float], list[dict[str, Any]], dict[str, np.ndarray]]:
    """Segment each labelled case whole and score it.

    Args:
        model: the network (put in eval mode here, left in it).
        cases: labelled cases.
        tile: sliding-window tile ``(d, h, w)``, usually the training crop.
        overlap: tile overlap in [0, 1).
        device: where the model runs.
        amp_dtype: autocast dtype or None (``sliding_window_probabilities``).
        mirror: mirroring test-time augmentation (``sliding_window_probabilities``).
        min_lesion_mm3: remove predicted lesions smaller than this (``lesions.remove_small_lesions``).
        threshold: the lesion-probability threshold of the masks (``segment``).

    Returns:
        The cohort summary, one row of scores per case (with ``id``), and the ``(D, H, W)`` uint8
        predictions by case id.
    """
    model.eval()
    counts, rows, predictions = [], [], {}
    for case in cases:
        if case.label is None:
            raise ValueError(f"case {case.id!r} has no lesion mask; evaluation needs labelled cases")
        mask = predict_mask(model, case.image, tile, threshold=threshold, overlap=overlap, device=device,
                            amp_dtype=amp_dtype, mirror=mirror)
        mask = remove_small_lesions(mask, np.diag([*case.spacing, 1.0]), min_lesion_mm3)
        count = case_counts(mask, case.label, case.spacing)
        counts.append(count)
        rows.append({"id": case.id, **scores(count), "predicted_voxels": count.tp + count.fp,
                     "reference_voxels": count.tp + count.fn})
        predictions[case.id] = mask
    return summarise(counts), rows, predictions


@dataclass(frozen=True)
class StepAttention:
    """Where one RSA step's map sends a lesion's slice: ``weights[j]`` for every slice ``j`` of its axis."""

    axis: str               # "axial", "coronal" or "sagittal"
    dim: int                # 2, 3 or 4 in (B, C, D, H, W)
    lesion_slice: int       # the lesion's slice index at the block's resolution
    weights: np.ndarray     # (L,) the map's row of that slice, sums to 1
    mm_per_slice: float     # slice spacing at the block's resolution


@torch.no_grad()
def lesion_attention(model: nn.Module, case: Case, tile: Sequence[int]) -> tuple[list[StepAttention], tuple[slice, ...]]:
    """The first RSA block's maps (``save_attention``) on a tile centred on the case's largest lesion.

    Args:
        model: a U-Net with at least one ``RecurrentSliceAttention3d`` block, in eval mode.
        case: a labelled case with at least one lesion voxel.
        tile: the tile size ``(d, h, w)`` (the training crop).

    Returns:
        One ``StepAttention`` per step in step order, and the tile's ``(D, H, W)`` slices in the case.
    """
    block = next((m for m in model.modules() if isinstance(m, RecurrentSliceAttention3d)), None)
    if block is None or case.label is None or not (case.label == 1).any():
        raise ValueError("lesion_attention needs a model with an RSA block and a case with a lesion")
    components, _ = ndimage.label(case.label == 1, structure=CONNECTIVITY_26)
    largest = np.bincount(components.ravel())[1:].argmax() + 1
    centre = np.argwhere(components == largest).mean(0).round().astype(int)
    shape = case.image.shape[1:]
    starts = [int(np.clip(c - t // 2, 0, max(n - t, 0))) for c, t, n in zip(centre, tile, shape)]
    box = tuple(slice(b, b + t) for b, t in zip(starts, tile))
    patch = np.zeros((case.image.shape[0], *tile), np.float32)
    inside = case.image[(slice(None), *box)]
    patch[(slice(None), *(slice(0, n) for n in inside.shape[1:]))] = inside
    saving, block.save_attention = block.save_attention, True
    try:
        model(torch.from_numpy(patch)[None].to(next(model.parameters()).device))
        maps = block.attention_maps
    finally:
        block.save_attention = saving  # as the caller had it
    steps = []
    for dim, attention in zip(block.dims, maps):
        axis = dim - 2
        length = attention.shape[-1]
        row = min(int((centre[axis] - starts[axis]) * length / tile[axis]), length - 1)
        steps.append(StepAttention(block.order[len(steps)], dim, row, attention[0, row].float().cpu().numpy(),
                                   case.spacing[axis] * tile[axis] / length))
    return steps, box
