"""Training-time augmentation of one crop, with nnU-Net's batchgeneratorsv2.

A strength is recorded with a run as a plain name (``AUGMENTATIONS``); ``augmentation(name)`` gives its
frozen description (``Augmentation``), which a caller may also build by hand. The pipeline is nnU-Net's
default trainer's (``nnUNetTrainer.get_training_transforms``): rotation and scaling, Gaussian noise,
Gaussian blur, brightness, contrast, simulated low resolution, gamma, mirroring; plus elastic deformation
and a smooth multiplicative bias field, which nnU-Net leaves out.

Rotation and scaling read voxels from outside the crop. So that they never invent a padded border, the
sampler cuts a larger crop, ``crop + 2 * margin(strength, crop)`` per axis, centred where the crop would be,
and ``augment`` resamples it back to ``crop`` (the image linearly, the label by nearest neighbour, with the
same grid). Strengths without resampling have margin 0.

``augment`` is deterministic given its ``np.random.Generator``: batchgeneratorsv2 draws from NumPy's and
torch's global generators, so they are seeded from ``rng`` for the call and restored afterwards (not
thread-safe: run it in one thread per process, as ``DataLoader`` workers do). ``"none"`` draws nothing
from ``rng`` and returns its arguments, so a run without augmentation sees exactly the crops it saw
before augmentation existed.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform, ImageOnlyTransform
from batchgeneratorsv2.transforms.intensity.brightness import MultiplicativeBrightnessTransform
from batchgeneratorsv2.transforms.intensity.contrast import BGContrast, ContrastTransform
from batchgeneratorsv2.transforms.intensity.gamma import GammaTransform
from batchgeneratorsv2.transforms.intensity.gaussian_noise import GaussianNoiseTransform
from batchgeneratorsv2.transforms.noise.gaussian_blur import GaussianBlurTransform
from batchgeneratorsv2.transforms.spatial.low_resolution import SimulateLowResolutionTransform
from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from batchgeneratorsv2.transforms.utils.random import RandomTransform

AUGMENTATIONS: tuple[str, ...] = ("none", "light", "default", "heavy")


@dataclass(frozen=True)
class Augmentation:
    """What to do to a training crop: each transform's probability and range.

    Probabilities are per crop. Ranges are ``(low, high)``, sampled uniformly unless said otherwise. The
    defaults do nothing (``is_identity``).

    Attributes:
        mirror_axes: spatial axes (0 = D, 1 = H, 2 = W) each flipped with probability 0.5.
        p_rotation: probability of a rotation; its three angles are uniform in
            ``[-rotation_degrees, rotation_degrees]``, one about each axis.
        rotation_degrees: the largest rotation angle about each axis, in degrees, in [0, 90].
        p_scaling: probability of an isotropic scaling by a factor in ``scaling``; a factor above 1
            samples a larger region (objects shrink).
        scaling: range of the scaling factor, positive.
        p_elastic: probability of a smooth elastic deformation.
        elastic_voxels: the largest elastic displacement, in voxels.
        p_noise: probability of additive Gaussian noise with variance in ``noise_variance``.
        noise_variance: range of the noise variance (the image is z-scored).
        p_blur: probability of a Gaussian blur (each channel with probability 0.5) of sigma in ``blur_sigma``.
        blur_sigma: range of the blur sigma, in voxels.
        p_brightness: probability of multiplying each channel by a factor in ``brightness``.
        brightness: range of the brightness factor (half of the draws below 1, half above).
        p_contrast: probability of scaling each channel about its mean by a factor in ``contrast``.
        contrast: range of the contrast factor (half of the draws below 1, half above).
        p_low_resolution: probability of simulating a lower resolution (downsample by a factor in
            ``low_resolution``, then upsample), each channel with probability 0.5.
        low_resolution: range of the resolution factor, in (0, 1].
        p_gamma: probability of a gamma transform of each channel (mapped to [0, 1] and back, mean and
            standard deviation kept), gamma in ``gamma``.
        p_gamma_inverted: probability of the same on the inverted image (it changes the bright end).
        gamma: range of gamma (half of the draws below 1, half above).
        p_bias_field: probability of a smooth multiplicative field ``exp(f)`` per channel, ``f`` a
            trilinearly upsampled 4 x 4 x 4 grid of normal draws with standard deviation up to
            ``bias_field``, applied to the intensity above the crop's minimum (the background of a
            skull-stripped z-scored scan stays where it is).
        bias_field: the largest standard deviation of the log-field.
    """

    mirror_axes: tuple[int, ...] = ()
    p_rotation: float = 0.0
    rotation_degrees: float = 0.0
    p_scaling: float = 0.0
    scaling: tuple[float, float] = (1.0, 1.0)
    p_elastic: float = 0.0
    elastic_voxels: float = 0.0
    p_noise: float = 0.0
    noise_variance: tuple[float, float] = (0.0, 0.1)
    p_blur: float = 0.0
    blur_sigma: tuple[float, float] = (0.5, 1.0)
    p_brightness: float = 0.0
    brightness: tuple[float, float] = (0.75, 1.25)
    p_contrast: float = 0.0
    contrast: tuple[float, float] = (0.75, 1.25)
    p_low_resolution: float = 0.0
    low_resolution: tuple[float, float] = (0.5, 1.0)
    p_gamma: float = 0.0
    p_gamma_inverted: float = 0.0
    gamma: tuple[float, float] = (0.7, 1.5)
    p_bias_field: float = 0.0
    bias_field: float = 0.3

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if name.startswith("p_") and not 0.0 <= value <= 1.0:
                raise ValueError(f"Augmentation.{name} must be a probability in [0, 1], got {value!r}")
        axes = tuple(self.mirror_axes)
        if len(set(axes)) != len(axes) or not set(axes) <= {0, 1, 2}:
            raise ValueError(f"Augmentation.mirror_axes must be distinct axes among 0, 1, 2, got {self.mirror_axes!r}")
        if not 0.0 <= self.rotation_degrees <= 90.0:
            raise ValueError(f"Augmentation.rotation_degrees must be in [0, 90], got {self.rotation_degrees!r}")
        for name, bound in (("elastic_voxels", 0.0), ("bias_field", 0.0)):
            if not getattr(self, name) >= bound:
                raise ValueError(f"Augmentation.{name} must be >= {bound}, got {getattr(self, name)!r}")
        positive = ("scaling", "blur_sigma", "brightness", "contrast", "low_resolution", "gamma")
        for name in (*positive, "noise_variance"):
            low, high = getattr(self, name)
            if not (0.0 < low if name in positive else 0.0 <= low) or not low <= high:
                lowest = "0 <" if name in positive else "0 <="
                raise ValueError(f"Augmentation.{name} must be a range (low, high) with {lowest} low <= high, "
                                 f"got {getattr(self, name)!r}")
        if self.low_resolution[1] > 1.0:
            raise ValueError(f"Augmentation.low_resolution must lie in (0, 1], got {self.low_resolution!r}")

    @property
    def resamples(self) -> bool:
        """Whether a spatial transform (rotation, scaling, elastic) may resample the crop."""
        return (self.p_rotation > 0 and self.rotation_degrees > 0) or (
            self.p_scaling > 0 and self.scaling != (1.0, 1.0)) or (self.p_elastic > 0 and self.elastic_voxels > 0)

    @property
    def is_identity(self) -> bool:
        """Whether every crop comes back unchanged."""
        return not self.resamples and not self.mirror_axes and not any(
            value > 0 for name, value in vars(self).items()
            if name.startswith("p_") and name not in ("p_rotation", "p_scaling", "p_elastic"))


_NNUNET = {"mirror_axes": (0, 1, 2), "p_rotation": 0.2, "rotation_degrees": 30.0, "p_scaling": 0.2,
           "scaling": (0.7, 1.4), "p_noise": 0.1, "p_blur": 0.2, "p_brightness": 0.15, "p_contrast": 0.15,
           "p_low_resolution": 0.25, "p_gamma": 0.3, "p_gamma_inverted": 0.1}
#: the strength of each name in ``AUGMENTATIONS``
STRENGTHS: dict[str, Augmentation] = {
    # the paper's protocol: random crops only
    "none": Augmentation(),
    # no resampling (margin 0): mirroring and intensity only
    "light": Augmentation(mirror_axes=(0, 1, 2), p_noise=0.1, p_brightness=0.15, p_contrast=0.15, p_gamma=0.3),
    # nnU-Net's default trainer, plus a bias field
    "default": Augmentation(**_NNUNET, p_bias_field=0.1, bias_field=0.3),
    # nnU-Net's transforms about twice as often, wider intensity ranges, elastic deformation, stronger bias
    "heavy": Augmentation(**{**_NNUNET, "p_rotation": 0.4, "p_scaling": 0.4, "p_noise": 0.2, "p_blur": 0.3,
                             "p_brightness": 0.3, "p_contrast": 0.3, "p_low_resolution": 0.3, "p_gamma": 0.4,
                             "p_gamma_inverted": 0.15},
                          brightness=(0.65, 1.5), contrast=(0.65, 1.5), p_elastic=0.2, elastic_voxels=4.0,
                          p_bias_field=0.3, bias_field=0.5),
}


def augmentation(strength: str | Augmentation) -> Augmentation:
    """The description of a strength: one of ``AUGMENTATIONS``, or an ``Augmentation`` itself."""
    if isinstance(strength, Augmentation):
        return strength
    if strength not in STRENGTHS:
        raise ValueError(f"augmentation must be one of {AUGMENTATIONS} or an Augmentation, got {strength!r}")
    return STRENGTHS[strength]


def _crop_size(crop: Sequence[int]) -> tuple[int, int, int]:
    size = tuple(int(s) for s in crop)
    if len(size) != 3 or min(size) < 1 or any(s != c for s, c in zip(size, crop)):
        raise ValueError(f"crop must be three positive ints (d, h, w), got {crop!r}")
    return size  # type: ignore[return-value]


def margin(strength: str | Augmentation, crop: Sequence[int]) -> tuple[int, int, int]:
    """Voxels to add on each side of a crop so that ``augment`` never reads outside what it is given.

    The bound is the worst case over the rotation angles, the largest scaling factor and the elastic
    displacement, plus one voxel for the interpolation; 0 for strengths that do not resample.

    Args:
        strength: one of ``AUGMENTATIONS`` or an ``Augmentation``.
        crop: the crop size ``(d, h, w)`` that training uses.

    Returns:
        ``(md, mh, mw)``: the sampler cuts ``(d + 2 md, h + 2 mh, w + 2 mw)`` around the same centre.
    """
    return _margin(augmentation(strength), _crop_size(crop))


@lru_cache(maxsize=64)
def _margin(aug: Augmentation, crop: tuple[int, int, int]) -> tuple[int, int, int]:
    if not aug.resamples:
        return (0, 0, 0)
    # grid offsets of the crop's corners from its centre, displaced by the elastic field (and its mean,
    # which batchgeneratorsv2 subtracts), then rotated and scaled: A = Rz Ry Rx S, as batchgeneratorsv2
    half = (np.asarray(crop, float) - 1) / 2 + (2 * aug.elastic_voxels if aug.p_elastic > 0 else 0.0)
    largest = max(aug.scaling[1], 1.0) if aug.p_scaling > 0 else 1.0
    theta = math.radians(aug.rotation_degrees) if aug.p_rotation > 0 else 0.0
    extent = half * largest
    for angles in itertools.product(np.linspace(-theta, theta, 13), repeat=3):
        extent = np.maximum(extent, np.abs(_rotation(*angles)) @ half * largest)
    return tuple(int(math.ceil(e - h)) + 1 for e, h in zip(extent, (np.asarray(crop) - 1) / 2))  # type: ignore


def _rotation(ax: float, ay: float, az: float) -> np.ndarray:
    cx, sx, cy, sy, cz, sz = math.cos(ax), math.sin(ax), math.cos(ay), math.sin(ay), math.cos(az), math.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


class BiasFieldTransform(ImageOnlyTransform):
    """A smooth multiplicative field per channel, applied above the channel's minimum (see ``Augmentation``)."""

    def __init__(self, strength: float, grid: int = 4) -> None:
        super().__init__()
        self.strength = strength
        self.grid = grid

    def get_parameters(self, **data_dict: torch.Tensor) -> dict:
        channels = data_dict["image"].shape[0]
        sigma = torch.rand(channels, 1, 1, 1) * self.strength
        return {"coarse": torch.randn(channels, self.grid, self.grid, self.grid) * sigma}

    def _apply_to_image(self, img: torch.Tensor, **params: torch.Tensor) -> torch.Tensor:
        field = torch.nn.functional.interpolate(params["coarse"][None], size=img.shape[1:], mode="trilinear",
                                                align_corners=True)[0].exp_()
        low = img.amin(dim=(1, 2, 3), keepdim=True)
        return (img - low).mul_(field).add_(low)


