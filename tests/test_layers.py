"""SliceAttention3d and RecurrentSliceAttention3d: semantics, reference compatibility, export."""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from benchmarks.baselines import AXIS_DIM, NaiveRSABlock, naive_slice_attention
from sliceattn import QKVProjection, RecurrentSliceAttention3d, SliceAttention3d

AXES = ("axial", "coronal", "sagittal")


def randomize_(module: torch.nn.Module) -> torch.nn.Module:
    """Give every parameter (gates included) a random value, so no path hides behind alpha = 0."""
    with torch.no_grad():
        for param in module.parameters():
            param.normal_(0.0, 0.3)
    return module


@st.composite
def feature_map(draw: st.DrawFn) -> torch.Tensor:
    shape = (draw(st.integers(1, 2)), draw(st.integers(1, 4)), *draw(st.lists(st.integers(1, 5), min_size=3, max_size=3)))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    return torch.randn(shape, generator=gen, dtype=torch.float64)


def rsa_reference_loop(block: RecurrentSliceAttention3d, x: torch.Tensor) -> torch.Tensor:
    """RSA written from the paper with separate 1x1x1 convolutions and the naive core."""
    channels, weight, bias = block.channels, block.projection.weight, block.projection.bias
    for step, dim in enumerate(block.dims):
        q, k, v = (torch.nn.functional.conv3d(x, weight[i * channels:(i + 1) * channels], bias[i * channels:(i + 1) * channels]) for i in range(3))
        x = x + block.alpha[step] * naive_slice_attention(q, k, v, dim)
    return x


