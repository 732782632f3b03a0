"""A synthetic multiple-sclerosis cohort: T1, T2 and FLAIR with white-matter lesions, written as NIfTI.

What is modelled (numbers in ``docs/ms_lesion.md``):

* anatomy: the ICBM152 2009 template (brain, grey and white matter probability maps) that ships with
  nilearn, or a procedural phantom (skull, brain, ventricles, grey and white matter) without nilearn;
  each subject gets its own scaling, small rotation and smooth random deformation;
* contrasts from tissue fractions (white matter = 1; grey matter and CSF ratios from the issue);
  skull and scalp around the brain, so the brain mask matters;
* lesions: log-normal count and volumes (~3 mL load), half periventricular ovoids with the long axis
  along the ventricle-wall normal ("Dawson's fingers"), the rest in deep white matter, juxtacortical and
  infratentorial; per-lesion intensity ratios to white matter, smoothed borders, partial volume;
* acquisition: multiplicative bias field, Rician noise, a Gaussian slice profile (FWHM = slice thickness)
  and sampling on the output grid (0.7 x 0.7 x 3 mm for the paper preset).
* randomised appearance (``Preset.randomise``: the demo and mni presets), as SynthSeg does (Billot et al.,
  Med. Image Anal. 2023): per-subject contrasts, tissue texture, lesion load, size, confluence, intensity and
  heterogeneity, unlabelled hyperintensities (ventricular caps and rims, corticospinal tracts, choroid
  plexus), thick-slice blur, bias, noise, FLAIR ghosting, imperfect skull stripping and winsorising.

Everything is computed in the model layout ``(D, H, W)`` = ``(z, y, x)`` and written in RAS.
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
import nibabel as nib
import numpy as np
from scipy import ndimage

from ..data.reading import MODALITIES, CasePaths, DataError, load_case
from ..evaluation.figures import save_montage
from ..run import save_atomically

GENERATOR_VERSION = 1
ANATOMIES: tuple[str, ...] = ("auto", "mni152", "phantom")
FILES: tuple[str, ...] = ("t1", "t2", "flair", "mask", "brain_mask")
MONTAGE_NAME = "montage.png"

# Tissue intensities relative to white matter (T1, T2, FLAIR). Grey matter and CSF: the ratios.
# Bone and scalp are our choice (cortical bone dark; scalp fat bright on T1, fairly bright on T2/FLAIR).
CONTRAST: dict[str, tuple[float, float, float]] = {
    "wm": (1.0, 1.0, 1.0),
    "gm": (0.80, 1.74, 1.23),
    "csf": (0.51, 4.4, 0.05),
    "bone": (0.08, 0.12, 0.08),
    "scalp": (1.25, 1.10, 0.95),
}
# Lesion intensity = white matter x ratio, drawn per lesion: (mean, sd, low clip, high clip).
LESION_RATIO: dict[str, tuple[float, float, float, float]] = {
    "t1": (0.79, 0.14, 0.40, 0.98),
    "t2": (1.37, 0.35, 1.05, 2.50),
    "flair": (1.32, 0.07, 1.12, 1.55),
}
LESION_LOG_VOLUME = (2.86, 1.69)    # ln(mm^3) ~ N(mean, sd), per lesion
LESION_VOLUME_CLIP = (3.0, 4000.0)  # mm^3, keeps the log-normal's far tails out
CATEGORIES: dict[str, float] = {     # lesion location -> probability
    "periventricular": 0.5,
    "deep": 0.2,
    "juxtacortical": 0.2,
    "infratentorial": 0.1,
}
# Head layers outside the brain, mm from the brain surface (scaled per subject by 0.8-1.2).
LAYERS: dict[str, tuple[float, float]] = {"csf": (0.0, 2.0), "bone": (2.0, 7.0), "scalp": (7.0, 12.0)}
COARSE_STEP = 2.0  # mm, grid of the anatomy's distance maps and lesion candidates


@dataclass(frozen=True)
class Preset:
    """Output grid and lesion settings of a cohort.

    Attributes:
        spacing: voxel size in mm, ``(D, H, W)``.
        depth, height, width: inclusive ranges of the volume size in voxels, drawn per subject.
        anatomy_step: the anatomy is sampled every ``anatomy_step`` voxels in-plane and interpolated
            linearly (the template itself has 1 mm voxels; saves time on fine grids).
        sub_slices: samples through each slice's thickness for the slice profile.
        lesion_count: median lesion count (log-normal, sd 0.4 in log space).
        lesion_scale: per-lesion volumes are multiplied by this (coarse presets: keeps lesions visible).
        min_lesion_voxels: every case gets at least this many lesion voxels (extra lesions are added).
        skull_stripped: images are zero outside the brain mask, as in most public releases.
        randomise: draw each subject's appearance at random (``Appearance``: contrasts, texture, lesion
            appearance, non-lesion hyperintensities, blur, bias, noise, artefacts, intensity processing),
            as SynthSeg does; ``False``: the fixed contrasts above.
    """

    spacing: tuple[float, float, float]
    depth: tuple[int, int]
    height: tuple[int, int]
    width: tuple[int, int]
    anatomy_step: int
    sub_slices: int
    lesion_count: float
    lesion_scale: float
    min_lesion_voxels: int
    skull_stripped: bool = False
    randomise: bool = False


COHORT_PRESETS: dict[str, Preset] = {
    # The paper: 0.7 x 0.7 x 3 mm, 44-60 slices of 320 x 230-260.
    "paper": Preset((3.0, 0.7, 0.7), (44, 60), (320, 320), (230, 260), 2, 3, 42.0, 1.0, 20),
    # A CPU demo: 2 mm in-plane, ~44 x 104 x 88.
    "demo": Preset((3.0, 2.0, 2.0), (40, 48), (104, 104), (84, 92), 1, 3, 42.0, 1.0, 20, randomise=True),
    # Tests: 20 x 56 x 48 at 6 x 4 x 4 mm; lesions 2x larger so that they survive the coarse grid.
    "small": Preset((6.0, 4.0, 4.0), (20, 20), (56, 56), (48, 48), 1, 3, 42.0, 2.0, 8),
    # The 1 mm MNI grid of most public releases (182 x 218 x 182, skull-stripped).
    "mni": Preset((1.0, 1.0, 1.0), (182, 182), (218, 218), (182, 182), 1, 1, 42.0, 1.0, 20, skull_stripped=True,
                  randomise=True),
}


def default_cache_dir() -> Path:
    """Where cohorts are cached: ``$SLICEATTN_CACHE`` or ``~/.cache/sliceattn``."""
    return Path(os.environ.get("SLICEATTN_CACHE", Path.home() / ".cache" / "sliceattn"))


# ----------------------------------------------------------------------------------------------- anatomy


@dataclass(frozen=True)
class Anatomy:
    """Tissue maps in template (MNI-like, mm) space, plus what lesion placement needs.

    Fine maps (``gm``, ``wm``: fractions, ``(X, Y, Z)``) are on a grid with ``origin`` and ``step``;
    ``distance`` (signed mm to the brain surface, negative inside) is on the coarse grid
    (``coarse_origin``, ``COARSE_STEP``). ``candidates`` maps each lesion category to ``(N, 3)`` MNI
    positions; ``normals`` are the outward ventricle-wall normals at the periventricular candidates;
    ``ventricles`` are positions inside the lateral ventricles.
    """

    name: str
    gm: np.ndarray
    wm: np.ndarray
    origin: np.ndarray
    step: float
    distance: np.ndarray
    coarse_origin: np.ndarray
    candidates: dict[str, np.ndarray]
    normals: np.ndarray
    brain_box: np.ndarray  # (2, 3) min and max MNI coordinates of the brain
    ventricles: np.ndarray  # (N, 3) MNI positions inside the lateral ventricles (coarse grid)


def _block_mean(volume: np.ndarray, factor: int) -> np.ndarray:
    shape = [n // factor for n in volume.shape]
    cut = volume[: shape[0] * factor, : shape[1] * factor, : shape[2] * factor]
    return cut.reshape(shape[0], factor, shape[1], factor, shape[2], factor).mean((1, 3, 5))


def _infratentorial(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Brainstem and cerebellum, approximately, in MNI mm."""
    brainstem = (z < -12) & (np.abs(x) < 14) & (y > -45) & (y < -10)
    cerebellum = (z < -18) & (y < -40)
    return brainstem | cerebellum


