"""The losses: the paper's exponentially weighted cross-entropy (formula, swapped, ignore label) and Dice + CE."""

import math

import pytest
import torch
import torch.nn.functional as F

from mslesion.model.loss import DiceCrossEntropy, WeightedCrossEntropy, class_weights, make_loss


def test_literal_weights_are_the_printed_formula() -> None:
    r = 5e-4
    background, lesion = class_weights(r, "literal")
    assert lesion == pytest.approx(math.exp(r) / (math.exp(r) + math.exp(1 - r)))
    assert background == pytest.approx(math.exp(1 - r) / (math.exp(r) + math.exp(1 - r)))
    # Taken literally, the printed formula gives lesions the smaller weight (about 0.27).
    assert lesion == pytest.approx(0.2690, abs=1e-3)


def test_swapped_weights_exchange_the_two() -> None:
    assert class_weights(0.01, "swapped") == pytest.approx(class_weights(0.01, "literal")[::-1])
    assert class_weights(0.3, "none") == (1.0, 1.0)


def test_loss_is_the_weighted_mean_and_ignores_255() -> None:
    logits = torch.randn(2, 2, 3, 4, 5)
    target = torch.randint(0, 2, (2, 3, 4, 5))
    target[0, 0, 0, :2] = 255
    loss = WeightedCrossEntropy(0.02, "swapped")(logits, target)
    background, lesion = class_weights(0.02, "swapped")
    per_voxel = F.cross_entropy(logits, target.clamp(max=1), reduction="none")
    keep = target != 255
    w = torch.where(target == 1, lesion, background)[keep]
    expected = (w * per_voxel[keep]).sum() / w.sum()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "error", "fragment"),
    [
        ({"r": 0.1, "weighting": "paper"}, ValueError, "weighting must be one of"),
        ({"r": 1.5, "weighting": "swapped"}, ValueError, "r (the mean lesion fraction)"),
    ],
)
def test_bad_arguments(kwargs: dict, error: type, fragment: str) -> None:
    with pytest.raises(error, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        class_weights(**kwargs)


def test_shape_mismatch_is_explained() -> None:
    with pytest.raises(ValueError, match="do not match"):
        WeightedCrossEntropy(0.1)(torch.zeros(1, 2, 4, 4, 4), torch.zeros(1, 4, 4, 5, dtype=torch.long))


def test_dice_ce_is_the_cross_entropy_plus_one_minus_the_batch_dice_of_the_lesion_class() -> None:
    logits = torch.randn(2, 2, 3, 4, 5, dtype=torch.float64)
    target = torch.randint(0, 2, (2, 3, 4, 5))
    target[1, 0, 0, :3] = 255
    loss = DiceCrossEntropy(0.02, "none")(logits, target)
    keep = target != 255
    p = logits.softmax(1)[:, 1][keep]
    t = (target == 1)[keep].double()
    dice = (2 * (p * t).sum() + 1e-5) / (p.sum() + t.sum() + 1e-5)
    cross_entropy = F.cross_entropy(logits, target, ignore_index=255)
    assert loss.item() == pytest.approx((cross_entropy + 1 - dice).item(), rel=1e-6)


def test_dice_ce_is_near_zero_for_a_confident_right_answer_and_has_gradients() -> None:
    target = torch.zeros(1, 4, 4, 4, dtype=torch.long)
    target[0, 1:3, 1:3, 1:3] = 1
    logits = torch.stack([(1 - target) * 20.0 - 10, target * 20.0 - 10], 1).float().requires_grad_()
    loss = DiceCrossEntropy(0.1, "swapped")(logits, target)
    assert loss.item() < 1e-3
    (-loss).backward()
    assert torch.isfinite(logits.grad).all()


def test_make_loss_names_its_choices() -> None:
    assert isinstance(make_loss("ce", 0.1, "swapped"), WeightedCrossEntropy)
    assert isinstance(make_loss("dice-ce", 0.1, "none"), DiceCrossEntropy)
    with pytest.raises(ValueError, match="loss must be one of"):
        make_loss("dice", 0.1, "none")
