"""Speed, memory and FLOPs of every block at the U-Net sizes, baselines in the same run.

Each benchmark times one call (training forward, forward+backward, or inference forward) and
records in ``extra_info`` the analytic and measured FLOPs, the training-forward and inference
peaks, the bytes saved for backward and the name of its baseline; ``benchmarks/report.py``
turns a ``--benchmark-json`` file into ratio tables.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.bench_common import (
    BLOCKS,
    LEAN,
    MODES,
    Size,
    extra_info,
    large_sizes,
    make_input,
    measured,
    rounds_for,
    sizes,
    skip_reason,
    step,
)

CASES = [(size, block) for size in sizes() for block in BLOCKS]
CASES += [(size, block) for size in large_sizes() for block in (*LEAN, "nonlocal")]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("size", "block"), CASES, ids=[f"{size.id}-{block}" for size, block in CASES])
def test_block(benchmark, size: Size, block: str, mode: str) -> None:
    shape = size.shape
    reason = skip_reason(block, shape)
    if reason:
        pytest.skip(reason)
    torch.manual_seed(0)
    module = BLOCKS[block].build(shape[1])
    # the input of a block inside a network needs a gradient too
    x = make_input(shape, requires_grad=True)
    benchmark.group = f"{size.id} {mode}"
    benchmark.extra_info.update(extra_info(block, shape, mode, measured(block, module, x)))
    benchmark.extra_info["size"] = size.id
    call = step(module, x, mode)
    benchmark.pedantic(call, rounds=rounds_for(call), iterations=1, warmup_rounds=1)