def _finish(name: str, gm: np.ndarray, wm: np.ndarray, brain: np.ndarray, origin: np.ndarray,
            step: float, ventricles: np.ndarray | None = None) -> Anatomy:
    """Build the coarse distance maps and lesion candidates from fine fraction maps.

    ``ventricles`` (coarse grid, bool) is derived from deep central CSF when not given.
    """
    factor = int(round(COARSE_STEP / step))
    coarse = [_block_mean(v, factor) if factor > 1 else v for v in (gm, wm, brain)]
    cgm, cwm, cbrain = coarse
    coarse_origin = origin + (factor - 1) * step / 2
    axes = [coarse_origin[i] + COARSE_STEP * np.arange(n) for i, n in enumerate(cbrain.shape)]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    inside = cbrain > 0.5
    depth = ndimage.distance_transform_edt(inside) * COARSE_STEP
    distance = ndimage.distance_transform_edt(~inside) * COARSE_STEP - depth
    if ventricles is None:
        # Lateral ventricles: deep CSF near the centre, off the midline (the midline is fissure CSF).
        csf = cbrain - cgm - cwm
        central = (np.abs(x) > 3) & (np.abs(x) < 35) & (y > -50) & (y < 35) & (z > -15) & (z < 40)
        labels, count = ndimage.label((csf > 0.5) & central & (depth > 6))
        sizes = ndimage.sum_labels(np.ones_like(labels), labels, np.arange(1, count + 1))
        ventricles = np.isin(labels, 1 + np.argsort(sizes)[-2:]) & (labels > 0)
    ventricle_distance = ndimage.distance_transform_edt(~ventricles) * COARSE_STEP
    gm_distance = ndimage.distance_transform_edt(cgm < 0.5) * COARSE_STEP
    infra = _infratentorial(x, y, z)
    supra = ~infra
    masks = {
        "periventricular": supra & (cwm >= 0.5) & (ventricle_distance >= 1) & (ventricle_distance <= 5),
        "deep": supra & (cwm >= 0.85) & (ventricle_distance > 8) & (gm_distance > 4),
        "juxtacortical": supra & (cwm >= 0.4) & (gm_distance <= 2.5) & (ventricle_distance > 10) & (depth < 30),
        "infratentorial": infra & (cwm >= 0.5) & (depth > 3),
    }
    points = np.stack([x, y, z], axis=-1)
    candidates = {}
    for category, mask in masks.items():
        if not mask.any():
            raise RuntimeError(f"anatomy {name!r} has no candidate voxel for {category} lesions")
        candidates[category] = points[mask]
    smooth = ndimage.gaussian_filter(ventricle_distance, 1.0)
    gradient = np.stack(np.gradient(smooth), axis=-1)[masks["periventricular"]]
    normals = gradient / np.maximum(np.linalg.norm(gradient, axis=1, keepdims=True), 1e-6)
    brain_points = points[inside]
    box = np.stack([brain_points.min(0), brain_points.max(0)])
    return Anatomy(name, gm.astype(np.float32), wm.astype(np.float32), origin, step,
                   distance.astype(np.float32), coarse_origin, candidates, normals, box, points[ventricles])


def load_anatomy(name: str) -> Anatomy:
    """The anatomy ``"mni152"`` (needs nilearn: its packaged ICBM152 2009 maps, no download) or
    ``"phantom"``; ``"auto"`` picks mni152 when nilearn imports. Cached per process."""
    return _load_anatomy(resolve_anatomy(name))


@functools.lru_cache(maxsize=2)
def _load_anatomy(name: str) -> Anatomy:
    if name == "phantom":
        return _phantom()
    from nilearn.datasets import load_mni152_gm_template, load_mni152_template, load_mni152_wm_template

    t1 = load_mni152_template(resolution=1)
    affine = t1.affine
    if not np.allclose(affine[:3, :3], np.diag(np.diag(affine[:3, :3]))) or np.any(np.diag(affine)[:3] <= 0):
        raise RuntimeError(f"unexpected MNI152 template affine {affine.tolist()}; expected a positive diagonal")
    brain = (np.asarray(t1.dataobj) > 0).astype(np.float32)  # the template T1 is skull-stripped
    gm = np.asarray(load_mni152_gm_template(resolution=1).dataobj, dtype=np.float32) * brain
    wm = np.asarray(load_mni152_wm_template(resolution=1).dataobj, dtype=np.float32) * brain
    return _finish("mni152", gm, wm, brain, affine[:3, 3].astype(float), float(affine[0, 0]))


def resolve_anatomy(name: str) -> str:
    """``"auto"`` -> ``"mni152"`` if nilearn is installed, else ``"phantom"``."""
    if name not in ANATOMIES:
        raise ValueError(f"anatomy must be one of {ANATOMIES}, got {name!r}")
    if name != "auto":
        return name
    try:
        import nilearn  # noqa: F401
    except ImportError:
        return "phantom"
    return "mni152"


def _ellipsoid(x: np.ndarray, y: np.ndarray, z: np.ndarray, centre: Sequence[float],
               radii: Sequence[float]) -> np.ndarray:
    """Normalised radius: < 1 inside the axis-aligned ellipsoid."""
    return np.sqrt(sum(((c - m) / r) ** 2 for c, m, r in zip((x, y, z), centre, radii)))


def _phantom() -> Anatomy:
    """A procedural head in MNI-like coordinates (mm) on a 2 mm grid: cerebrum with a folded cortical
    ribbon, deep grey nuclei, lateral ventricles, interhemispheric fissure, cerebellum and brainstem."""
    origin = np.array([-98.0, -134.0, -72.0])
    axes = [origin[i] + COARSE_STEP * np.arange(n) for i, n in enumerate((99, 117, 95))]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    cerebrum = _ellipsoid(x, y, z, (0, -17, 14), (68, 86, 60)) < 1
    cerebellum = _ellipsoid(x, y, z, (0, -62, -32), (48, 28, 20)) < 1
    brainstem = _ellipsoid(x, y, z, (0, -28, -40), (12, 13, 38)) < 1
    brain = cerebrum | cerebellum | brainstem
    depth = ndimage.distance_transform_edt(brain) * COARSE_STEP
    # Gyri from a fixed wave pattern: sulci (thin CSF sheets) where it crosses zero, lined with grey
    # matter reaching 12 mm deep, over a 3.5 mm cortical ribbon.
    wave = np.sin(x / 7.0 + 0.7) * np.sin(y / 8.0) * np.sin(z / 6.5 + 1.3)
    sulci = cerebrum & (depth < 11) & (np.abs(wave) < 0.08)
    cortex = cerebrum & ((depth < 3.5) | ((depth < 13) & (np.abs(wave) < 0.35)))
    nuclei = (_ellipsoid(np.abs(x), y, z, (15, -8, 3), (9, 16, 9)) < 1) & cerebrum
    bend = 0.008 * (y + 12) ** 2  # ventricles curve down at both ends, like the lateral ventricles
    ventricles = (_ellipsoid(np.abs(x), y, z + bend, (9, -12, 18), (6, 30, 7)) < 1) & cerebrum
    fissure = (np.abs(x) < 1.5) & cerebrum & ((z > 30) | (y > 45) | (y < -70))
    cerebellar_wm = _ellipsoid(x, y, z, (0, -58, -30), (20, 12, 10)) < 1
    csf = ventricles | fissure | sulci
    gm = (cortex | nuclei | (cerebellum & ~cerebellar_wm)) & ~csf
    wm = brain & ~gm & ~csf
    # Partial volume: soften the hard labels by about one voxel.
    soft = [ndimage.gaussian_filter(v.astype(np.float32), 0.6) for v in (gm, wm, brain)]
    return _finish("phantom", soft[0], soft[1], soft[2], origin, COARSE_STEP, ventricles)


