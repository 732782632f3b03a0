"""The cost model: analytic FLOPs and saved bytes equal the measured counters exactly."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from benchmarks.baselines import NaiveNonLocal3d, NaiveRSABlock, NaiveSliceAttention
from sliceattn import NonLocal3d, RecurrentSliceAttention3d, SliceAttention3d
from sliceattn import cost

# (B, C, D, H, W): distinct D, H, W so that a swapped axis changes the count; N = 120 takes the
# F.conv3d path of the projections, N = 960 the batched-matmul path
SHAPES = [(2, 8, 3, 4, 10), (1, 6, 8, 10, 12)]

BLOCKS: dict[str, tuple[Callable[[int], nn.Module], Callable[..., cost.Cost]]] = {
    "sa-axial": (lambda c: SliceAttention3d(c, "axial", alpha_init=0.5), lambda s: cost.slice_attention3d_cost(s, 2)),
    "sa-coronal-noproj": (
        lambda c: SliceAttention3d(c, "coronal", projection=False, alpha_init=0.5),
        lambda s: cost.slice_attention3d_cost(s, 3, projection=False),
    ),
    "naive-sa-sagittal": (lambda c: NaiveSliceAttention(c, "sagittal"), lambda s: cost.slice_attention3d_cost(s, 4)),
    "rsa": (lambda c: RecurrentSliceAttention3d(c, alpha_init=0.5), lambda s: cost.rsa_cost(s)),
    "naive-rsa": (NaiveRSABlock, lambda s: cost.rsa_cost(s)),
    "rsa-noproj": (
        lambda c: RecurrentSliceAttention3d(c, projection=False, alpha_init=0.5),
        lambda s: cost.rsa_cost(s, projection=False),
    ),
    "rsa-qk2": (
        lambda c: RecurrentSliceAttention3d(c, qk_channels=2, alpha_init=0.5),
        lambda s: cost.rsa_cost(s, qk_channels=2),
    ),
    "rsa-qk2-once": (
        lambda c: RecurrentSliceAttention3d(c, qk_channels=2, project_once=True, alpha_init=0.5),
        lambda s: cost.rsa_cost(s, qk_channels=2, project_once=True),
    ),
    "rsa-axial-first": (
        lambda c: RecurrentSliceAttention3d(c, order=("axial", "sagittal"), alpha_init=0.5),
        lambda s: cost.rsa_cost(s, order=(2, 4)),
    ),
    "nonlocal": (NonLocal3d, lambda s: cost.nonlocal_cost(s)),
    "nonlocal-sub": (lambda c: NonLocal3d(c, sub_sample=True), lambda s: cost.nonlocal_cost(s, sub_sample=True)),
    "nonlocal-inter3": (lambda c: NonLocal3d(c, inter_channels=3), lambda s: cost.nonlocal_cost(s, inter_channels=3)),
    "naive-nonlocal-sub": (
        lambda c: NaiveNonLocal3d(c, sub_sample=True),
        lambda s: cost.nonlocal_cost(s, sub_sample=True),
    ),
}


def forward_backward_flops(module: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    out: list[torch.Tensor] = []
    forward = cost.measure_flops(lambda: out.append(module(x)))
    backward = cost.measure_flops(lambda: out[0].sum().backward())
    return forward, backward


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_analytic_flops_equal_flop_counter(name: str, shape: tuple[int, ...]) -> None:
    build, analytic = BLOCKS[name]
    module = build(shape[1])
    x = torch.randn(shape, requires_grad=True)
    expected = analytic(shape)
    assert forward_backward_flops(module, x) == (expected.forward, expected.backward)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_input_without_grad_skips_first_projection_input_gradient(shape: tuple[int, ...]) -> None:
    module = RecurrentSliceAttention3d(shape[1], alpha_init=0.5)
    expected = cost.rsa_cost(shape, input_requires_grad=False)
    assert forward_backward_flops(module, torch.randn(shape)) == (expected.forward, expected.backward)
    # exactly one input gradient of a C -> 3C projection is skipped
    skipped = cost.rsa_cost(shape).backward - expected.backward
    assert skipped == cost.pointwise_cost(shape, 3 * shape[1]).forward


def test_checkpoint_backward_recomputes_one_forward() -> None:
    shape = SHAPES[1]
    module = RecurrentSliceAttention3d(shape[1], checkpoint=True, alpha_init=0.5)
    expected = cost.rsa_cost(shape)
    x = torch.randn(shape, requires_grad=True)
    assert forward_backward_flops(module, x) == (expected.forward, expected.backward + expected.forward)


def test_paper_formulas_for_the_maps() -> None:
    # 4*B*C*N*(D+H+W) for slice attention, 4*B*N^2*C' for non-local, maps B*L^2 and B*N^2
    batch, channels, depth, height, width = shape = (2, 512, 2, 4, 4)
    n = depth * height * width
    sa = sum((cost.slice_attention_cost(shape, dim) for dim in (2, 3, 4)), cost.Cost(0, 0))
    assert sa.forward == 4 * batch * channels * n * (depth + height + width)
    assert sa.map_bytes == 4 * batch * (depth**2 + height**2 + width**2)
    nl = cost.nonlocal_map_cost(shape)
    assert nl.forward == 4 * batch * n * n * channels // 2
    # the paper's 28x map memory at the bottom of a 64x64x32 crop
    assert nl.map_bytes // sa.map_bytes == 28
    assert cost.nonlocal_keys(shape, sub_sample=True) == depth * 2 * 2


@pytest.mark.parametrize(
    "options",
    [{}, {"projection": False}, {"qk_channels": 2}, {"qk_channels": 2, "project_once": True}, {"checkpoint": True}],
    ids=str,
)
def test_saved_bytes_match_the_model(options: dict[str, object]) -> None:
    shape = SHAPES[1]
    module = RecurrentSliceAttention3d(shape[1], alpha_init=0.5, **options)  # type: ignore[arg-type]
    x = torch.randn(shape, requires_grad=True)
    measured = cost.saved_bytes(lambda: module(x), exclude=module.parameters())
    assert measured == cost.rsa_saved_bytes(shape, **options)  # type: ignore[arg-type]


def test_naive_reference_saves_five_feature_maps_per_step() -> None:
    shape = SHAPES[1]
    module = NaiveRSABlock(shape[1])
    x = torch.randn(shape, requires_grad=True)
    measured = cost.saved_bytes(lambda: module(x), exclude=module.parameters())
    maps = cost.rsa_cost(shape).map_bytes
    assert measured == 3 * 5 * 4 * x.numel() + maps


def test_saved_bytes_counts_each_storage_once() -> None:
    x = torch.randn(1000, requires_grad=True)
    # x * x saves x twice (one storage); sin saves its input view of the same storage
    assert cost.saved_bytes(lambda: (x * x + x[:10].sin().sum())) == 4000
    assert cost.saved_bytes(lambda: x * x, exclude=[x]) == 0
    with torch.no_grad():
        assert cost.saved_bytes(lambda: x * x) == 0


def test_peak_memory_of_known_allocations() -> None:
    x = torch.randn(256, 1024)  # 1 MiB

    def two_temporaries() -> torch.Tensor:
        a = x * 2  # +1 MiB
        b = a + 1  # +1 MiB, peak 2 MiB
        del a
        return b.sum()

    # a few bytes more: wrapped scalars and the 0-d sum, which outlives b
    assert 0 <= cost.peak_memory(two_temporaries) - 2 * x.nbytes < 64
    # a kept result counts until the end: three live copies
    assert 0 <= cost.peak_memory(lambda: (x * 2, x * 3, x * 4)) - 3 * x.nbytes < 64


def test_measure_block_training_peak_exceeds_inference_peak() -> None:
    shape = SHAPES[1]
    measured = cost.measure_block(RecurrentSliceAttention3d(shape[1], alpha_init=0.5), torch.randn(shape, requires_grad=True))
    assert measured.forward_flops == cost.rsa_cost(shape).forward
    # training keeps the saved activations alive; inference frees each step's projections
    assert measured.train_peak >= measured.saved - 4 * torch.Size(shape).numel()
    assert 0 < measured.inference_peak < measured.train_peak


@pytest.mark.parametrize(
    ("call", "error", "fragment"),
    [
        (lambda: cost.rsa_cost((1, 2, 3, 4)), ValueError, "shape must be five positive ints"),
        (lambda: cost.rsa_cost((1, 2, 3, 4, 0)), ValueError, "shape must be five positive ints"),
        (lambda: cost.slice_attention_cost((1, 2, 3, 4, 5), 1), ValueError, "dim must be 2 (axial)"),
        (lambda: cost.rsa_cost((1, 2, 3, 4, 5), qk_channels=0), ValueError, "qk_channels must be a positive int"),
        (lambda: cost.rsa_cost((1, 2, 3, 4, 5), projection=False, project_once=True), ValueError, "project_once=True"),
        (lambda: cost.slice_attention3d_cost((1, 2, 3, 4, 5), 2, projection=False, qk_channels=1), ValueError, "needs projection"),
        (lambda: cost.rsa_saved_bytes((1, 2, 3, 4, 5), steps=4), ValueError, "steps must be 1, 2 or 3"),
    ],
)
def test_bad_arguments_are_named(call: Callable[[], object], error: type, fragment: str) -> None:
    with pytest.raises(error, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        call()
