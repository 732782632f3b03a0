"""The PyTorch layer contract: empty tensors, the meta device, dtype mismatches, option spelling."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sliceattn import NonLocal3d, RecurrentSliceAttention3d, SliceAttention3d, slice_attention

BUILDERS = {
    "sa": lambda: SliceAttention3d(4, "coronal", alpha_init=0.5),
    "rsa": lambda: RecurrentSliceAttention3d(4, alpha_init=0.5),
    "rsa-reference": lambda: RecurrentSliceAttention3d(4, alpha_init=0.5, impl="reference", scale="auto"),
    "rsa-noproj-once": lambda: RecurrentSliceAttention3d(4, alpha_init=0.5, projection=False, checkpoint=True),
    "nonlocal": lambda: NonLocal3d(4),
}
EMPTY_SHAPES = [(0, 4, 3, 4, 5), (2, 4, 0, 4, 5), (2, 4, 3, 0, 5), (2, 4, 3, 4, 0), (0, 4, 0, 0, 0)]


@pytest.mark.parametrize("shape", EMPTY_SHAPES, ids=str)
@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_empty_input_gives_empty_output_with_gradients(name: str, shape: tuple[int, ...]) -> None:
    block = BUILDERS[name]()
    x = torch.randn(shape, requires_grad=True)
    out = block(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    out.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape
    # like nn.Conv3d: parameters get (zero) gradients, not None
    for parameter in block.parameters():
        assert parameter.grad is not None and not parameter.grad.any()


def test_empty_batch_matches_conv3d_contract() -> None:
    x = torch.randn(0, 4, 3, 4, 5, requires_grad=True)
    assert nn.Conv3d(4, 4, 1)(x).shape == RecurrentSliceAttention3d(4)(x).shape


@pytest.mark.parametrize("impl", ["fused", "reference"])
@pytest.mark.parametrize("scale", [None, "auto"])
@pytest.mark.parametrize("shape", [(0, 2, 3, 4), (2, 2, 0, 4), (2, 2, 3, 0), (2, 0, 3, 4)], ids=str)
def test_functional_empty_inputs(shape: tuple[int, ...], scale: object, impl: str) -> None:
    query = torch.randn(shape, requires_grad=True)
    residual = torch.randn(shape, requires_grad=True)
    alpha = torch.tensor(0.5, requires_grad=True)
    for axis in (2, 3):
        out = slice_attention(query, query, query, axis, residual=residual, alpha=alpha, scale=scale, impl=impl)
        assert out.shape == shape
        out.sum().backward()
        assert query.grad is not None and query.grad.shape == shape
        assert alpha.grad is not None and alpha.grad == 0


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_meta_device_builds_and_infers_shapes(name: str) -> None:
    with torch.device("meta"):
        block = BUILDERS[name]()
    assert all(parameter.is_meta for parameter in block.parameters())
    x = torch.empty(2, 4, 3, 5, 6, device="meta")
    out = block(x)
    assert out.is_meta and out.shape == x.shape
    # deferred initialisation: materialise on the CPU, then the block runs for real
    block.to_empty(device="cpu")
    if hasattr(block, "alpha"):
        nn.init.zeros_(block.alpha)
    assert block(torch.randn(2, 4, 3, 5, 6)).shape == x.shape


def test_meta_device_functional() -> None:
    q = torch.empty(2, 3, 4, 5, 6, device="meta")
    for impl in ("fused", "reference"):
        out = slice_attention(q, q, q, "axial", residual=q, alpha=torch.zeros((), device="meta"), impl=impl)
        assert out.is_meta and out.shape == q.shape


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_input_dtype_other_than_the_parameters_is_a_clear_type_error(name: str, dtype: torch.dtype) -> None:
    block = BUILDERS[name]()
    with pytest.raises(TypeError, match=f"input has dtype {dtype}, but the block's parameters are torch.float32"):
        block(torch.randn(1, 4, 3, 4, 5, dtype=dtype))


def test_input_dtype_of_the_parameters_and_autocast_are_accepted() -> None:
    block = RecurrentSliceAttention3d(4, alpha_init=0.5, dtype=torch.float64)
    assert block(torch.randn(1, 4, 3, 4, 5, dtype=torch.float64)).dtype == torch.float64
    # under autocast the input may be in the autocast dtype (the previous layer's output)
    block = RecurrentSliceAttention3d(4, alpha_init=0.5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(block(torch.randn(1, 4, 3, 4, 5, dtype=torch.bfloat16)).float()).all()


@pytest.mark.parametrize("spelling", ["auto", "Auto", "AUTO"])
def test_scale_and_impl_are_case_insensitive_like_axis_names(spelling: str) -> None:
    x = torch.randn(1, 2, 3, 4, 5, dtype=torch.float64)
    expected = slice_attention(x, x, x, "axial", scale="auto")
    torch.testing.assert_close(slice_attention(x, x, x, "AXIAL", scale=spelling, impl="Reference"), expected)
    block = SliceAttention3d(2, "Axial", scale=spelling, impl="FUSED", dtype=torch.float64)
    assert block.scale == "auto" and block.impl == "fused"
    assert RecurrentSliceAttention3d(2, order=("Coronal", "SAGITTAL"), scale=spelling).order == ("coronal", "sagittal")
