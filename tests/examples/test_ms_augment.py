"""Training-time augmentation of one crop (examples/ms_lesion/augment.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("batchgeneratorsv2", reason="augmentation needs batchgeneratorsv2 (the examples extra)")

from mslesion.data.augment import AUGMENTATIONS, Augmentation, BiasFieldTransform, augment, augmentation, margin  # noqa: E402
from mslesion.data.reading import IGNORE_LABEL  # noqa: E402

CROP = (12, 16, 16)
#: rotation, scaling and elastic deformation on every crop, nothing else
SPATIAL = Augmentation(p_rotation=1.0, rotation_degrees=30.0, p_scaling=1.0, scaling=(0.7, 1.4))
#: the largest zoom-out, the largest rotations and elastic deformation on every crop
WORST = Augmentation(p_rotation=1.0, rotation_degrees=30.0, p_scaling=1.0, scaling=(1.4, 1.4), p_elastic=1.0,
                     elastic_voxels=4.0)


def enlarged(crop: tuple[int, int, int], strength: str | Augmentation) -> tuple[int, int, int]:
    return tuple(c + 2 * m for c, m in zip(crop, margin(strength, crop)))  # type: ignore[return-value]


def centre(array: np.ndarray, crop: tuple[int, int, int]) -> np.ndarray:
    """The centre ``crop`` of the last three axes."""
    start = [(n - c) // 2 for n, c in zip(array.shape[-3:], crop)]
    return array[(..., *(slice(b, b + c) for b, c in zip(start, crop)))]


def random_crop(shape: tuple[int, int, int], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A 3-channel z-scored-like image and a 0/1/ignore label of spatial ``shape``."""
    rng = np.random.default_rng(seed)
    label = (rng.random(shape) < 0.2).astype(np.uint8)
    label[rng.random(shape) < 0.05] = IGNORE_LABEL
    return rng.standard_normal((3, *shape), dtype=np.float32), label


def ball_crop(shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """A label with an off-centre ball and a slab (shapes a mirror or rotation moves), the image 10 x label."""
    grid = np.indices(shape, dtype=np.float32)
    middle = np.array(shape, np.float32)[:, None, None, None] / 2
    ball = ((grid - middle - np.array([1, 3, -2])[:, None, None, None]) ** 2).sum(0) < (min(shape) / 4) ** 2
    label = (ball | (grid[2] < shape[2] / 2 - 6)).astype(np.uint8)
    return np.repeat(10 * label[None].astype(np.float32), 2, axis=0), label


@pytest.mark.parametrize("strength", AUGMENTATIONS)
def test_shapes_dtypes_and_label_values(strength: str) -> None:
    image, label = random_crop(enlarged(CROP, strength))
    before = image.copy(), label.copy()
    out_image, out_label = augment(image, label, np.random.default_rng(1), strength, CROP)
    assert out_image.shape == (3, *CROP) and out_image.dtype == np.float32 and out_image.flags.c_contiguous
    assert out_label.shape == CROP and out_label.dtype == np.uint8
    assert set(np.unique(out_label)) <= {0, 1, IGNORE_LABEL}
    np.testing.assert_array_equal(image, before[0])  # the inputs are left alone
    np.testing.assert_array_equal(label, before[1])


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), strength=st.sampled_from(["default", "heavy"]))
def test_label_stays_binary_with_ignore(seed: int, strength: str) -> None:
    image, label = random_crop(enlarged(CROP, strength), seed % 1000)
    _, out_label = augment(image, label, np.random.default_rng(seed), strength, CROP)
    assert set(np.unique(out_label)) <= {0, 1, IGNORE_LABEL}


def test_none_returns_the_same_arrays_and_draws_nothing() -> None:
    image, label = random_crop(CROP)
    rng = np.random.default_rng(3)
    state = rng.bit_generator.state
    out_image, out_label = augment(image, label, rng, "none", CROP)
    assert out_image is image and out_label is label
    assert rng.bit_generator.state == state
    assert augmentation("none").is_identity and margin("none", CROP) == (0, 0, 0)


@pytest.mark.parametrize("seed", range(4))
def test_spatial_transform_moves_image_and_label_alike(seed: int) -> None:
    image, label = ball_crop(enlarged(CROP, SPATIAL))
    out_image, out_label = augment(image, label, np.random.default_rng(seed), SPATIAL, CROP)
    assert not np.array_equal(out_label, centre(label, CROP))  # the transform did something
    for channel in out_image:
        agree = np.mean((channel > 5) == (out_label == 1))
        assert agree > 0.95, f"thresholded image and label agree on {agree:.1%} of the voxels"


def test_mirroring_is_exact_on_image_and_label() -> None:
    image, label = ball_crop(CROP)  # no mirror symmetry: each set of flipped axes gives another label
    mirror = Augmentation(mirror_axes=(0, 1, 2))
    combos = [(), (0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2)]
    flipped: set[int] = set()
    for seed in range(8):
        out_image, out_label = augment(image, label, np.random.default_rng(seed), mirror, CROP)
        matches = [axes for axes in combos if np.array_equal(out_label, np.flip(label, axes))]
        assert len(matches) == 1
        np.testing.assert_array_equal(out_image, np.flip(image, tuple(a + 1 for a in matches[0])))
        flipped.update(matches[0])
    assert flipped == {0, 1, 2}