def _maybe(transform: BasicTransform, probability: float) -> list[BasicTransform]:
    return [RandomTransform(transform, probability)] if probability > 0 else []


@lru_cache(maxsize=16)
def _pipelines(aug: Augmentation, crop: tuple[int, int, int]) -> tuple[BasicTransform | None, ComposeTransforms]:
    """The spatial transform (None without resampling) and the rest, in nnU-Net's order."""
    spatial = None
    if aug.resamples:
        radians = math.radians(aug.rotation_degrees)
        spatial = SpatialTransform(
            crop, patch_center_dist_from_border=0, random_crop=False, p_rotation=aug.p_rotation,
            rotation=(-radians, radians), p_scaling=aug.p_scaling, scaling=aug.scaling,
            p_synchronize_scaling_across_axes=1, p_elastic_deform=aug.p_elastic,
            elastic_deform_scale=(0.1, 0.2), elastic_deform_magnitude=(0.0, aug.elastic_voxels),
            mode_seg="nearest", border_mode_seg="constant", padding_value_seg=0)
    rest: list[BasicTransform] = [
        *_maybe(GaussianNoiseTransform(noise_variance=aug.noise_variance, p_per_channel=1.0,
                                       synchronize_channels=True), aug.p_noise),
        *_maybe(GaussianBlurTransform(blur_sigma=aug.blur_sigma, synchronize_channels=False, synchronize_axes=False,
                                      p_per_channel=0.5), aug.p_blur),
        *_maybe(MultiplicativeBrightnessTransform(multiplier_range=BGContrast(aug.brightness),
                                                  synchronize_channels=False, p_per_channel=1.0), aug.p_brightness),
        *_maybe(ContrastTransform(contrast_range=BGContrast(aug.contrast), preserve_range=True,
                                  synchronize_channels=False, p_per_channel=1.0), aug.p_contrast),
        *_maybe(SimulateLowResolutionTransform(scale=aug.low_resolution, synchronize_channels=False,
                                               synchronize_axes=True, ignore_axes=None, allowed_channels=None,
                                               p_per_channel=0.5), aug.p_low_resolution),
        *_maybe(GammaTransform(gamma=BGContrast(aug.gamma), p_invert_image=1.0, synchronize_channels=False,
                               p_per_channel=1.0, p_retain_stats=1.0), aug.p_gamma_inverted),
        *_maybe(GammaTransform(gamma=BGContrast(aug.gamma), p_invert_image=0.0, synchronize_channels=False,
                               p_per_channel=1.0, p_retain_stats=1.0), aug.p_gamma),
        *_maybe(BiasFieldTransform(aug.bias_field), aug.p_bias_field if aug.bias_field > 0 else 0.0),
    ]
    if aug.mirror_axes:
        rest.append(MirrorTransform(tuple(aug.mirror_axes)))
    return spatial, ComposeTransforms(rest)


