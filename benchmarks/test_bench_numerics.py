"""bf16 autocast at 8x activation scale: non-finite outputs and update error against float32.

The update is ``M' - M`` (the block's contribution); its relative error under autocast is
measured against the same block in float32, for the library and the naive reference with the
same weights (gates at 0.5). The timing is the autocast forward.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.baselines import NaiveRSABlock
from benchmarks.bench_common import ROUNDS, Size
from sliceattn import RecurrentSliceAttention3d

ACTIVATION_SCALE = 8.0
SEEDS = range(3)
SIZE = Size("64x64x32", "second", 1)
VARIANTS = {"naive-rsa": None, "rsa": None, "rsa-scale-auto": "auto"}


def blocks(seed: int, variant: str) -> torch.nn.Module:
    torch.manual_seed(seed)
    naive = NaiveRSABlock(SIZE.shape[1])
    with torch.no_grad():
        for beta in naive.betas:
            beta.fill_(0.5)
    if variant == "naive-rsa":
        return naive
    return RecurrentSliceAttention3d.from_reference_state_dict(naive.state_dict(), scale=VARIANTS[variant])


def update_error(module: torch.nn.Module, x: torch.Tensor) -> tuple[float, int]:
    """(relative error of the bf16-autocast update against float32, number of non-finite outputs)."""
    with torch.no_grad():
        reference = module(x) - x
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = module(x).float() - x
    nonfinite = int((~torch.isfinite(low)).sum())
    return float((low - reference).norm() / reference.norm()), nonfinite


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_bf16_autocast(benchmark, variant: str) -> None:
    errors, nonfinite = [], 0
    for seed in SEEDS:
        module = blocks(seed, variant)
        x = torch.randn(SIZE.shape).relu_() * ACTIVATION_SCALE
        error, bad = update_error(module, x)
        errors.append(error)
        nonfinite += bad
    benchmark.group = "bf16 autocast"
    benchmark.extra_info.update(
        {
            "block": variant,
            "mode": "bf16-autocast-forward",
            "shape": list(SIZE.shape),
            "activation_scale": ACTIVATION_SCALE,
            "update_errors": errors,
            "max_update_error": max(errors),
            "nonfinite": nonfinite,
        }
    )

    def forward() -> object:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            return module(x)

    benchmark.pedantic(forward, rounds=ROUNDS, iterations=1, warmup_rounds=1)
