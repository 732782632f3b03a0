"""The PyTorch layer contract: empty tensors, the meta device, dtype mismatches, option spelling."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sliceattn import NonLocal3d, QKVProjection, RecurrentSliceAttention3d, SliceAttention3d, slice_attention

BUILDERS = {
    "sa": lambda: SliceAttention3d(4, "coronal", alpha_init=0.5),
    "rsa": lambda: RecurrentSliceAttention3d(4, alpha_init=0.5),
    "rsa-reference": lambda: RecurrentSliceAttention3d(4, alpha_init=0.5, impl="reference", scale="auto"),
    "rsa-noproj-once": lambda: RecurrentSliceAttention3d(4, alpha_init=0.5, projection=False, checkpoint=True),
    "nonlocal": lambda: NonLocal3d(4),
    "nonlocal-subsample": lambda: NonLocal3d(4, sub_sample=True),
}
#: every layer with parameters, at its default (identity) initialisation; factory kwargs pass through
IDENTITY_BUILDERS = {
    "sa": lambda **factory: SliceAttention3d(4, "coronal", **factory),
    "sa-noproj": lambda **factory: SliceAttention3d(4, "axial", projection=False, **factory),
    "rsa": lambda **factory: RecurrentSliceAttention3d(4, **factory),
    "rsa-qk-once": lambda **factory: RecurrentSliceAttention3d(4, qk_channels=2, project_once=True, **factory),
    "rsa-noproj": lambda **factory: RecurrentSliceAttention3d(4, projection=False, **factory),
    "nonlocal": lambda **factory: NonLocal3d(4, **factory),
    "nonlocal-nonorm": lambda **factory: NonLocal3d(4, norm=False, **factory),
    "nonlocal-subsample": lambda **factory: NonLocal3d(4, sub_sample=True, inter_channels=3, **factory),
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
    # deferred initialisation: materialise on the CPU, initialise, then the block runs for real
    block.to_empty(device="cpu")
    block.reset_parameters()
    out = block(torch.randn(2, 4, 3, 5, 6))
    assert out.shape == x.shape and torch.isfinite(out).all()


def _meta_then_cpu(name: str, how: str) -> nn.Module:
    """The block of ``name`` built on the meta device (three ways), materialised on the CPU (uninitialised)."""
    if how == "device":
        block = IDENTITY_BUILDERS[name](device="meta")
    elif how == "context":
        with torch.device("meta"):
            block = IDENTITY_BUILDERS[name]()
    else:
        block = IDENTITY_BUILDERS[name]().to("meta")
    assert all(tensor.is_meta for tensor in block.state_dict().values())
    return block.to_empty(device="cpu")


def _assert_same_state(block: nn.Module, expected: nn.Module) -> None:
    state, expected_state = block.state_dict(), expected.state_dict()
    assert state.keys() == expected_state.keys()
    for key, value in expected_state.items():
        assert torch.equal(state[key], value), key


@pytest.mark.parametrize("how", ["device", "context", "to"])
@pytest.mark.parametrize("name", sorted(IDENTITY_BUILDERS))
def test_reset_parameters_after_meta_initialisation_gives_the_new_block(name: str, how: str) -> None:
    block = _meta_then_cpu(name, how)
    torch.manual_seed(1)
    block.reset_parameters()
    torch.manual_seed(1)
    _assert_same_state(block, IDENTITY_BUILDERS[name]())  # the same draws as a new block's
    assert all(torch.isfinite(tensor).all() for tensor in block.state_dict().values())
    x = torch.randn(2, 4, 3, 4, 5)
    assert torch.equal(block(x), x)
    assert torch.equal(block.eval()(x), x)


def test_projections_are_drawn_as_conv3d_default_init() -> None:
    torch.manual_seed(2)
    conv = nn.Conv3d(4, 2 * 3 + 4, 1)
    for projection in (QKVProjection(4, 3, device="meta").to_empty(device="cpu"), RecurrentSliceAttention3d(4, qk_channels=3).projection):
        torch.manual_seed(2)
        projection.reset_parameters()
        assert torch.equal(projection.weight, conv.weight) and torch.equal(projection.bias, conv.bias)
    # NonLocal3d: theta, phi, g and W's convolution, drawn in that order like plain nn.Conv3d
    torch.manual_seed(2)
    convs = [nn.Conv3d(4, 2, 1) for _ in range(3)] + [nn.Conv3d(2, 4, 1)]
    torch.manual_seed(2)
    block = NonLocal3d(4)
    for mine, plain in zip((block.theta, block.phi, block.g, block.W[0]), convs):
        assert torch.equal(mine.weight, plain.weight) and torch.equal(mine.bias, plain.bias)


@pytest.mark.parametrize("name", sorted(IDENTITY_BUILDERS))
def test_reset_parameters_restores_a_trained_block(name: str) -> None:
    block = IDENTITY_BUILDERS[name]()
    x = torch.randn(2, 4, 3, 4, 5)
    with torch.no_grad():
        for parameter in block.parameters():
            parameter.add_(torch.randn_like(parameter))  # what training does to them
        block(x)  # and to a norm's running statistics
    assert not torch.equal(block(x), x)
    block.reset_parameters()
    assert torch.equal(block(x), x) and torch.equal(block.eval()(x), x)


def test_reset_parameters_restores_alpha_init() -> None:
    for block, shape in ((RecurrentSliceAttention3d(4, alpha_init=0.25), (3,)), (SliceAttention3d(4, 2, alpha_init=0.25), ())):
        with torch.no_grad():
            block.alpha.normal_()
        block.reset_parameters()
        assert torch.equal(block.alpha, torch.full(shape, 0.25))


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