@contextmanager
def _seeded(rng: np.random.Generator) -> Iterator[None]:
    """NumPy's and torch's global generators seeded from ``rng`` inside, restored on exit."""
    numpy_seed, torch_seed = (int(s) for s in rng.integers(0, 2**32, size=2))
    state = np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            np.random.seed(numpy_seed)
            torch.manual_seed(torch_seed)
            yield
    finally:
        np.random.set_state(state)


def augment(
    image: np.ndarray,
    label: np.ndarray,
    rng: np.random.Generator,
    strength: str | Augmentation,
    crop: Sequence[int],
) -> tuple[np.ndarray, np.ndarray]:
    """One training crop, augmented, cut from a crop enlarged by ``margin(strength, crop)``.

    Image and label go through the same spatial transforms (the label by nearest neighbour, so its values
    stay those of the input, e.g. 0, 1 and ``IGNORE_LABEL``; voxels from beyond the given array would be 0,
    which the margin prevents). Intensity transforms touch the image only.

    Args:
        image: ``(C, d + 2 md, h + 2 mh, w + 2 mw)`` float32, z-scored.
        label: ``(d + 2 md, h + 2 mh, w + 2 mw)`` integer labels.
        rng: the source of randomness; the result depends only on its state. Not used for ``"none"``.
        strength: one of ``AUGMENTATIONS`` or an ``Augmentation``.
        crop: the output size ``(d, h, w)``.

    Returns:
        image ``(C, d, h, w)`` float32 and label ``(d, h, w)`` of ``label``'s dtype; for an identity strength
        (``"none"``) the very arrays given. The inputs are never modified.
    """
    aug = augmentation(strength)
    size = _crop_size(crop)
    if not isinstance(image, np.ndarray) or image.ndim != 4 or image.dtype != np.float32:
        raise ValueError(f"image must be a float32 array (C, D, H, W), got {_describe(image)}")
    if not isinstance(label, np.ndarray) or label.shape != image.shape[1:] or not np.issubdtype(label.dtype,
                                                                                                  np.integer):
        raise ValueError(f"label must be an integer array of the image's spatial shape {image.shape[1:]}, "
                         f"got {_describe(label)}")
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    pad = _margin(aug, size)
    expected = tuple(s + 2 * m for s, m in zip(size, pad))
    if image.shape[1:] != expected:
        raise ValueError(f"image and label must be the crop {size} plus the margin {pad} on each side, i.e. "
                         f"{expected}, got {image.shape[1:]}; cut them with margin(strength, crop)")
    if aug.is_identity:
        return image, label
    spatial, rest = _pipelines(aug, size)
    source = torch.from_numpy(image)
    data = {"image": source, "segmentation": torch.from_numpy(label.astype(np.int16, copy=False))[None]}
    with _seeded(rng):
        if spatial is not None:
            data = spatial(**data)
        if data["image"].untyped_storage().data_ptr() == source.untyped_storage().data_ptr():
            data["image"] = data["image"].clone()  # the intensity transforms work in place
        data = rest(**data)
    return (np.ascontiguousarray(data["image"].numpy(), dtype=np.float32),
            np.ascontiguousarray(data["segmentation"][0].numpy()).astype(label.dtype, copy=False))


def _describe(array: object) -> str:
    if isinstance(array, np.ndarray):
        return f"{array.dtype} array of shape {array.shape}"
    return type(array).__name__
