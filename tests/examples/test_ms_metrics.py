"""Metrics against hand-computed values, the empty-reference rule, sliding-window inference."""

import math

import numpy as np
import pytest
import torch

from mslesion.inference.sliding_window import gaussian_weight, segment, sliding_window_probabilities, tile_starts
from mslesion.evaluation.metrics import case_counts, case_scores, scores, summarise


def _volume() -> tuple[np.ndarray, np.ndarray]:
    """Reference: lesion A (4 voxels) and lesion B (1 voxel, diagonal to nothing).
    Prediction: 2 voxels of A, one false-positive component of 2 voxels."""
    reference = np.zeros((4, 6, 6), np.uint8)
    reference[1, 1, 1:5] = 1  # lesion A
    reference[3, 5, 5] = 1  # lesion B
    prediction = np.zeros_like(reference)
    prediction[1, 1, 1:3] = 1  # hits A
    prediction[3, 0, 0:2] = 1  # false positive component
    return prediction, reference


def test_dice_iou_and_lesion_scores_by_hand() -> None:
    prediction, reference = _volume()
    s = case_scores(prediction, reference, spacing=(2.0, 1.0, 1.0))
    # tp = 2, fp = 2, fn = 3
    assert s["dice"] == pytest.approx(4 / 9)
    assert s["iou"] == pytest.approx(2 / 7)
    assert s["lesion_tpr"] == pytest.approx(1 / 2)  # A detected, B missed
    assert s["lesion_precision"] == pytest.approx(1 / 2)  # one of two predicted components is real
    assert s["lesion_f1"] == pytest.approx(1 / 2)
    assert s["avd_ml"] == pytest.approx(abs(4 - 5) * 2.0 / 1000)
    assert s["avd_percent"] == pytest.approx(20.0)
    assert s["volume_ratio"] == pytest.approx(4 / 5)  # predicted / reference volume: under-segmented


def test_diagonal_neighbours_are_one_lesion_26_connectivity() -> None:
    reference = np.zeros((3, 3, 3), np.uint8)
    reference[0, 0, 0] = reference[1, 1, 1] = reference[2, 2, 2] = 1
    assert case_counts(reference, reference).reference_lesions == 1


def test_ignore_label_is_left_out() -> None:
    prediction, reference = _volume()
    reference[0] = 255
    prediction[0] = 1  # would be 36 false positives if counted
    assert case_scores(prediction, reference)["dice"] == pytest.approx(4 / 9)


def test_empty_reference_rule() -> None:
    empty = np.zeros((2, 3, 3), np.uint8)
    some = empty.copy()
    some[0, 0, 0] = 1
    both_empty = case_scores(empty, empty)
    assert both_empty["dice"] == both_empty["iou"] == both_empty["lesion_f1"] == 1.0
    assert math.isnan(both_empty["avd_percent"]) and math.isnan(both_empty["volume_ratio"])
    false_alarm = case_scores(some, empty)
    assert false_alarm["dice"] == false_alarm["lesion_tpr"] == false_alarm["lesion_precision"] == 0.0
    missed = case_scores(empty, some)
    assert missed["dice"] == missed["lesion_precision"] == 0.0


def test_sample_average_differs_from_voxel_average() -> None:
    big_ref = np.zeros((2, 10, 10), np.uint8)
    big_ref[0] = 1  # 100 voxels, all found
    small_ref = np.zeros((2, 10, 10), np.uint8)
    small_ref[1, 0, 0] = 1  # 1 voxel, missed
    counts = [case_counts(big_ref, big_ref), case_counts(np.zeros_like(small_ref), small_ref)]
    summary = summarise(counts)
    assert summary["sample_dice"] == pytest.approx(0.5)  # mean of 1 and 0
    assert summary["voxel_dice"] == pytest.approx(200 / 201)  # pooled: tp 100, fn 1
    assert summary["voxel_dice"] == pytest.approx(scores(counts)["dice"])
    assert summary["cases"] == 2


def test_shape_mismatch_is_explained() -> None:
    with pytest.raises(ValueError, match="differs from reference shape"):
        case_counts(np.zeros((2, 2, 2)), np.zeros((2, 2, 3)))


def test_tiles_cover_the_volume_and_end_flush() -> None:
    assert tile_starts(10, 16, 0.5) == [0]
    assert tile_starts(40, 16, 0.5) == [0, 8, 16, 24]
    starts = tile_starts(37, 16, 0.5)
    assert starts[0] == 0 and starts[-1] == 37 - 16 and all(b - a <= 8 for a, b in zip(starts, starts[1:]))


def test_gaussian_weight_peaks_in_the_centre() -> None:
    weight = gaussian_weight((5, 7, 9))
    assert weight.shape == (5, 7, 9) and weight[2, 3, 4] == pytest.approx(1.0) and weight.min() > 0


class _Identity(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x[:, :1], -x[:, :1]], dim=1)  # a voxel-wise "model": no tiling seams possible


@pytest.mark.parametrize("shape", [(20, 56, 48), (5, 9, 7)])  # larger and smaller than a tile
def test_sliding_window_equals_whole_volume_for_a_voxelwise_model(shape: tuple[int, int, int]) -> None:
    image = torch.randn(1, *shape)
    out = sliding_window_probabilities(_Identity(), image, (8, 16, 16), overlap=0.5)
    expected = torch.softmax(torch.cat([image, -image]), dim=0)
    assert out.shape == (2, *shape)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_bad_overlap_is_explained() -> None:
    with pytest.raises(ValueError, match="overlap must be in"):
        sliding_window_probabilities(_Identity(), torch.zeros(1, 4, 4, 4), (4, 4, 4), overlap=1.0)


@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.8])
def test_segment_masks_the_voxels_above_the_threshold(threshold: float) -> None:
    image = np.random.default_rng(0).normal(size=(1, 6, 10, 12)).astype(np.float32)
    probability, mask = segment(_Identity(), image, (4, 8, 8), threshold=threshold)
    expected = 1 / (1 + np.exp(2 * image[0]))  # class 1 of softmax([x, -x])
    np.testing.assert_allclose(probability, expected, rtol=1e-5, atol=1e-6)
    assert 0 < mask.sum() < mask.size
    assert np.array_equal(mask, (probability > threshold).astype(np.uint8))
