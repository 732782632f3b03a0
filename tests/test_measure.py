"""The benchmarks' measuring counters (benchmarks/measure.py) on allocations of known size."""

from __future__ import annotations

import torch

from benchmarks import measure
from sliceattn import RecurrentSliceAttention3d, cost

SHAPE = (1, 6, 8, 10, 12)


def test_saved_bytes_counts_each_storage_once() -> None:
    x = torch.randn(1000, requires_grad=True)
    # x * x saves x twice (one storage); sin saves its input view of the same storage
    assert measure.saved_bytes(lambda: (x * x + x[:10].sin().sum())) == 4000
    assert measure.saved_bytes(lambda: x * x, exclude=[x]) == 0
    with torch.no_grad():
        assert measure.saved_bytes(lambda: x * x) == 0


def test_peak_memory_of_known_allocations() -> None:
    x = torch.randn(256, 1024)  # 1 MiB

    def two_temporaries() -> torch.Tensor:
        a = x * 2  # +1 MiB
        b = a + 1  # +1 MiB, peak 2 MiB
        del a
        return b.sum()

    # a few bytes more: wrapped scalars and the 0-d sum, which outlives b
    assert 0 <= measure.peak_memory(two_temporaries) - 2 * x.nbytes < 64
    # a kept result counts until the end: three live copies
    assert 0 <= measure.peak_memory(lambda: (x * 2, x * 3, x * 4)) - 3 * x.nbytes < 64


def test_measure_block_training_peak_exceeds_inference_peak() -> None:
    shape = SHAPE
    measured = measure.measure_block(RecurrentSliceAttention3d(shape[1], alpha_init=0.5), torch.randn(shape, requires_grad=True))
    assert measured.forward_flops == cost.rsa_cost(shape).forward
    # training keeps the saved activations alive; inference frees each step's projections
    assert measured.train_peak >= measured.saved - 4 * torch.Size(shape).numel()
    assert 0 < measured.inference_peak < measured.train_peak