# ----------------------------------------------------------------------------------------------- subject


class Warp:
    """Subject mm -> template mm: ``L (p - c_s) + c_t + u(p)``, with ``L`` inverse scaling and rotation
    and ``u`` a smooth random displacement (sum of separable cosine products, wavelengths 60-160 mm)."""

    def __init__(self, rng: np.random.Generator, template_centre: np.ndarray):
        self.scale = rng.uniform(0.9, 1.1) * rng.uniform(0.95, 1.05, 3)  # subject size / template size
        angles = np.deg2rad(rng.uniform(-4, 4, 3))
        rotation = np.eye(3)
        for axis, angle in enumerate(angles):
            c, s = np.cos(angle), np.sin(angle)
            i, j = [a for a in range(3) if a != axis]
            r = np.eye(3)
            r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
            rotation = rotation @ r
        self.linear = rotation.T / self.scale[:, None]  # subject -> template, before u
        self.template_centre = template_centre
        self.subject_centre = template_centre + rng.uniform(-5, 5, 3)
        terms = 4
        self.amplitude = rng.normal(0, 1.5, (3, terms))  # mm
        self.frequency = 2 * np.pi / rng.uniform(60, 160, (3, terms, 3))
        self.phase = rng.uniform(0, 2 * np.pi, (3, terms, 3))

    def on_grid(self, axes: Sequence[np.ndarray]) -> np.ndarray:
        """Template coordinates ``(3, Z, Y, X)`` of the subject grid with 1-D ``axes`` ``(z, y, x)``."""
        zs, ys, xs = axes
        grid = [xs[None, None, :], ys[None, :, None], zs[:, None, None]]  # broadcastable x, y, z
        out = np.empty((3, zs.size, ys.size, xs.size), np.float64)
        for k in range(3):
            value = self.template_centre[k] + sum(
                self.linear[k, i] * (grid[i] - self.subject_centre[i]) for i in range(3)
            )
            for t in range(self.amplitude.shape[1]):
                value = value + self.amplitude[k, t] * functools.reduce(
                    np.multiply,
                    [np.cos(self.frequency[k, t, i] * grid[i] + self.phase[k, t, i]) for i in range(3)],
                )
            out[k] = value
        return out

    def displacement(self, points: np.ndarray) -> np.ndarray:
        """``u`` at ``(N, 3)`` subject points."""
        cosines = np.cos(points[:, None, None, :] * self.frequency[None] + self.phase[None])  # (N, 3, T, 3)
        return (self.amplitude[None] * cosines.prod(-1)).sum(-1)

    def inverse(self, points: np.ndarray) -> np.ndarray:
        """Subject positions of ``(N, 3)`` template points (fixed-point iteration; ``u`` is small and smooth)."""
        inv = np.linalg.inv(self.linear)
        subject = (points - self.template_centre) @ inv.T + self.subject_centre
        for _ in range(20):
            subject = (points - self.template_centre - self.displacement(subject)) @ inv.T + self.subject_centre
        return subject


@dataclass
class Lesion:
    """One drawn lesion (subject mm). ``ratios`` are the T1/T2/FLAIR intensities relative to white matter."""

    category: str
    volume: float                   # mm^3 as drawn
    centre: np.ndarray              # (3,) x, y, z mm
    axes: np.ndarray                # (3, 3) rows: unit semi-axis directions (x, y, z components)
    radii: np.ndarray               # (3,) semi-axes, mm
    border: float                   # mm, width of the smoothed border
    ratios: tuple[float, float, float]
    lobes: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))  # (K, 3) unit directions
    lobe_sizes: np.ndarray = field(default_factory=lambda: np.zeros(0))  # (K,) relative radius change
    voxels: int = 0                 # label voxels it owns after rasterisation


def _draw_lesion(rng: np.random.Generator, anatomy: Anatomy, warp: Warp, category: str, volume: float,
                 ratios: Mapping[str, tuple[float, float, float, float]] = LESION_RATIO,
                 pick: int | None = None) -> Lesion:
    """One lesion of ``category`` at a random candidate (or candidate ``pick``); ``ratios`` as ``LESION_RATIO``."""
    if pick is None:
        pick = int(rng.integers(len(anatomy.candidates[category])))
    position = anatomy.candidates[category][pick] + rng.uniform(-1, 1, 3) * COARSE_STEP / 2
    if category == "periventricular":
        # Ovoid with the long axis along the wall normal (Dawson's finger), touching the ventricle.
        elongation = rng.uniform(1.5, 2.5)
        long_axis = anatomy.normals[pick] @ np.linalg.inv(warp.linear).T
        long_axis /= np.linalg.norm(long_axis)
    else:
        elongation = rng.uniform(1.0, 1.6)
        long_axis = rng.normal(size=3)
        long_axis /= np.linalg.norm(long_axis)
    basis = _frame(rng, long_axis)
    radius = (3 * volume / (4 * np.pi)) ** (1 / 3)
    radii = radius * np.array([elongation ** (2 / 3), elongation ** (-1 / 3), elongation ** (-1 / 3)])
    centre = warp.inverse(position[None])[0]
    if category == "periventricular":
        centre = centre + long_axis * radii[0] * 0.5
    drawn = tuple(float(np.clip(rng.normal(mean, sd), low, high)) for mean, sd, low, high in ratios.values())
    # Irregular outline: the surface radius varies by ~10 % along a few random directions (lobulation).
    lobes = rng.normal(size=(3, 3))
    lobes /= np.linalg.norm(lobes, axis=1, keepdims=True)
    border = rng.uniform(0.4, 1.0) * min(radius, 1.5)
    return Lesion(category, volume, centre, basis, radii, border, drawn, lobes, rng.normal(0, 0.1, 3))


def _frame(rng: np.random.Generator, long_axis: np.ndarray) -> np.ndarray:
    """Rows: ``long_axis`` (unit) and two random directions completing an orthonormal frame, ``(3, 3)``."""
    basis = np.linalg.qr(np.column_stack([long_axis, rng.normal(size=(3, 2))]))[0].T
    basis[0] = long_axis
    return basis


def _profile(preset: Preset) -> tuple[np.ndarray, np.ndarray]:
    """Sub-slice offsets (mm) and weights: a Gaussian slice profile with FWHM = slice thickness."""
    thickness = preset.spacing[0]
    offsets = (np.arange(preset.sub_slices) - (preset.sub_slices - 1) / 2) * thickness / preset.sub_slices
    sigma = thickness / 2.3548
    weights = np.exp(-0.5 * (offsets / sigma) ** 2)
    return offsets, weights / weights.sum()


