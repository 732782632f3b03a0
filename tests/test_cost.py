"""The cost model: analytic FLOPs and saved bytes equal the measured counters exactly; the cost table."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
import torch
from torch import nn

from benchmarks import measure
from benchmarks.baselines import NaiveNonLocal3d, NaiveRSABlock, NaiveSliceAttention
from sliceattn import NonLocal3d, RecurrentSliceAttention3d, SliceAttention3d
from sliceattn import cost

# (B, C, D, H, W): distinct D, H, W so that a swapped axis changes the count
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
    forward = measure.measure_flops(lambda: out.append(module(x)))
    backward = measure.measure_flops(lambda: out[0].sum().backward())
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
    measured = measure.saved_bytes(lambda: module(x), exclude=module.parameters())
    assert measured == cost.rsa_saved_bytes(shape, **options)  # type: ignore[arg-type]


def test_naive_reference_saves_five_feature_maps_per_step() -> None:
    shape = SHAPES[1]
    module = NaiveRSABlock(shape[1])
    x = torch.randn(shape, requires_grad=True)
    measured = measure.saved_bytes(lambda: module(x), exclude=module.parameters())
    maps = cost.rsa_cost(shape).map_bytes
    assert measured == 3 * 5 * 4 * x.numel() + maps


@pytest.mark.parametrize(
    ("call", "error", "fragment"),
    [
        (lambda: cost.rsa_cost((1, 2, 3, 4)), ValueError, "shape must be five positive ints"),
        (lambda: cost.rsa_cost((1, 2, 3, 4, 0)), ValueError, "shape[4] must be >= 1, got 0"),
        (lambda: cost.rsa_cost((1, 2.0, 3, 4, 5)), TypeError, "shape[1] must be an int, got float"),
        (lambda: cost.slice_attention_cost((1, 2, 3, 4, 5), 1), ValueError, "dim=1 is not a spatial axis"),
        (lambda: cost.slice_attention_cost((1, 2, 3, 4, 5), "Front"), ValueError, "dim='Front' is not an axis name"),
        (lambda: cost.rsa_cost((1, 2, 3, 4, 5), qk_channels=0), ValueError, "qk_channels must be >= 1, got 0"),
        (lambda: cost.rsa_cost((1, 2, 3, 4, 5), order="axial"), TypeError, "order must be a non-empty sequence"),
        (lambda: cost.unet_shapes((8, 8, 8), filters=(4, 8, 16, 32, 64)), ValueError, "too small for 5 levels"),
        (lambda: cost.unet_shapes((8, 8)), ValueError, "spatial_shape must be (D, H, W)"),
        (lambda: cost.rsa_cost((1, 2, 3, 4, 5), projection=False, project_once=True), ValueError, "project_once=True"),
        (lambda: cost.slice_attention3d_cost((1, 2, 3, 4, 5), 2, projection=False, qk_channels=1), ValueError, "needs projection"),
        (lambda: cost.rsa_saved_bytes((1, 2, 3, 4, 5), steps=4), ValueError, "steps must be 1, 2 or 3"),
    ],
)
def test_bad_arguments_are_named(call: Callable[[], object], error: type, fragment: str) -> None:
    with pytest.raises(error, match=re.escape(fragment)):
        call()


@pytest.mark.parametrize(
    ("value", "error"), [(0, ValueError), (2.5, TypeError), (True, TypeError)], ids=["zero", "float", "bool"]
)
def test_cost_model_and_layer_raise_the_same_error(value: object, error: type) -> None:
    # one validation for the library: a mistake raises the same type with the same message
    with pytest.raises(error) as from_layer:
        RecurrentSliceAttention3d(8, qk_channels=value)  # type: ignore[arg-type]
    with pytest.raises(error) as from_cost:
        cost.rsa_cost((1, 8, 3, 4, 5), qk_channels=value)  # type: ignore[arg-type]
    assert str(from_layer.value) == str(from_cost.value)


def test_axis_names_select_the_same_dims_as_in_the_layers() -> None:
    shape = (2, 4, 3, 5, 7)
    assert cost.slice_attention_cost(shape, "Axial") == cost.slice_attention_cost(shape, 2)
    assert cost.rsa_cost(shape, order=("coronal", "sagittal", "axial")) == cost.rsa_cost(shape)


def test_unet_shapes_halve_each_level() -> None:
    shapes = cost.unet_shapes((48, 160, 160), filters=(32, 64, 128, 256, 512), batch=2)
    assert shapes[0] == (2, 32, 48, 160, 160)
    assert shapes[-1] == (2, 512, 3, 10, 10)
    assert [s[1] for s in shapes] == [32, 64, 128, 256, 512]


def test_comparison_ratios_are_the_paper_formulas() -> None:
    shape = (1, 512, 3, 10, 10)
    c = cost.compare(shape)
    n = 3 * 10 * 10
    assert c.map_memory_ratio == pytest.approx(n * n / (3**2 + 10**2 + 10**2))
    # maps: 4*C'*N^2 (C' = C/2) against 4*C*N*(D+H+W)
    assert c.map_flop_ratio == pytest.approx(4 * 256 * n * n / (4 * 512 * n * (3 + 10 + 10)))
    assert c.block_flop_ratio == pytest.approx(cost.nonlocal_cost(shape).forward / cost.rsa_cost(shape).forward)
    twice = c + c
    assert twice.map_memory_ratio == pytest.approx(c.map_memory_ratio)
    assert twice.rsa_block.forward == 2 * c.rsa_block.forward


def test_cost_table_has_one_row_per_shape_with_the_ratios() -> None:
    shapes = cost.unet_shapes((48, 160, 160))[3:]
    lines = cost.cost_table(shapes).splitlines()
    assert len(lines) == 2 + len(shapes)
    bottom = lines[-1].split(" | ")
    assert bottom[0] == "| 1×512×3×10×10"
    assert bottom[3] == f"{cost.compare(shapes[-1]).map_memory_ratio:,.0f}"
    lean = cost.cost_table(shapes, qk_channels=32, project_once=True).splitlines()[-1].split(" | ")
    assert float(lean[-1].rstrip(" |")) > float(bottom[-1].rstrip(" |"))


def test_format_bytes_units() -> None:
    assert cost.format_bytes(836) == "836 B"
    assert cost.format_bytes(3 * 2**20 / 2) == "1.5 MiB"
    assert cost.format_bytes(22 * 2**30) == "22.0 GiB"