@given(feature_map(), st.sampled_from(AXES), st.booleans())
def test_slice_attention_block_shape_dtype_identity_at_init(x: torch.Tensor, axis: str, projection: bool) -> None:
    block = SliceAttention3d(x.shape[1], axis, projection=projection, dtype=torch.float64)
    out = block(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.equal(out, x)  # alpha = 0: exactly the identity
    rsa = RecurrentSliceAttention3d(x.shape[1], projection=projection, dtype=torch.float64)
    assert torch.equal(rsa(x), x)


@given(feature_map(), st.sampled_from(["fused", "reference"]))
def test_rsa_equals_step_by_step_definition(x: torch.Tensor, impl: str) -> None:
    block = randomize_(RecurrentSliceAttention3d(x.shape[1], impl=impl, dtype=torch.float64))
    torch.testing.assert_close(block(x), rsa_reference_loop(block, x))


@given(feature_map(), st.sampled_from(AXES))
def test_slice_block_equals_definition(x: torch.Tensor, axis: str) -> None:
    block = randomize_(SliceAttention3d(x.shape[1], axis, dtype=torch.float64))
    c = x.shape[1]
    q, k, v = torch.nn.functional.conv3d(x, block.projection.weight, block.projection.bias).split(c, 1)
    torch.testing.assert_close(block(x), x + block.alpha * naive_slice_attention(q, k, v, AXIS_DIM[axis]))


@given(feature_map(), st.sampled_from(AXES), st.data())
def test_block_permutation_equivariance(x: torch.Tensor, axis: str, data) -> None:
    dim = AXIS_DIM[axis]
    block = randomize_(SliceAttention3d(x.shape[1], axis, dtype=torch.float64))
    perm = torch.tensor(data.draw(st.permutations(range(x.shape[dim]))))
    torch.testing.assert_close(block(x.index_select(dim, perm)), block(x).index_select(dim, perm))


@given(feature_map(), st.sampled_from(AXES), st.sampled_from(AXES))
def test_block_transpose_equivariance(x: torch.Tensor, axis: str, other: str) -> None:
    dim, other_dim = AXIS_DIM[axis], AXIS_DIM[other]
    block = randomize_(SliceAttention3d(x.shape[1], axis, dtype=torch.float64))
    swapped = SliceAttention3d(x.shape[1], other, dtype=torch.float64)
    swapped.load_state_dict(block.state_dict())
    torch.testing.assert_close(swapped(x.transpose(dim, other_dim)), block(x).transpose(dim, other_dim))


@pytest.mark.parametrize("cls", ["slice", "recurrent"])
@pytest.mark.parametrize("projection", [True, False])
def test_gradcheck_blocks(cls: str, projection: bool) -> None:
    x = torch.randn(1, 2, 3, 4, 3, dtype=torch.float64, requires_grad=True)
    if cls == "slice":
        block = SliceAttention3d(2, "coronal", projection=projection, scale="auto", dtype=torch.float64)
    else:
        block = RecurrentSliceAttention3d(2, projection=projection, scale="auto", dtype=torch.float64)
    randomize_(block)
    params = tuple(block.parameters())
    assert torch.autograd.gradcheck(lambda inp, *p: torch.func.functional_call(block, dict(zip(dict(block.named_parameters()), p)), (inp,)), (x, *params))


def test_from_reference_state_dict_reproduces_reference_block() -> None:
    reference = randomize_(NaiveRSABlock(6).double())
    block = RecurrentSliceAttention3d.from_reference_state_dict(reference.state_dict())
    assert block.channels == 6 and block.order == ("coronal", "sagittal", "axial")
    x = torch.randn(2, 6, 5, 4, 7, dtype=torch.float64)
    torch.testing.assert_close(block(x), reference(x), rtol=1e-12, atol=1e-12)
    # float32, as a user would load a released checkpoint: equal to round-off
    reference32 = reference.float()
    block32 = RecurrentSliceAttention3d.from_reference_state_dict(reference32.state_dict())
    torch.testing.assert_close(block32(x.float()), reference32(x.float()), rtol=1e-5, atol=1e-5)


def test_from_reference_state_dict_errors() -> None:
    state = NaiveRSABlock(4).state_dict()
    with pytest.raises(KeyError, match=r"missing keys \['betas.2'\]"):
        RecurrentSliceAttention3d.from_reference_state_dict({k: v for k, v in state.items() if k != "betas.2"})
    with pytest.raises(KeyError, match=r"unexpected keys \['extra.weight'\]"):
        RecurrentSliceAttention3d.from_reference_state_dict({**state, "extra.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="g_conv must be a 4->4"):
        RecurrentSliceAttention3d.from_reference_state_dict({**state, "g_conv.weight": torch.zeros(4, 3, 1, 1, 1)})
    with pytest.raises(ValueError, match="fixes"):
        RecurrentSliceAttention3d.from_reference_state_dict(state, order=("axial",))


@pytest.mark.parametrize(
    ("option", "value"),
    [("order", ("axial", "coronal", "sagittal")), ("projection", False), ("qk_channels", 2), ("project_once", True), ("alpha_init", 0.0)],
)
def test_from_reference_state_dict_refuses_each_structural_option(option: str, value: object) -> None:
    with pytest.raises(ValueError, match=rf"fixes \['{option}'\] to the reference's values"):
        RecurrentSliceAttention3d.from_reference_state_dict(NaiveRSABlock(4).state_dict(), **{option: value})


def test_from_reference_state_dict_scale_device_and_dtype() -> None:
    reference = randomize_(NaiveRSABlock(4).double())
    state = reference.state_dict()
    x = torch.randn(2, 4, 3, 5, 4, dtype=torch.float64)
    # scale is accepted, as documented: the scaled variant with the reference's weights (another function)
    scaled = RecurrentSliceAttention3d.from_reference_state_dict(state, scale="auto")
    by_hand = RecurrentSliceAttention3d(4, scale="auto", dtype=torch.float64)
    by_hand.load_state_dict(RecurrentSliceAttention3d.from_reference_state_dict(state).state_dict())
    assert scaled.scale == "auto"
    torch.testing.assert_close(scaled(x), by_hand(x), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(scaled(x), reference(x))
    # device and dtype pass through and convert the weights (they collided with the weights' own)
    block = RecurrentSliceAttention3d.from_reference_state_dict(state, device="cpu", dtype=torch.float32, impl="reference")
    assert block.alpha.dtype == block.projection.weight.dtype == torch.float32 and block.impl == "reference"
    torch.testing.assert_close(block(x.float()), reference(x).float(), rtol=1e-5, atol=1e-5)


def test_state_dict_round_trip() -> None:
    block = randomize_(RecurrentSliceAttention3d(4, qk_channels=2))
    buffer = io.BytesIO()
    torch.save(block.state_dict(), buffer)
    buffer.seek(0)
    clone = RecurrentSliceAttention3d(4, qk_channels=2)
    clone.load_state_dict(torch.load(buffer))
    x = torch.randn(2, 4, 3, 5, 4)
    assert torch.equal(clone(x), block(x))
    assert set(block.state_dict()) == {"alpha", "projection.weight", "projection.bias"}


def test_options_change_the_function_as_documented() -> None:
    x = torch.randn(1, 4, 3, 4, 5, dtype=torch.float64)
    base = randomize_(RecurrentSliceAttention3d(4, dtype=torch.float64))
    once = RecurrentSliceAttention3d(4, project_once=True, dtype=torch.float64)
    once.load_state_dict(base.state_dict())
    assert not torch.allclose(once(x), base(x))
    # project_once: all steps use the input's projections
    q, k, v = once.projection(x)
    expected = x
    for step, dim in enumerate(once.dims):
        expected = expected + once.alpha[step] * naive_slice_attention(q, k, v, dim)
    torch.testing.assert_close(once(x), expected)
    # qk_channels: query/key have fewer channels, value keeps all
    lean = randomize_(RecurrentSliceAttention3d(4, qk_channels=1, dtype=torch.float64))
    q, k, v = lean.projection(x)
    assert q.shape[1] == k.shape[1] == 1 and v.shape[1] == 4
    assert lean(x).shape == x.shape
    # projection=False: the paper's equations, M itself as query, key and value
    bare = randomize_(SliceAttention3d(4, "sagittal", projection=False, dtype=torch.float64))
    torch.testing.assert_close(bare(x), x + bare.alpha * naive_slice_attention(x, x, x, 4))


def test_checkpoint_mode_gives_same_values_and_gradients() -> None:
    x = torch.randn(2, 3, 4, 5, 3, dtype=torch.float64, requires_grad=True)
    plain = randomize_(RecurrentSliceAttention3d(3, dtype=torch.float64))
    recomputed = RecurrentSliceAttention3d(3, checkpoint=True, dtype=torch.float64)
    recomputed.load_state_dict(plain.state_dict())
    results = []
    for block in (plain, recomputed):
        out = block(x)
        results.append((out, *torch.autograd.grad(out.pow(2).sum(), (x, *block.parameters()))))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("layout", ["channels_last_3d", "non_contiguous"])
def test_strided_input_matches_contiguous(layout: str) -> None:
    block = randomize_(RecurrentSliceAttention3d(3, dtype=torch.float64))
    x = torch.randn(2, 3, 4, 5, 6, dtype=torch.float64)
    strided = x.to(memory_format=torch.channels_last_3d) if layout == "channels_last_3d" else x.transpose(2, 4).contiguous().transpose(2, 4)
    assert not strided.is_contiguous()
    torch.testing.assert_close(block(strided), block(x))


def test_compile_fullgraph_matches_eager() -> None:
    block = randomize_(RecurrentSliceAttention3d(4))
    x = torch.randn(2, 4, 3, 5, 6, requires_grad=True)
    compiled = torch.compile(block, fullgraph=True)
    out_eager, out_compiled = block(x), compiled(x)
    torch.testing.assert_close(out_compiled, out_eager, rtol=1e-5, atol=1e-5)
    grad_eager = torch.autograd.grad(out_eager.sum(), x)[0]
    grad_compiled = torch.autograd.grad(out_compiled.sum(), x)[0]
    torch.testing.assert_close(grad_compiled, grad_eager, rtol=1e-4, atol=1e-5)


def test_jit_trace_and_export_match_eager_and_script_is_refused() -> None:
    block = randomize_(RecurrentSliceAttention3d(4)).eval()
    x = torch.randn(1, 4, 3, 5, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(block, x)
        torch.testing.assert_close(traced(x), block(x))
        exported = torch.export.export(block, (x,))
        torch.testing.assert_close(exported.module()(x), block(x))
        # TorchScript cannot compile torch.autograd.Function (documented in docs/api.md)
        with pytest.raises(Exception):
            torch.jit.script(block)


def test_modules_on_device(device: torch.device) -> None:
    x = torch.randn(2, 4, 3, 5, 6, device=device)
    for impl in ("fused", "reference"):
        block = RecurrentSliceAttention3d(4, impl=impl, alpha_init=0.5, device=device)
        assert block(x).device.type == device.type
    fused = randomize_(RecurrentSliceAttention3d(4, device=device))
    reference = RecurrentSliceAttention3d(4, impl="reference", device=device)
    reference.load_state_dict(fused.state_dict())
    torch.testing.assert_close(fused(x), reference(x), rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="DataParallel replicas need CUDA")
def test_data_parallel_replica_keeps_gates() -> None:
    # the gates are one plain Parameter, which replicas receive (an nn.ParameterList would be empty)
    block = randomize_(RecurrentSliceAttention3d(3)).cuda()
    (replica,) = torch.nn.parallel.replicate(block, [0])
    x = torch.randn(1, 3, 3, 4, 5, device="cuda")
    torch.testing.assert_close(replica(x), block(x))


@pytest.mark.parametrize(
    ("build", "error", "fragment"),
    [
        (lambda: SliceAttention3d(0, "axial"), ValueError, "channels must be >= 1"),
        (lambda: SliceAttention3d(4.0, "axial"), TypeError, "channels must be an int"),
        (lambda: SliceAttention3d(4, "front"), ValueError, "not an axis name"),
        (lambda: SliceAttention3d(4, 1), ValueError, "not a spatial axis"),
        (lambda: SliceAttention3d(4, "axial", projection=False, qk_channels=2), ValueError, "needs projection=True"),
        (lambda: SliceAttention3d(4, "axial", scale=0.0), ValueError, "finite positive"),
        (lambda: SliceAttention3d(4, "axial", impl="triton"), ValueError, "impl='triton'"),
        (lambda: SliceAttention3d(4, "axial", projection="yes"), TypeError, "projection must be a bool"),
        (lambda: RecurrentSliceAttention3d(4, order=("axial", "axial")), ValueError, "distinct axes"),
        (lambda: RecurrentSliceAttention3d(4, order="axial"), TypeError, "order must be a non-empty sequence"),
        (lambda: RecurrentSliceAttention3d(4, order=("axial", "up")), ValueError, "order='up'"),
        (lambda: RecurrentSliceAttention3d(4, projection=False, project_once=True), ValueError, "project_once"),
        (lambda: RecurrentSliceAttention3d(4, qk_channels=0), ValueError, "qk_channels must be >= 1"),
        (lambda: RecurrentSliceAttention3d(4, impl="auto"), ValueError, "impl='auto' is not supported"),
        (lambda: RecurrentSliceAttention3d(4, save_attention=1), TypeError, "save_attention must be a bool"),
        (lambda: RecurrentSliceAttention3d(4, alpha_init=float("nan")), ValueError, "alpha_init must be a finite number, got nan"),
        (lambda: SliceAttention3d(4, "axial", alpha_init=float("-inf")), ValueError, "alpha_init must be a finite number, got -inf"),
        (lambda: RecurrentSliceAttention3d(4, alpha_init="0.5"), TypeError, "alpha_init must be a float, got str"),
        (lambda: RecurrentSliceAttention3d(4, alpha_init=True), TypeError, "alpha_init must be a float, got bool"),
        (lambda: SliceAttention3d(4, "axial", scale=float("nan")), ValueError, "scale must be a finite positive number, got nan"),
        (lambda: RecurrentSliceAttention3d(4, scale=float("inf")), ValueError, "scale must be a finite positive number, got inf"),
        (lambda: QKVProjection(0, 2), ValueError, "channels must be >= 1, got 0"),
        (lambda: QKVProjection(4, 2.0), TypeError, "qk_channels must be an int, got float"),
    ],
)
def test_bad_options_raise(build, error: type, fragment: str) -> None:
    with pytest.raises(error, match=fragment):
        build()


@pytest.mark.parametrize(
    ("x", "error", "fragment"),
    [
        (torch.randn(1, 4, 3, 3), ValueError, "must be 5-D"),
        (torch.randn(1, 3, 3, 3, 3), ValueError, "3 channels, but the block was built for channels=4"),
        (torch.ones(1, 4, 3, 3, 3, dtype=torch.int32), TypeError, "floating dtype"),
        ("tensor", TypeError, "torch.Tensor"),
    ],
)
def test_bad_input_raises(x, error: type, fragment: str) -> None:
    for block in (SliceAttention3d(4, "axial"), RecurrentSliceAttention3d(4)):
        with pytest.raises(error, match=fragment):
            block(x)
