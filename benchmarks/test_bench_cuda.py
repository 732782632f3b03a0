"""CUDA tables: CUDA-event times, ``max_memory_allocated`` peaks, attention-core bandwidth, projections.

Skipped without a CUDA device; ``benchmarks/gpu.sh`` runs this file alone and writes the report.
Each case records in ``extra_info`` (``mode`` starting with ``cuda-``):

- ``cuda-block``: a block's forward+backward and inference-forward times (CUDA events, minimum
  over rounds) and peaks (``torch.cuda.max_memory_allocated`` above the starting level), next to
  its baseline's;
- ``cuda-attention-core``: the fused slice attention alone along one axis, forward; its bytes
  moved at the least (read query, key and value, write the output) over its time, as a fraction
  of the device's peak bandwidth (``measure.peak_bandwidth``);
- ``cuda-projection``: the 1x1x1 projection (``C -> 3C``) as the library's batched matmul
  against ``F.conv3d``, forward+backward.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from benchmarks import measure
from benchmarks.bench_common import BLOCKS, ROUNDS, Size, make_input, sizes, skip_reason, step
from sliceattn import slice_attention
from sliceattn.pointwise import pointwise_conv

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA benchmarks need a CUDA device")

DEVICE = "cuda"
CUDA_BLOCKS = (
    "naive-rsa", "rsa", "rsa-checkpoint", "rsa-qk8-once", "naive-nonlocal", "nonlocal", "naive-nonlocal-sub", "nonlocal-sub"
)
#: CUDA-event rounds per case (the minimum is kept)
CUDA_ROUNDS = max(ROUNDS, 10)
CASES = [(size, block) for size in sizes() for block in CUDA_BLOCKS]
AXES = {"axial": 2, "coronal": 3, "sagittal": 4}


def _info(benchmark, size: Size, mode: str, **fields: object) -> None:
    benchmark.group = f"cuda {size.id} {mode}"
    benchmark.extra_info.update(
        {"mode": mode, "size": size.id, "shape": list(size.shape), "cuda_device": torch.cuda.get_device_name(), **fields}
    )


def _synchronised(call):
    def run() -> None:
        call()
        torch.cuda.synchronize()

    return run


@pytest.mark.parametrize(("size", "block"), CASES, ids=[f"{size.id}-{block}" for size, block in CASES])
def test_cuda_block(benchmark, size: Size, block: str) -> None:
    shape = size.shape
    reason = skip_reason(block, shape)
    if reason:
        pytest.skip(reason)
    torch.manual_seed(0)
    module = BLOCKS[block].build(shape[1]).to(DEVICE)
    x = make_input(shape, requires_grad=False).to(DEVICE).requires_grad_()
    train, inference = step(module, x, "train"), step(module, x, "inference")
    _info(
        benchmark,
        size,
        "cuda-block",
        block=block,
        baseline=BLOCKS[block].baseline,
        cuda_train_time=measure.cuda_time(train, CUDA_ROUNDS),
        cuda_inference_time=measure.cuda_time(inference, CUDA_ROUNDS),
        cuda_train_peak_bytes=measure.peak_memory(train, DEVICE),
        cuda_inference_peak_bytes=measure.peak_memory(inference, DEVICE),
    )
    benchmark.pedantic(_synchronised(train), rounds=ROUNDS, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("axis", sorted(AXES))
@pytest.mark.parametrize("size", sizes(), ids=[size.id for size in sizes()])
def test_cuda_attention_core(benchmark, size: Size, axis: str) -> None:
    torch.manual_seed(0)
    query, key, value = (torch.randn(size.shape, device=DEVICE) for _ in range(3))

    def forward() -> object:
        with torch.no_grad():
            return slice_attention(query, key, value, axis)

    seconds = measure.cuda_time(forward, CUDA_ROUNDS)
    moved = 4 * query.numel() * query.element_size()
    bandwidth = moved / seconds
    _info(
        benchmark,
        size,
        "cuda-attention-core",
        block="slice-attention",
        axis=axis,
        cuda_time=seconds,
        bytes_moved=moved,
        bandwidth=bandwidth,
        peak_bandwidth=measure.peak_bandwidth(DEVICE),
        peak_fraction=bandwidth / measure.peak_bandwidth(DEVICE),
    )
    benchmark.pedantic(_synchronised(forward), rounds=ROUNDS, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("kind", ["matmul", "conv3d"])
@pytest.mark.parametrize("size", sizes(), ids=[size.id for size in sizes()])
def test_cuda_projection(benchmark, size: Size, kind: str) -> None:
    torch.manual_seed(0)
    channels = size.shape[1]
    x = torch.randn(size.shape, device=DEVICE, requires_grad=True)
    weight = torch.randn(3 * channels, channels, 1, 1, 1, device=DEVICE, requires_grad=True)
    bias = torch.randn(3 * channels, device=DEVICE, requires_grad=True)
    project = pointwise_conv if kind == "matmul" else F.conv3d

    def train() -> None:
        x.grad = weight.grad = bias.grad = None
        project(x, weight, bias).sum().backward()

    _info(
        benchmark,
        size,
        "cuda-projection",
        block=f"projection-{kind}",
        kind=kind,
        cuda_train_time=measure.cuda_time(train, CUDA_ROUNDS),
        cuda_train_peak_bytes=measure.peak_memory(train, DEVICE),
    )
    benchmark.pedantic(_synchronised(train), rounds=ROUNDS, iterations=1, warmup_rounds=1)
