"""Exponentially weighted cross-entropy (RSANet, Zhang et al., MICCAI 2019, Sec. 2.3).

With ``r`` the mean lesion fraction of the training set, the paper writes the class weights as

    lesion:     e^r / (e^r + e^(1-r))        background: e^(1-r) / (e^r + e^(1-r))

Taken literally, with ``r`` about 5e-4 this gives lesions the *smaller* weight (0.27 vs 0.73), the
opposite of an imbalance correction; the two are probably swapped in the text. Both are offered:
``"literal"`` (the formula as printed) and ``"swapped"`` (lesion ``e^(1-r)/...``, background
``e^r/...``), plus ``"none"`` (plain cross-entropy). docs/ms_lesion_training.md gives the
measurement that picked ``"swapped"`` as the training default.

``DiceCrossEntropy`` adds nnU-Net's soft Dice of the lesion class (pooled over the batch) to that
cross-entropy: ``--loss dice-ce`` (with ``--loss-weights none`` it is nnU-Net's default loss).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.reading import IGNORE_LABEL

WEIGHTINGS: tuple[str, ...] = ("swapped", "literal", "none")
LOSSES: tuple[str, ...] = ("ce", "dice-ce")


def class_weights(r: float, weighting: str = "swapped") -> tuple[float, float]:
    """The (background, lesion) weights of the exponential weighting.

    Args:
        r: mean lesion fraction of the training set, in [0, 1].
        weighting: ``"swapped"``, ``"literal"`` or ``"none"`` (both 1).

    Returns:
        ``(background_weight, lesion_weight)``; for ``"literal"`` and ``"swapped"`` they sum to 1.
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    if not (isinstance(r, (int, float)) and 0.0 <= r <= 1.0):
        raise ValueError(f"r (the mean lesion fraction) must be a number in [0, 1], got {r!r}")
    if weighting == "none":
        return 1.0, 1.0
    small = math.exp(r) / (math.exp(r) + math.exp(1.0 - r))
    large = 1.0 - small  # e^(1-r) / (e^r + e^(1-r))
    # literal: lesion gets e^r/(...), background e^(1-r)/(...)
    return (large, small) if weighting == "literal" else (small, large)


class WeightedCrossEntropy(nn.Module):
    """Class-weighted cross-entropy over ``(B, 2, D, H, W)`` logits; voxels labelled 255 are ignored.

    The reduction is PyTorch's weighted mean: ``sum_i w_{y_i} * ce_i / sum_i w_{y_i}`` over the
    voxels that are not ignored. With ``distributed=True`` (several processes under DDP, which averages
    gradients) both sums run over the voxels of *all* processes: each process returns
    ``world * its numerator / global denominator``, so the averaged gradient equals that of one process
    holding the whole batch.

    Args:
        r: mean lesion fraction of the training set (``data.sampling.mean_lesion_fraction``).
        weighting: ``"swapped"`` (default), ``"literal"`` or ``"none"``; see ``class_weights``.
        distributed: reduce the denominator over the default process group.
    """

    def __init__(self, r: float, weighting: str = "swapped", *, distributed: bool = False) -> None:
        super().__init__()
        self.r = float(r)
        self.weighting = weighting
        self.distributed = distributed
        self.register_buffer("weight", torch.tensor(class_weights(r, weighting), dtype=torch.float32))

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        """``logits (B, 2, D, H, W)``, ``target (B, D, H, W)`` integer labels -> scalar loss."""
        if logits.ndim != target.ndim + 1 or logits.shape[0] != target.shape[0] or logits.shape[2:] != target.shape[1:]:
            raise ValueError(
                f"logits {tuple(logits.shape)} and target {tuple(target.shape)} do not match: "
                "expected logits (B, C, *spatial) and target (B, *spatial)"
            )
        target = target.long()
        # float32 logits: the softmax of a low-precision autocast output loses the rare lesion class.
        per_voxel = F.cross_entropy(logits.float(), target, weight=self.weight, ignore_index=IGNORE_LABEL,
                                    reduction="none")
        valid = target != IGNORE_LABEL
        denominator = self.weight[target.where(valid, 0)].masked_fill(~valid, 0.0).sum()
        if self.distributed and dist.is_initialized() and dist.get_world_size() > 1:
            denominator = denominator.detach().clone()
            dist.all_reduce(denominator)
            return per_voxel.sum() * dist.get_world_size() / denominator
        return per_voxel.sum() / denominator

    def extra_repr(self) -> str:
        background, lesion = self.weight.tolist()
        return f"r={self.r:.3g}, weighting={self.weighting!r}, background={background:.4f}, lesion={lesion:.4f}"


class DiceCrossEntropy(nn.Module):
    """``WeightedCrossEntropy`` plus ``1 - soft Dice`` of the lesion class over ``(B, 2, D, H, W)`` logits.

    The Dice pools every voxel of the batch (nnU-Net's batch Dice), voxels labelled 255 left out:
    ``(2 sum p t + s) / (sum p + sum t + s)`` with ``p`` the lesion probability, ``t`` the lesion label
    and ``s = 1e-5``. With ``distributed=True`` the three sums run over every process's crops (a
    differentiable all-reduce), so the loss is that of one process holding the whole batch.

    Args:
        r: mean lesion fraction of the training set (for the cross-entropy's weights).
        weighting: the cross-entropy's class weights, see ``class_weights`` (nnU-Net: ``"none"``).
        distributed: reduce over the default process group.
    """

    def __init__(self, r: float, weighting: str = "none", *, distributed: bool = False, smooth: float = 1e-5) -> None:
        super().__init__()
        self.cross_entropy = WeightedCrossEntropy(r, weighting, distributed=distributed)
        self.distributed = distributed
        self.smooth = smooth

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        """``logits (B, 2, D, H, W)``, ``target (B, D, H, W)`` integer labels -> scalar loss."""
        cross_entropy = self.cross_entropy(logits, target)  # checks the shapes
        valid = target != IGNORE_LABEL
        lesion = logits.float().softmax(1)[:, 1] * valid
        truth = ((target == 1) & valid).float()
        sums = torch.stack([(lesion * truth).sum(), lesion.sum(), truth.sum()])
        if self.distributed and dist.is_initialized() and dist.get_world_size() > 1:
            from torch.distributed.nn.functional import all_reduce  # differentiable: gradients reach every process

            sums = all_reduce(sums)
        dice = (2 * sums[0] + self.smooth) / (sums[1] + sums[2] + self.smooth)
        return cross_entropy + 1.0 - dice


def make_loss(loss: str, r: float, weighting: str, *, distributed: bool = False) -> nn.Module:
    """The training loss ``--loss`` names: ``"ce"`` (``WeightedCrossEntropy``) or ``"dice-ce"``."""
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    kind = WeightedCrossEntropy if loss == "ce" else DiceCrossEntropy
    return kind(r, weighting, distributed=distributed)