@pytest.mark.parametrize("strength", ["light", "default", "heavy", SPATIAL])
def test_deterministic_given_the_generator(strength: str | Augmentation) -> None:
    image, label = random_crop(enlarged(CROP, strength))
    first = augment(image, label, np.random.default_rng(7), strength, CROP)
    again = augment(image, label, np.random.default_rng(7), strength, CROP)
    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_array_equal(first[1], again[1])
    others = [augment(image, label, np.random.default_rng(seed), strength, CROP)[0] for seed in range(8, 12)]
    assert any(not np.array_equal(first[0], other) for other in others)


def test_global_generators_are_left_alone() -> None:
    np.random.seed(5)
    torch.manual_seed(5)
    numpy_state, torch_state = np.random.get_state()[1].copy(), torch.get_rng_state()
    image, label = random_crop(enlarged(CROP, "heavy"))
    augment(image, label, np.random.default_rng(0), "heavy", CROP)
    np.testing.assert_array_equal(np.random.get_state()[1], numpy_state)
    assert torch.equal(torch.get_rng_state(), torch_state)


@pytest.mark.parametrize("seed", range(5))
def test_margin_leaves_no_padding_in_the_worst_case(seed: int) -> None:
    # a constant enlarged crop: any voxel read from beyond it would come back as image 0 / label 0
    shape = enlarged(CROP, WORST)
    image, label = np.ones((1, *shape), np.float32), np.ones(shape, np.uint8)
    out_image, out_label = augment(image, label, np.random.default_rng(seed), WORST, CROP)
    assert out_label.min() == 1
    np.testing.assert_allclose(out_image, 1.0, atol=1e-5)


def test_margin_grows_with_the_transforms_and_cuts_back_to_the_crop() -> None:
    assert margin("light", CROP) == (0, 0, 0)
    # zoom-out 1.4 only: the half-extents (5.5, 7.5, 7.5) grow to (7.7, 10.5, 10.5), plus one voxel to interpolate
    assert margin(Augmentation(p_scaling=1.0, scaling=(0.7, 1.4)), CROP) == (4, 4, 4)
    rotate = Augmentation(p_rotation=1.0, rotation_degrees=30.0)
    assert all(0 < r < s < w for r, s, w in zip(margin(rotate, CROP), margin(SPATIAL, CROP), margin(WORST, CROP)))
    assert margin("default", (64, 64, 64)) > margin("default", CROP)
    # an augmentation that happens to leave the crop alone returns its centre: the margin is cut off evenly
    unchanged = Augmentation(p_rotation=0.0, p_scaling=1.0, scaling=(1.0, 1.0), p_elastic=1.0, elastic_voxels=0.0)
    assert margin(unchanged, CROP) == (0, 0, 0)
    zoom = Augmentation(p_scaling=1.0, scaling=(1.0, 1.0 + 1e-9))
    shape = enlarged(CROP, zoom)
    image, label = random_crop(shape)
    out_image, out_label = augment(image, label, np.random.default_rng(0), zoom, CROP)
    np.testing.assert_array_equal(out_label, centre(label, CROP))
    np.testing.assert_allclose(out_image, centre(image, CROP), atol=1e-4)


def test_bias_field_keeps_the_background_and_changes_the_rest() -> None:
    image = torch.full((2, 8, 8, 8), -1.0)
    image[:, 2:6, 2:6, 2:6] = 2.0
    torch.manual_seed(0)
    out = BiasFieldTransform(0.5)(image=image.clone())["image"]
    assert torch.equal(out[image == -1.0], image[image == -1.0])
    assert not torch.allclose(out, image)


@pytest.mark.parametrize(
    ("call", "error", "fragment"),
    [
        (lambda image, label, rng: augment(image, label, rng, "strong", CROP), ValueError, "augmentation must be one"),
        (lambda image, label, rng: augment(image.astype(np.float64), label, rng, "light", CROP), ValueError,
         "image must be a float32 array"),
        (lambda image, label, rng: augment(image, label[1:], rng, "light", CROP), ValueError,
         "label must be an integer array"),
        (lambda image, label, rng: augment(image, label.astype(np.float32), rng, "light", CROP), ValueError,
         "label must be an integer array"),
        (lambda image, label, rng: augment(image, label, 0, "light", CROP), TypeError,
         "rng must be a numpy.random.Generator"),
        (lambda image, label, rng: augment(image, label, rng, "default", CROP), ValueError,
         "plus the margin"),
        (lambda image, label, rng: augment(image, label, rng, "light", (12, 16)), ValueError,
         "crop must be three positive ints"),
        (lambda image, label, rng: margin("light", (12, 0, 16)), ValueError, "crop must be three positive ints"),
    ],
)
def test_bad_arguments(call, error: type[Exception], fragment: str) -> None:
    image, label = random_crop(CROP)
    with pytest.raises(error, match=fragment):
        call(image, label, np.random.default_rng(0))


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"p_noise": 1.5}, "p_noise must be a probability"),
        ({"mirror_axes": (0, 3)}, "mirror_axes must be distinct axes"),
        ({"mirror_axes": (1, 1)}, "mirror_axes must be distinct axes"),
        ({"rotation_degrees": 120.0}, "rotation_degrees must be in"),
        ({"scaling": (1.2, 0.8)}, "scaling must be a range"),
        ({"gamma": (0.0, 1.5)}, "gamma must be a range"),
        ({"low_resolution": (0.5, 2.0)}, "low_resolution must lie in"),
        ({"elastic_voxels": -1.0}, "elastic_voxels must be >="),
    ],
)
def test_augmentation_validates_its_fields(options: dict, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        Augmentation(**options)