def _slab_average(volume: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """``(D * S, ...)`` sub-slices -> ``(D, ...)`` slices weighted by the slice profile."""
    sub = volume.reshape(-1, weights.size, *volume.shape[1:])
    return np.tensordot(weights, sub, axes=([0], [1])).astype(np.float32)


def _upsample(volume: np.ndarray, factor: int, shape: tuple[int, int]) -> np.ndarray:
    """Linear in-plane upsampling by an integer factor, cropped to ``shape`` (H, W)."""
    if factor == 1:
        return volume[:, : shape[0], : shape[1]]
    for axis, n in ((1, shape[0]), (2, shape[1])):
        volume = _linear_along(volume, np.arange(n) / factor, axis)
    return volume


def _linear_along(volume: np.ndarray, position: np.ndarray, axis: int) -> np.ndarray:
    """``volume`` linearly interpolated at fractional indices ``position`` along ``axis`` (clamped at the end)."""
    low = np.minimum(position.astype(int), volume.shape[axis] - 1)
    high = np.minimum(low + 1, volume.shape[axis] - 1)
    frac = (position - low).reshape([-1 if a == axis else 1 for a in range(volume.ndim)]).astype(np.float32)
    return np.take(volume, low, axis=axis) * (1 - frac) + np.take(volume, high, axis=axis) * frac


def _band(distance: np.ndarray, low: float, high: float, width: float = 1.0) -> np.ndarray:
    """Soft indicator of ``low <= distance < high`` with ramps of ``width`` mm."""
    return np.clip((distance - low) / width + 0.5, 0, 1) - np.clip((distance - high) / width + 0.5, 0, 1)


def _smooth_field(rng: np.random.Generator, axes: Sequence[np.ndarray], terms: int = 4) -> np.ndarray:
    """A smooth random field on the grid with 1-D ``axes`` (z, y, x) in mm, scaled to max |value| = 1."""
    field = np.zeros([a.size for a in axes], np.float32)
    for _ in range(terms):
        parts = [
            np.cos(2 * np.pi * a / rng.uniform(150, 400) + rng.uniform(0, 2 * np.pi)).astype(np.float32)
            for a in axes
        ]
        field += rng.normal() * parts[0][:, None, None] * parts[1][None, :, None] * parts[2][None, None, :]
    return field / max(float(np.abs(field).max()), 1e-6)


@dataclass
class SyntheticCase:
    """One generated subject, in model layout ``(D, H, W)`` = ``(z, y, x)``.

    Attributes:
        images: modality -> ``(D, H, W)`` int16 intensities (white matter about 1000 x a random gain).
        label: ``(D, H, W)`` uint8 lesion mask (lesion fraction >= 0.5 after the slice profile).
        brain_mask: ``(D, H, W)`` uint8.
        tissue: ``gm``, ``wm``, ``csf`` (intracranial) and ``lesion`` fractions, ``(D, H, W)`` float32; with a
            randomised appearance also ``mimic`` (the non-lesion hyperintensities).
        spacing: ``(D, H, W)`` mm.
        affine: ``(4, 4)`` RAS voxel-to-mm affine of the written ``(x, y, z)`` = ``(W, H, D)`` arrays.
        lesions: the drawn lesions (``voxels`` = label voxels each one owns).
        mimics: the drawn non-lesion hyperintensities (randomised appearance only; never labelled).
        appearance: the subject's randomised appearance, or None (fixed contrasts).
    """

    images: dict[str, np.ndarray]
    label: np.ndarray
    brain_mask: np.ndarray
    tissue: dict[str, np.ndarray]
    spacing: tuple[float, float, float]
    affine: np.ndarray
    lesions: list[Lesion]
    mimics: list[Lesion] = field(default_factory=list)
    appearance: Appearance | None = None


def generate_case(index: int, *, preset: str = "paper", seed: int = 0, anatomy: str = "auto",
                  randomise: bool | None = None) -> SyntheticCase:
    """Generate subject ``index`` of the cohort ``(preset, seed, anatomy, randomise)``; deterministic.

    Each subject has its own random streams (``seed``, ``index``), so subject ``i`` is the same whatever
    the cohort size. ``randomise`` (default: the preset's) draws the subject's ``Appearance`` from a second
    stream; anatomy and lesion positions come from the first, whose draws stay those of the fixed
    appearance up to the lesions.
    """
    if preset not in COHORT_PRESETS:
        raise ValueError(f"preset must be one of {sorted(COHORT_PRESETS)}, got {preset!r}")
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    if randomise is not None and not isinstance(randomise, bool):
        raise TypeError(f"randomise must be a bool or None, got {randomise!r}")
    cfg = COHORT_PRESETS[preset]
    randomise = cfg.randomise if randomise is None else randomise
    atlas = load_anatomy(anatomy)
    rng = np.random.default_rng([int(seed), int(index), GENERATOR_VERSION])
    shape = tuple(int(rng.integers(low, high + 1)) for low, high in (cfg.depth, cfg.height, cfg.width))
    warp = Warp(rng, atlas.brain_box.mean(0))
    thickness = rng.uniform(0.8, 1.2)
    layers = {name: (low * thickness, high * thickness) for name, (low, high) in LAYERS.items()}
    origin = _field_of_view(rng, cfg, shape, atlas, warp, layers["scalp"][1])
    sz, sy, sx = cfg.spacing
    axes_mm = [origin[2] + sz * np.arange(shape[0]), origin[1] + sy * np.arange(shape[1]),
               origin[0] + sx * np.arange(shape[2])]
    tissue = _tissue(cfg, axes_mm, atlas, warp, layers)
    look_rng = np.random.default_rng([int(seed), int(index), GENERATOR_VERSION, 1])
    look = draw_appearance(look_rng) if randomise else None
    lesion, owner, lesions = _lesions(rng, cfg, axes_mm, atlas, warp, tissue["gm"] + tissue["wm"], look)
    label = (lesion >= 0.5).astype(np.uint8)
    brain_mask = (tissue["brain"] >= 0.5).astype(np.uint8)
    mimics: list[Lesion] = []
    if look is None:
        images = _acquire(rng, axes_mm, tissue, lesion, owner, lesions)
    else:
        mimic, mimic_owner, mimics = _mimics(look_rng, cfg, axes_mm, atlas, warp, tissue, look)
        for item, voxels in zip(mimics, np.bincount(mimic_owner[mimic >= 0.5], minlength=len(mimics))):
            item.voxels = int(voxels)
        images = _acquire_randomised(look_rng, axes_mm, cfg.spacing, tissue, lesion, owner, lesions, mimic,
                                     mimic_owner, mimics, look)
        if cfg.skull_stripped:  # the pipeline's mask, not the true brain: lesions it cuts off are not labelled
            brain_mask = _strip(look_rng, tissue["distance"], cfg.spacing, look).astype(np.uint8)
            label &= brain_mask
        images = {m: np.clip(np.round(_winsorise(image, brain_mask > 0, look.winsor)), 0, 32767).astype(np.int16)
                  for m, image in images.items()}
    owned = np.bincount(owner[label > 0], minlength=len(lesions))
    for item, voxels in zip(lesions, owned):
        item.voxels = int(voxels)
    if cfg.skull_stripped:
        images = {m: np.where(brain_mask > 0, image, 0).astype(image.dtype) for m, image in images.items()}
    affine = np.diag([sx, sy, sz, 1.0])
    affine[:3, 3] = origin
    intracranial = {"gm": tissue["gm"], "wm": tissue["wm"],
                    "csf": tissue["brain"] - tissue["gm"] - tissue["wm"], "lesion": lesion}
    if look is not None:
        intracranial["mimic"] = mimic
    return SyntheticCase(images, label, brain_mask, intracranial, cfg.spacing, affine, lesions, mimics, look)


def _field_of_view(rng: np.random.Generator, cfg: Preset, shape: tuple[int, ...], atlas: Anatomy, warp: Warp,
                   scalp: float) -> np.ndarray:
    """RAS origin (x, y, z mm) of voxel 0: in-plane centred on the brain, top slice just above the scalp."""
    corners = np.array(np.meshgrid(*atlas.brain_box.T, indexing="ij")).reshape(3, -1).T
    extent = warp.inverse(corners)
    centre = (extent.min(0) + extent.max(0)) / 2
    sz, sy, sx = cfg.spacing
    top = extent[:, 2].max() + scalp + rng.uniform(0, 6)
    return np.array([
        centre[0] - (shape[2] - 1) * sx / 2 + rng.uniform(-3, 3) * sx,
        centre[1] - (shape[1] - 1) * sy / 2 + rng.uniform(-3, 3) * sy,
        top - (shape[0] - 1) * sz,
    ])


def _tissue(cfg: Preset, axes_mm: Sequence[np.ndarray], atlas: Anatomy, warp: Warp,
            layers: dict[str, tuple[float, float]]) -> dict[str, np.ndarray]:
    """Tissue fractions ``(D, H, W)`` on the output grid, through the slice profile, and ``distance`` (signed mm
    to the brain surface, negative inside).

    The anatomy is sampled on sub-slices and every ``anatomy_step`` voxels in-plane, then averaged
    over each slice and interpolated to the full in-plane grid.
    """
    offsets, weights = _profile(cfg)
    step = cfg.anatomy_step
    shape = tuple(a.size for a in axes_mm)
    sub_axes = [(axes_mm[0][:, None] + offsets[None]).ravel()]
    for axis in (1, 2):
        coarse = axes_mm[axis][::step]
        if (shape[axis] - 1) % step:  # one more sample so the last voxel is interpolated, not extrapolated
            coarse = np.append(coarse, coarse[-1] + cfg.spacing[axis] * step)
        sub_axes.append(coarse)
    template = warp.on_grid(sub_axes)
    fine = (template - atlas.origin[:, None, None, None]) / atlas.step
    gm = ndimage.map_coordinates(atlas.gm, fine, order=1, mode="nearest")
    wm = ndimage.map_coordinates(atlas.wm, fine, order=1, mode="nearest")
    del fine
    coarse_index = (template - atlas.coarse_origin[:, None, None, None]) / COARSE_STEP
    del template
    distance = ndimage.map_coordinates(atlas.distance, coarse_index, order=1, mode="nearest")
    del coarse_index
    brain = np.clip(0.5 - distance / 1.5, 0, 1)
    gm = np.minimum(gm, brain)
    wm = np.minimum(wm, brain - gm)
    outside = (1 - brain) * (distance > 0)
    fractions = {
        "gm": gm, "wm": wm,
        "csf": brain - gm - wm + outside * _band(distance, *layers["csf"]),
        "bone": outside * _band(distance, *layers["bone"]),
        "scalp": outside * _band(distance, *layers["scalp"]),
        "brain": brain,
        "distance": distance,
    }
    return {k: _upsample(_slab_average(v, weights), step, shape[1:]) for k, v in fractions.items()}


def _lesions(rng: np.random.Generator, cfg: Preset, axes_mm: Sequence[np.ndarray], atlas: Anatomy, warp: Warp,
             parenchyma: np.ndarray, look: Appearance | None = None) -> tuple[np.ndarray, np.ndarray, list[Lesion]]:
    """Draw lesions in template space and rasterise them on the output grid with the slice profile.

    With an appearance ``look``, its lesion load, size, intensity ratios and confluence apply.
    Returns the lesion fraction ``(D, H, W)``, the index of the lesion owning each voxel (-1: none) and
    the lesions.
    """
    offsets, weights = _profile(cfg)
    lesion = np.zeros(parenchyma.shape, np.float32)
    owner = np.full(parenchyma.shape, -1, np.int32)
    load, size = (look.lesion_load, look.lesion_size) if look else (1.0, 1.0)
    ratios = look.lesion_ratio if look else LESION_RATIO
    count = max(1, int(round(rng.lognormal(np.log(cfg.lesion_count * load), 0.4))))
    categories = list(CATEGORIES)
    lesions: list[Lesion] = []

    def add(item: Lesion) -> None:
        lesions.append(item)
        _rasterise(item, len(lesions) - 1, axes_mm, offsets, weights, parenchyma, lesion, owner)

    for _ in range(count):
        category = categories[rng.choice(len(categories), p=list(CATEGORIES.values()))]
        volume = float(np.clip(rng.lognormal(*LESION_LOG_VOLUME), *LESION_VOLUME_CLIP)) * cfg.lesion_scale * size
        if look is None:
            add(_draw_lesion(rng, atlas, warp, category, volume))
            continue
        pick = int(rng.integers(len(atlas.candidates[category])))
        add(_draw_lesion(rng, atlas, warp, category, volume, ratios, pick))
        if category == "periventricular" and rng.random() < look.confluent:
            # Confluent lesion: 2-5 overlapping ovoids along the same stretch of ventricle wall.
            where = atlas.candidates[category]
            near = np.flatnonzero(np.linalg.norm(where - where[pick], axis=1) < 10.0)
            for neighbour in rng.choice(near, size=int(rng.integers(2, 6))):
                add(_draw_lesion(rng, atlas, warp, category, volume * rng.uniform(0.3, 1.0), ratios, int(neighbour)))
    # Every case gets visible lesions: add periventricular ones of a few voxels until there are enough.
    voxel_volume = float(np.prod(cfg.spacing))
    for _ in range(50):
        if (lesion >= 0.5).sum() >= cfg.min_lesion_voxels:
            break
        volume = max(cfg.min_lesion_voxels, 4) * voxel_volume * rng.uniform(1.5, 3.0)
        add(_draw_lesion(rng, atlas, warp, "periventricular", volume, ratios))
    return lesion, owner, lesions


def _acquire(rng: np.random.Generator, axes_mm: Sequence[np.ndarray], tissue: dict[str, np.ndarray],
             lesion: np.ndarray, owner: np.ndarray, lesions: Sequence[Lesion]) -> dict[str, np.ndarray]:
    """Contrasts, lesions, bias field and Rician noise per modality; int16 like scanner output."""
    shape = lesion.shape
    ratios = np.array([(0.0, 0.0, 0.0)] + [item.ratios for item in lesions], np.float32)  # row 0: no lesion
    images = {}
    for m, modality in enumerate(("t1", "t2", "flair")):
        gain = 1000.0 * rng.uniform(0.7, 1.3)
        jitter = {t: 1.0 if t == "wm" else rng.normal(1.0, 0.03) for t in CONTRAST}
        clean = sum(tissue[t] * CONTRAST[t][m] * jitter[t] for t in CONTRAST) * gain
        clean = clean * (1 - lesion) + lesion * ratios[owner + 1, m] * gain
        bias = np.exp(rng.uniform(np.log(1.10), np.log(1.20)) * _smooth_field(rng, axes_mm))
        sigma = rng.uniform(0.01, 0.05) * gain
        real = clean * bias + rng.normal(0, sigma, shape).astype(np.float32)
        imag = rng.normal(0, sigma, shape).astype(np.float32)
        images[modality] = np.clip(np.round(np.hypot(real, imag)), 0, 32767).astype(np.int16)
    return images


def _rasterise(item: Lesion, number: int, axes_mm: Sequence[np.ndarray], offsets: np.ndarray,
               weights: np.ndarray, parenchyma: np.ndarray, lesion: np.ndarray, owner: np.ndarray) -> None:
    """Add one lesion's partial-volume fraction (limited to parenchyma) into ``lesion``/``owner``."""
    reach = item.radii.max() + item.border
    centre_zyx = item.centre[::-1]
    window = []
    for axis, coords in enumerate(axes_mm):
        pad = (offsets.max() if axis == 0 else 0.0) + reach
        lo, hi = np.searchsorted(coords, [centre_zyx[axis] - pad, centre_zyx[axis] + pad])
        if hi <= lo:
            return
        window.append(slice(int(lo), int(hi)))
    zs = (axes_mm[0][window[0]][:, None] + offsets[None]).ravel()
    grid = np.meshgrid(axes_mm[2][window[2]], axes_mm[1][window[1]], zs, indexing="ij")  # x, y, z
    delta = np.stack(grid, axis=-1) - item.centre                                     # (X, Y, Zs, 3)
    local = delta @ item.axes.T / item.radii
    rho = np.linalg.norm(local, axis=-1)
    direction = local / np.maximum(rho, 1e-6)[..., None]
    # Surface radius 1 + sum_k a_k * P2(u . v_k): zero-mean bumps (P2 = Legendre polynomial of order 2).
    bumps = 1.5 * (direction @ item.lobes.T) ** 2 - 0.5
    rho = rho / (1 + bumps @ item.lobe_sizes)
    fraction = np.clip(0.5 + (1 - rho) * item.radii.min() / item.border, 0, 1)
    fraction = _slab_average(np.transpose(fraction, (2, 1, 0)), weights)              # (D, H, W) window
    fraction = np.minimum(fraction, parenchyma[tuple(window)])
    box = tuple(window)
    wins = fraction > lesion[box]
    owner[box][wins] = number
    lesion[box] = np.maximum(lesion[box], fraction)


# ----------------------------------------------------------------------------------------------- appearance


# Hyperintensities that are not lesions (never labelled), by kind: where they sit and what region bounds them.
MIMICS: tuple[str, ...] = ("rim", "tract", "choroid")


@dataclass(frozen=True)
class Appearance:
    """One subject's randomised appearance (``Preset.randomise``), drawn by ``draw_appearance``.

    Per-modality tuples are in ``MODALITIES`` order (T1, T2, FLAIR). Intensities are ratios to white matter.

    Attributes:
        contrast: tissue (``CONTRAST``'s keys) -> its intensity per modality.
        lesion_ratio: modality -> lesion intensity ``(mean, sd, low clip, high clip)`` drawn per lesion.
        lesion_load: the median lesion count is multiplied by this.
        lesion_size: every lesion volume is multiplied by this.
        confluent: probability that a periventricular lesion comes with 2-5 overlapping neighbours.
        texture: amplitude (sd) per modality of a multiplicative tissue texture with features of ``texture_mm``.
        texture_mm: feature size of the tissue texture, mm.
        heterogeneity: relative variation of each lesion's contrast inside it (2 mm features).
        mimics: kind (``MIMICS``) -> number drawn.
        mimic_ratio: kind -> intensity per modality.
        gain: scanner scale per modality (white matter = 1000 x gain).
        blur_mm: per modality, the FWHM in mm of the acquisition's blur along ``blur_axis`` (0: none),
            i.e. a thick-slice acquisition resampled to the output grid.
        blur_axis: per modality, the axis (0, 1, 2 = D, H, W) of that blur.
        bias: per modality, the log amplitude of the residual bias field.
        noise: per modality, the Rician noise sigma relative to white matter.
        ghost: FLAIR ghost amplitude (a copy shifted by half the field of view along ``ghost_axis``; 0: none).
        ghost_axis: 1 or 2, the phase-encoding axis.
        winsor: each image is clipped at this percentile of its brain voxels (100: not clipped).
        strip_mm: skull-stripped presets: the stripping mask's mean offset from the brain surface, mm
            (negative: cuts into the cortex, positive: leaves CSF and dura).
        strip_wobble_mm: the amplitude of the offset's variation along the surface, mm.
    """

    contrast: dict[str, tuple[float, ...]]
    lesion_ratio: dict[str, tuple[float, float, float, float]]
    lesion_load: float
    lesion_size: float
    confluent: float
    texture: tuple[float, ...]
    texture_mm: float
    heterogeneity: float
    mimics: dict[str, int]
    mimic_ratio: dict[str, tuple[float, ...]]
    gain: tuple[float, ...]
    blur_mm: tuple[float, ...]
    blur_axis: tuple[int, ...]
    bias: tuple[float, ...]
    noise: tuple[float, ...]
    ghost: float
    ghost_axis: int
    winsor: float
    strip_mm: float
    strip_wobble_mm: float


def _uniform(rng: np.random.Generator, ranges: Sequence[tuple[float, float]]) -> tuple[float, ...]:
    return tuple(float(rng.uniform(low, high)) for low, high in ranges)


def draw_appearance(rng: np.random.Generator) -> Appearance:
    """Draw a subject's appearance: wide but MS-plausible ranges (``docs/ms_lesion.md``, "randomised
    appearance"), in the spirit of SynthSeg's domain randomisation (Billot et al., Med. Image Anal. 2023)."""
    contrast = {  # (T1, T2, FLAIR) ranges; grey matter on FLAIR reaches faint-lesion brightness on purpose
        "wm": ((1.0, 1.0), (1.0, 1.0), (1.0, 1.0)),
        "gm": ((0.62, 0.92), (1.2, 2.0), (1.05, 1.45)),
        "csf": ((0.15, 0.6), (2.5, 6.0), (0.02, 0.45)),  # FLAIR: imperfect fluid suppression
        "bone": ((0.04, 0.2), (0.05, 0.3), (0.04, 0.2)),
        "scalp": ((0.9, 1.6), (0.7, 1.5), (0.6, 1.3)),
    }
    flair_mean = rng.uniform(1.12, 1.6)
    lesion_ratio = {  # the mean per subject, the spread per lesion; low FLAIR clips overlap grey matter
        "t1": (float(rng.uniform(0.55, 0.95)), 0.12, 0.3, 1.0),
        "t2": (float(rng.uniform(1.2, 2.0)), 0.3, 1.02, 3.0),
        "flair": (float(flair_mean), float(rng.uniform(0.05, 0.15)), 1.03, 2.0),
    }
    return Appearance(
        contrast={tissue: _uniform(rng, ranges) for tissue, ranges in contrast.items()},
        lesion_ratio=lesion_ratio,
        lesion_load=float(np.clip(rng.lognormal(0.0, 0.5), 0.25, 4.0)),
        lesion_size=float(np.clip(rng.lognormal(0.0, 0.35), 0.5, 2.0)),
        confluent=float(rng.uniform(0.0, 0.5)),
        texture=_uniform(rng, [(0.01, 0.06)] * 3),
        texture_mm=float(rng.uniform(3.0, 10.0)),
        heterogeneity=float(rng.uniform(0.0, 0.4)),
        mimics={"rim": int(rng.integers(6, 31)), "tract": int(rng.random() < 0.6), "choroid": int(rng.integers(0, 7))},
        mimic_ratio={  # caps/rims and tracts: mild T2/FLAIR hyperintensity; choroid plexus: bright in the fluid
            "rim": _uniform(rng, [(0.88, 1.0), (1.05, 1.5), (1.05, 1.3)]),
            "tract": _uniform(rng, [(0.96, 1.04), (1.05, 1.3), (1.04, 1.2)]),
            "choroid": _uniform(rng, [(0.6, 1.0), (1.0, 3.0), (0.6, 1.5)]),
        },
        gain=_uniform(rng, [(0.5, 1.5)] * 3),
        blur_mm=tuple(float(rng.uniform(1.0, 5.0)) if rng.random() < 0.6 else 0.0 for _ in MODALITIES),
        blur_axis=tuple(int(rng.integers(3)) for _ in MODALITIES),
        bias=_uniform(rng, [(np.log(1.02), np.log(1.35))] * 3),
        noise=_uniform(rng, [(0.01, 0.07)] * 3),
        ghost=float(rng.uniform(0.02, 0.06)) if rng.random() < 0.4 else 0.0,
        ghost_axis=int(rng.integers(1, 3)),
        winsor=float(rng.uniform(99.0, 99.9)) if rng.random() < 0.5 else 100.0,
        strip_mm=float(rng.uniform(-1.0, 2.5)),
        strip_wobble_mm=float(rng.uniform(0.0, 3.0)),
    )


def _coarse_noise(rng: np.random.Generator, shape: Sequence[int], spacing: Sequence[float],
                  feature_mm: float) -> np.ndarray:
    """A random field ``shape`` (about zero mean, unit sd) with features of ``feature_mm``: Gaussian noise on a
    grid every ``feature_mm``, interpolated linearly (cheap on 1 mm grids, unlike a Gaussian filter)."""
    steps = [max(feature_mm / s, 1.0) for s in spacing]
    field = rng.standard_normal([int(n / f) + 2 for n, f in zip(shape, steps)]).astype(np.float32)
    for axis, (n, f) in enumerate(zip(shape, steps)):
        field = _linear_along(field, np.arange(n) / f + rng.uniform(0, 1), axis)
    return field / max(float(field.std()), 1e-6)


def _mimics(rng: np.random.Generator, cfg: Preset, axes_mm: Sequence[np.ndarray], atlas: Anatomy, warp: Warp,
            tissue: Mapping[str, np.ndarray], look: Appearance) -> tuple[np.ndarray, np.ndarray, list[Lesion]]:
    """Hyperintensities that are not lesions, rasterised like lesions but never labelled.

    ``rim``: thin caps and rims on the lateral ventricle walls (flat, parallel to the wall, mostly at the
    horns); ``tract``: a symmetric pair along the corticospinal tracts (posterior limb of the internal
    capsule); ``choroid``: choroid-plexus-like bright spots inside the ventricles. Returns the fraction
    ``(D, H, W)``, the owner index (-1: none) and the items.
    """
    offsets, weights = _profile(cfg)
    parenchyma = tissue["gm"] + tissue["wm"]
    regions = {"rim": parenchyma, "tract": parenchyma, "choroid": np.clip(tissue["brain"] - parenchyma, 0, 1)}
    fraction = np.zeros(parenchyma.shape, np.float32)
    owner = np.full(parenchyma.shape, -1, np.int32)
    to_subject = np.linalg.inv(warp.linear).T  # template directions -> subject directions
    items: list[Lesion] = []

    def add(kind: str, position: np.ndarray, direction: np.ndarray, radii: Sequence[float], border: float) -> None:
        direction = direction @ to_subject
        ratios = tuple(float(r * rng.normal(1.0, 0.02)) for r in look.mimic_ratio[kind])
        item = Lesion(kind, float(4 / 3 * np.pi * np.prod(radii)), warp.inverse(position[None])[0],
                      _frame(rng, direction / np.linalg.norm(direction)), np.asarray(radii, float), border, ratios)
        items.append(item)
        _rasterise(item, len(items) - 1, axes_mm, offsets, weights, regions[kind], fraction, owner)

    wall, normals = atlas.candidates["periventricular"], atlas.normals
    horns = np.flatnonzero((wall[:, 1] < np.quantile(wall[:, 1], 0.15)) | (wall[:, 1] > np.quantile(wall[:, 1], 0.85)))
    for _ in range(look.mimics["rim"]):
        pick = int(rng.choice(horns) if rng.random() < 0.6 else rng.integers(len(wall)))
        # Centre on the wall, shortest axis along its normal: a cap hugging the ventricle.
        position = wall[pick] - normals[pick] * rng.uniform(1.0, 3.0)
        add("rim", position, normals[pick], (rng.uniform(0.8, 2.5), *rng.uniform(3.0, 10.0, 2)), rng.uniform(0.8, 2.0))
    for _ in range(look.mimics["tract"]):
        centre = np.array([rng.uniform(20, 27), rng.uniform(-22, -14), rng.uniform(0, 12)])
        radii = (rng.uniform(10, 18), *rng.uniform(1.5, 3.0, 2))
        border = rng.uniform(1.0, 2.0)
        for side in (1.0, -1.0):
            add("tract", centre * np.array([side, 1, 1]), np.array([0.0, 0.2, 1.0]), radii, border)
    if len(atlas.ventricles):
        posterior = atlas.ventricles[atlas.ventricles[:, 1] <= np.quantile(atlas.ventricles[:, 1], 0.4)]
        for _ in range(look.mimics["choroid"]):
            position = posterior[rng.integers(len(posterior))] + rng.uniform(-1, 1, 3)
            add("choroid", position, rng.normal(size=3), rng.uniform(1.5, 4.0, 3), rng.uniform(0.5, 1.0))
    return fraction, owner, items


def _acquire_randomised(rng: np.random.Generator, axes_mm: Sequence[np.ndarray], spacing: Sequence[float],
                        tissue: Mapping[str, np.ndarray], lesion: np.ndarray, owner: np.ndarray,
                        lesions: Sequence[Lesion], mimic: np.ndarray, mimic_owner: np.ndarray,
                        mimics: Sequence[Lesion], look: Appearance) -> dict[str, np.ndarray]:
    """``_acquire`` with the subject's ``look``: its contrasts, tissue texture, lesion heterogeneity,
    non-lesion hyperintensities, thick-slice blur, bias field, Rician noise and FLAIR ghost. Float32."""
    shape = lesion.shape
    texture = _coarse_noise(rng, shape, spacing, look.texture_mm)
    grain = _coarse_noise(rng, shape, spacing, 2.0)
    lesion_ratios = np.array([(1.0, 1.0, 1.0)] + [item.ratios for item in lesions], np.float32)
    mimic_ratios = np.array([(1.0, 1.0, 1.0)] + [item.ratios for item in mimics], np.float32)
    images = {}
    for m, modality in enumerate(MODALITIES):
        clean = sum(tissue[t] * look.contrast[t][m] for t in CONTRAST) * (1 + look.texture[m] * texture)
        clean = clean * (1 - mimic) + mimic * mimic_ratios[mimic_owner + 1, m]
        excess = (lesion_ratios[owner + 1, m] - 1) * (1 + look.heterogeneity * grain)
        clean = (clean * (1 - lesion) + lesion * (1 + excess)) * (1000.0 * look.gain[m])
        if look.blur_mm[m] > 0:
            axis = look.blur_axis[m]
            clean = ndimage.gaussian_filter1d(clean, look.blur_mm[m] / 2.3548 / spacing[axis], axis=axis, truncate=3.0)
        bias = np.exp(look.bias[m] * _smooth_field(rng, axes_mm))
        sigma = look.noise[m] * 1000.0 * look.gain[m]
        real = clean * bias + rng.normal(0, sigma, shape).astype(np.float32)
        image = np.hypot(real, rng.normal(0, sigma, shape).astype(np.float32))
        if modality == "flair" and look.ghost > 0:
            image += look.ghost * np.roll(image, shape[look.ghost_axis] // 2, axis=look.ghost_axis)
        images[modality] = image.astype(np.float32)
    return images


def _strip(rng: np.random.Generator, distance: np.ndarray, spacing: Sequence[float], look: Appearance) -> np.ndarray:
    """An imperfect skull-stripping mask ``(D, H, W)`` bool: ``distance`` (mm to the brain surface) below the
    subject's offset, which wobbles along the surface (features of 15 mm)."""
    wobble = _coarse_noise(rng, distance.shape, spacing, 15.0) * look.strip_wobble_mm
    return distance < look.strip_mm + wobble


def _winsorise(image: np.ndarray, inside: np.ndarray, percentile: float) -> np.ndarray:
    """Clip ``image`` at ``percentile`` of its ``inside`` voxels, as intensity pipelines do (100: unchanged)."""
    if percentile >= 100 or not inside.any():
        return image
    return np.minimum(image, np.percentile(image[inside], percentile))


# ----------------------------------------------------------------------------------------------- cohort


COHORT_LAYOUTS: tuple[str, ...] = ("subject-folders", "nnunet")
NNUNET_CHANNELS: tuple[str, ...] = ("flair", "t1", "t2")  # channel order of the nnU-Net layout (_0000 = FLAIR)


def cohort_files(out: Path, ids: Sequence[str], layout: str) -> dict[str, dict[str, Path]]:
    """Subject id -> role -> the file a cohort in ``layout`` holds for it (images, lesion mask, brain mask).

    The nnU-Net raw layout has no place for brain masks: images are ``imagesTr/<id>_<channel>.nii.gz`` in
    ``NNUNET_CHANNELS`` order, lesion masks ``labelsTr/<id>.nii.gz``.
    """
    if layout == "nnunet":
        return {i: {**{m: out / "imagesTr" / f"{i}_{k:04d}.nii.gz" for k, m in enumerate(NNUNET_CHANNELS)},
                    "mask": out / "labelsTr" / f"{i}.nii.gz"} for i in ids}
    return {i: {name: out / i / f"{name}.nii.gz" for name in FILES} for i in ids}


def write_case(case: SyntheticCase, files: Mapping[str, Path]) -> None:
    """Write the roles in ``files`` (role -> path) in RAS: arrays ``(x, y, z)`` = model ``(W, H, D)``."""
    volumes = {**case.images, "mask": case.label, "brain_mask": case.brain_mask}
    for name, path in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        image = nib.Nifti1Image(np.ascontiguousarray(np.transpose(volumes[name], (2, 1, 0))), case.affine)
        image.header.set_xyzt_units("mm")
        image.header.set_qform(case.affine, code=1)
        image.header.set_sform(case.affine, code=1)
        save_atomically(path, lambda tmp, image=image: nib.save(image, tmp))


def subject_id(index: int) -> str:
    return f"sub-{index + 1:03d}"


def _written_by_cohort(out: Path, record: dict) -> list[Path]:
    """Every file a previous ``make_cohort`` call recorded in ``record`` wrote into ``out``."""
    layout = record.get("params", {}).get("layout", "subject-folders")
    files = [p for roles in cohort_files(out, list(record.get("stats", {})), layout).values() for p in roles.values()]
    return files + [out / MONTAGE_NAME, out / "cohort.json"] + ([out / "dataset.json"] if layout == "nnunet" else [])


def make_cohort(
    out: str | Path,
    *,
    subjects: int = 43,
    preset: str = "paper",
    seed: int = 0,
    anatomy: str = "auto",
    montage: bool = True,
    layout: str = "subject-folders",
    randomise: bool | None = None,
) -> Path:
    """Write a synthetic cohort, loadable by ``data.load_dataset(out)``.

    ``layout="subject-folders"`` writes ``<out>/<subject>/{t1,t2,flair,mask,brain_mask}.nii.gz``;
    ``layout="nnunet"`` an nnU-Net v2 raw dataset (``imagesTr``, ``labelsTr``, ``dataset.json``; no brain
    masks). Also ``<out>/cohort.json`` (parameters and per-subject statistics, written last) and, with
    ``montage``, ``<out>/montage.png``. A complete cohort with the same parameters is not regenerated. A
    cohort with other parameters in ``out`` is replaced: only the files it recorded are deleted. Any other
    non-empty ``out`` is refused.

    Args:
        out: output folder.
        subjects: number of subjects (the paper has 43).
        preset: ``"paper"``, ``"demo"``, ``"small"`` or ``"mni"`` (see ``COHORT_PRESETS``).
        seed: random seed; same seed, same cohort.
        anatomy: ``"auto"``, ``"mni152"`` or ``"phantom"``.
        montage: also write the PNG montage of the first subject.
        layout: ``"subject-folders"`` or ``"nnunet"``.
        randomise: draw each subject's appearance at random (``Appearance``); None: the preset's choice
            (``demo`` and ``mni``: yes). Recorded in ``cohort.json``.

    Returns:
        ``out`` as a Path.

    Raises:
        DataError: ``out`` (or a folder above it) is a file, or ``out`` is not empty and holds no cohort
            written by this function.
    """
    if isinstance(subjects, bool) or not isinstance(subjects, (int, np.integer)) or subjects < 1:
        raise ValueError(f"subjects must be a positive int, got {subjects!r}")
    if preset not in COHORT_PRESETS:
        raise ValueError(f"preset must be one of {sorted(COHORT_PRESETS)}, got {preset!r}")
    if layout not in COHORT_LAYOUTS:
        raise ValueError(f"layout must be one of {COHORT_LAYOUTS}, got {layout!r}")
    if randomise is not None and not isinstance(randomise, bool):
        raise TypeError(f"randomise must be a bool or None, got {randomise!r}")
    out = Path(out)
    existing = next((p for p in (out, *out.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise DataError(f"{existing} is a file, not a folder; choose a folder for the cohort")
    randomise = COHORT_PRESETS[preset].randomise if randomise is None else randomise
    params = {"version": GENERATOR_VERSION, "preset": preset, "seed": int(seed),
              "anatomy": resolve_anatomy(anatomy), "subjects": subjects, "layout": layout, "randomise": randomise}
    record = out / "cohort.json"
    ids = [subject_id(i) for i in range(subjects)]
    files = cohort_files(out, ids, layout)
    previous = _read_record(record)
    if previous is None and out.is_dir() and any(out.iterdir()):
        raise DataError(f"{out} is not empty and holds no cohort.json written by make_cohort; refusing to write "
                        "into it (choose a new or empty folder)")
    complete = all(p.is_file() for roles in files.values() for p in roles.values())
    if previous is not None and previous.get("params") == params and complete:
        if montage and not (out / MONTAGE_NAME).is_file():
            _montage_of(files[ids[0]], out / MONTAGE_NAME)
        return out
    if previous is not None:
        _remove_cohort(out, previous)
    out.mkdir(parents=True, exist_ok=True)
    stats = {}
    for index, sid in enumerate(ids):
        start = time.perf_counter()
        case = generate_case(index, preset=preset, seed=seed, anatomy=params["anatomy"], randomise=randomise)
        write_case(case, files[sid])
        stats[sid] = case_stats(case) | {"seconds": round(time.perf_counter() - start, 2)}
    if layout == "nnunet":
        dataset = json.dumps({
            "name": f"synthetic MS cohort ({preset}, seed {seed})",
            "channel_names": {str(k): m.upper() for k, m in enumerate(NNUNET_CHANNELS)},
            "labels": {"background": 0, "lesion": 1}, "numTraining": subjects, "file_ending": ".nii.gz",
        }, indent=1)
        save_atomically(out / "dataset.json", lambda tmp: tmp.write_text(dataset))
    if montage:
        _montage_of(files[ids[0]], out / MONTAGE_NAME)
    text = json.dumps({"params": params, "preset": asdict(COHORT_PRESETS[preset]), "stats": stats}, indent=1)
    save_atomically(record, lambda tmp: tmp.write_text(text))
    return out


def _remove_cohort(out: Path, record: dict) -> None:
    """Delete the files a recorded cohort wrote in ``out`` (and the folders that empties), nothing else."""
    for path in _written_by_cohort(out, record):
        path.unlink(missing_ok=True)
    for folder in sorted({p.parent for p in _written_by_cohort(out, record)} - {out}):
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


def _read_record(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def case_stats(case: SyntheticCase) -> dict:
    """Shape, spacing, lesion fraction and counts of a generated case; with a randomised appearance, the
    visible non-lesion hyperintensities per kind and the appearance itself."""
    visible = [item for item in case.lesions if item.voxels > 0]
    randomised = {} if case.appearance is None else {
        "mimics_visible": {k: sum(item.category == k and item.voxels > 0 for item in case.mimics) for k in MIMICS},
        "appearance": asdict(case.appearance),
    }
    return {
        "shape": list(case.label.shape),
        "spacing": list(case.spacing),
        "lesion_fraction": float(case.label.mean()),
        "lesion_volume_ml": float(case.label.sum() * np.prod(case.spacing) / 1000),
        "lesions_drawn": len(case.lesions),
        "lesions_visible": len(visible),
        "visible_by_category": {c: sum(item.category == c for item in visible) for c in CATEGORIES},
    } | randomised


def _montage_of(files: Mapping[str, Path], path: Path) -> None:
    paths = CasePaths(files["flair"].parent.name, {m: files[m] for m in ("t1", "t2", "flair")}, files["mask"],
                      files.get("brain_mask"))
    save_montage(load_case(paths, normalisation="brain-mask" if paths.brain_mask else "foreground"), path)
