"""Sizes, blocks and measurements shared by the benchmark suites.

Sizes are the U-Net levels of the paper's backbone (filters 32..512, four stride-2 steps): the
bottom (C 512 at 1/16) and the second-bottom (C 256 at 1/8) of each crop, written ``H x W x D``
like the paper (the tensor is ``(B, C, D, H, W)``, D axial). ``SLICEATTN_BENCH=full`` runs every
crop at batch 1 and 4 plus the full-resolution level, 7 rounds at least, and the MS-lesion
example's long cases; the default quick mode runs the 64x64x32 and 160x160x48 crops at batch 1,
3 rounds at least, so that ``pytest --benchmark-only`` stays near two minutes on 2 CPU cores (the
non-local block at the second-bottom level of 256x320x48 alone took a minute).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from benchmarks import measure
from benchmarks.baselines import NaiveNonLocal3d, NaiveRSABlock, NaiveSliceAttention
from sliceattn import NonLocal3d, RecurrentSliceAttention3d, SliceAttention3d
from sliceattn import cost

FULL = os.environ.get("SLICEATTN_BENCH", "quick").lower() == "full"
#: memory the benchmarks may use; a case whose estimated peak exceeds it is skipped with the estimate
MEMORY_BUDGET = float(os.environ.get("SLICEATTN_BENCH_MEMORY_GIB", "24")) * 2**30
ROUNDS = int(os.environ.get("SLICEATTN_BENCH_ROUNDS", 7 if FULL else 3))
#: fast cases get more rounds, up to this many, so that each one is timed for about TARGET_SECONDS:
#: the minimum over many rounds is what survives other processes on a shared CPU
MAX_ROUNDS, TARGET_SECONDS = 60, 0.5

#: crops as ``H x W x D`` (paper's notation) -> (D, H, W)
CROPS: dict[str, tuple[int, int, int]] = {
    "64x64x32": (32, 64, 64),
    "128x128x32": (32, 128, 128),
    "160x160x48": (48, 160, 160),
    "256x320x48": (48, 256, 320),
}
#: the paper's claims for the attention maps, non-local / RSA: at least this much less memory and FLOPs
MEMORY_CLAIM, FLOP_CLAIM = 28, 100
#: U-Net level name -> (channels, downsampling factor)
LEVELS: dict[str, tuple[int, int]] = {"bottom": (512, 16), "second": (256, 8), "quarter": (128, 4), "full": (32, 1)}


@dataclass(frozen=True)
class Size:
    """One benchmark input: a crop, a U-Net level and a batch size."""

    crop: str
    level: str
    batch: int

    @property
    def shape(self) -> tuple[int, int, int, int, int]:
        """``(B, C, D, H, W)``."""
        channels, factor = LEVELS[self.level]
        depth, height, width = CROPS[self.crop]
        return (self.batch, channels, depth // factor, height // factor, width // factor)

    @property
    def id(self) -> str:
        return f"{self.crop}-{self.level}-b{self.batch}"


def sizes() -> list[Size]:
    """The attention sizes of this mode (bottom and second-bottom of each crop)."""
    crops = list(CROPS) if FULL else ["64x64x32", "160x160x48"]
    batches = (1, 4) if FULL else (1,)
    return [Size(crop, level, batch) for batch in batches for crop in crops for level in ("bottom", "second")]


def large_sizes() -> list[Size]:
    """Whole-image levels above the second-bottom, where only the lean RSA options can run."""
    levels = ("quarter", "full") if FULL else ("quarter",)
    return [Size("256x320x48", level, 1) for level in levels]


def recomputed(forward_backward: cost.Cost) -> cost.Cost:
    """The cost of a checkpointed block: its backward runs the forward once more."""
    return cost.Cost(forward_backward.forward, forward_backward.backward + forward_backward.forward, forward_backward.map_bytes)


@dataclass(frozen=True)
class Block:
    """A benchmarked block: how to build it and its analytic cost.

    Attributes:
        build: ``channels -> module``.
        analytic: ``shape -> Cost``.
        baseline: name of the block it is compared with in the same run.
        faithful: computes the paper's reference function.
    """

    build: Callable[[int], nn.Module]
    analytic: Callable[[tuple[int, ...]], cost.Cost]
    baseline: Optional[str]
    faithful: bool = True


BLOCKS: dict[str, Block] = {
    "naive-sa": Block(lambda c: NaiveSliceAttention(c, "coronal"), lambda s: cost.slice_attention3d_cost(s, 3), None),
    "sa": Block(lambda c: SliceAttention3d(c, "coronal"), lambda s: cost.slice_attention3d_cost(s, 3), "naive-sa"),
    "naive-rsa": Block(NaiveRSABlock, lambda s: cost.rsa_cost(s), None),
    "rsa": Block(RecurrentSliceAttention3d, lambda s: cost.rsa_cost(s), "naive-rsa"),
    "rsa-checkpoint": Block(
        lambda c: RecurrentSliceAttention3d(c, checkpoint=True), lambda s: recomputed(cost.rsa_cost(s)), "naive-rsa"
    ),
    # lean options, departures from the paper: compared with the non-local block
    "rsa-noproj": Block(
        lambda c: RecurrentSliceAttention3d(c, projection=False),
        lambda s: cost.rsa_cost(s, projection=False),
        "nonlocal",
        faithful=False,
    ),
    "rsa-qk8": Block(
        lambda c: RecurrentSliceAttention3d(c, qk_channels=max(c // 8, 1)),
        lambda s: cost.rsa_cost(s, qk_channels=max(s[1] // 8, 1)),
        "nonlocal",
        faithful=False,
    ),
    "rsa-qk8-once": Block(
        lambda c: RecurrentSliceAttention3d(c, qk_channels=max(c // 8, 1), project_once=True),
        lambda s: cost.rsa_cost(s, qk_channels=max(s[1] // 8, 1), project_once=True),
        "nonlocal",
        faithful=False,
    ),
    "naive-nonlocal": Block(NaiveNonLocal3d, lambda s: cost.nonlocal_cost(s), None),
    "nonlocal": Block(NonLocal3d, lambda s: cost.nonlocal_cost(s), "naive-nonlocal"),
    "naive-nonlocal-sub": Block(
        lambda c: NaiveNonLocal3d(c, sub_sample=True), lambda s: cost.nonlocal_cost(s, sub_sample=True), None
    ),
    "nonlocal-sub": Block(
        lambda c: NonLocal3d(c, sub_sample=True), lambda s: cost.nonlocal_cost(s, sub_sample=True), "naive-nonlocal-sub"
    ),
}
LEAN = ("rsa-noproj", "rsa-qk8", "rsa-qk8-once")
MODES = ("forward", "train", "inference")


def estimated_peak(block: str, shape: tuple[int, ...]) -> float:
    """A generous estimate of a block's forward+backward peak bytes, to skip what cannot fit.

    Non-local: logits, softmax and their gradients (four ``B x N x N'`` float32 maps) plus
    features; slice attention: twenty feature maps (the maps themselves are small).
    """
    feature = 4.0 * torch.Size(shape).numel()
    if "nonlocal" in block:
        return 4 * cost.nonlocal_map_cost(shape, sub_sample=block.endswith("sub")).map_bytes + 10 * feature
    return 20 * feature


def skip_reason(block: str, shape: tuple[int, ...]) -> Optional[str]:
    """Why ``block`` does not run at ``shape`` on this machine, or None."""
    need = estimated_peak(block, shape)
    if need > MEMORY_BUDGET:
        return (
            f"{block} at {shape} needs about {need / 2**30:.0f} GiB "
            f"(over the {MEMORY_BUDGET / 2**30:.0f} GiB budget, SLICEATTN_BENCH_MEMORY_GIB)"
        )
    return None


def make_input(shape: tuple[int, ...], requires_grad: bool) -> torch.Tensor:
    """A GroupNorm+ReLU-like activation: non-negative, unit scale."""
    return torch.randn(shape).relu_().requires_grad_(requires_grad)


def step(module: nn.Module, x: torch.Tensor, mode: str) -> Callable[[], object]:
    """The timed call: a training forward, forward+backward, or an inference-mode forward."""
    if mode == "forward":
        return lambda: module(x)
    if mode == "inference":

        def infer() -> object:
            with torch.inference_mode():
                return module(x)

        return infer

    def train() -> None:
        module.zero_grad(set_to_none=True)
        x.grad = None
        module(x).sum().backward()

    return train


def rounds_for(call: Callable[[], object]) -> int:
    """Rounds for ``call``: at least ``ROUNDS``, more for fast calls (one call is made to time it)."""
    start = time.perf_counter()
    call()
    elapsed = max(time.perf_counter() - start, 1e-6)
    return max(ROUNDS, min(MAX_ROUNDS, int(TARGET_SECONDS / elapsed)))


_MEASURED: dict[tuple[str, tuple[int, ...]], measure.Measured] = {}


def measured(block: str, module: nn.Module, x: torch.Tensor) -> measure.Measured:
    """FLOPs, peaks and saved bytes of ``block`` at ``x``'s shape, measured once per session."""
    key = (block, tuple(x.shape))
    if key not in _MEASURED:
        _MEASURED[key] = measure.measure_block(module, x)
        module.zero_grad(set_to_none=True)
        x.grad = None
    return _MEASURED[key]


def extra_info(block: str, shape: tuple[int, ...], mode: str, numbers: measure.Measured) -> dict[str, object]:
    """What each benchmark records next to its timings."""
    analytic = BLOCKS[block].analytic(shape)
    return {
        "block": block,
        "baseline": BLOCKS[block].baseline,
        "faithful": BLOCKS[block].faithful,
        "mode": mode,
        "shape": list(shape),
        "voxels": cost.voxels(shape),
        "flops_forward": analytic.forward,
        "flops_backward": analytic.backward,
        "flops_forward_measured": numbers.forward_flops,
        "flops_backward_measured": numbers.backward_flops,
        "map_bytes": analytic.map_bytes,
        "train_peak_bytes": numbers.train_peak,
        "inference_peak_bytes": numbers.inference_peak,
        "saved_bytes": numbers.saved,
        "threads": torch.get_num_threads(),
    }
