"""slice_attention: the fused path against the einops reference and a loop-level ground truth."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from sliceattn import slice_attention


@st.composite
def qkv_case(draw: st.DrawFn, max_spatial_dims: int = 3):
    """Random (B, C, *spatial) query/key/value in float64, an axis and a scale."""
    spatial = draw(st.lists(st.integers(1, 5), min_size=1, max_size=max_spatial_dims))
    batch, channels, value_channels = draw(st.integers(1, 2)), draw(st.integers(1, 4)), draw(st.integers(1, 4))
    axis = draw(st.integers(2, 1 + len(spatial)))
    scale = draw(st.sampled_from([None, "auto", 0.3]))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, channels, *spatial)
    query, key = (torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(2))
    value = torch.randn((batch, value_channels, *spatial), generator=gen, dtype=torch.float64)
    return query, key, value, axis, scale


def loop_slice_attention(query, key, value, dim, scale=1.0):
    """Ground truth written slice by slice with Python loops (no reshapes to get wrong)."""
    length = query.shape[dim]
    out = torch.zeros_like(value)
    for b in range(query.shape[0]):
        q = [query[b].select(dim - 1, i) for i in range(length)]
        k = [key[b].select(dim - 1, j) for j in range(length)]
        v = [value[b].select(dim - 1, j) for j in range(length)]
        for i in range(length):
            weights = torch.softmax(torch.stack([scale * (q[i] * k[j]).sum() for j in range(length)]), 0)
            out[b].select(dim - 1, i).copy_(sum(w * vj for w, vj in zip(weights, v)))
    return out


@given(qkv_case())
def test_fused_equals_reference(case) -> None:
    query, key, value, axis, scale = case
    fused = slice_attention(query, key, value, axis, scale=scale, impl="fused")
    reference = slice_attention(query, key, value, axis, scale=scale, impl="reference")
    assert fused.shape == value.shape and fused.dtype == value.dtype
    torch.testing.assert_close(fused, reference, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("impl", ["fused", "reference"])
@pytest.mark.parametrize("axis", [2, 3, 4])
def test_matches_loop_ground_truth(impl: str, axis: int) -> None:
    query, key, value = (torch.randn(2, 3, 4, 3, 5, dtype=torch.float64) for _ in range(3))
    expected = loop_slice_attention(query, key, value, axis, scale=0.2)
    torch.testing.assert_close(slice_attention(query, key, value, axis, scale=0.2, impl=impl), expected)


@given(qkv_case())
def test_fused_gradients_equal_reference(case) -> None:
    query, key, value, axis, scale = case
    inputs = [t.clone().requires_grad_() for t in (query, key, value)]
    residual = torch.randn_like(value, requires_grad=True)
    alpha = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    grads = []
    for impl in ("fused", "reference"):
        out = slice_attention(*inputs, axis, residual=residual, alpha=alpha, scale=scale, impl=impl)
        grads.append(torch.autograd.grad((out * torch.cos(out)).sum(), [*inputs, residual, alpha]))
    for fused, reference in zip(*grads):
        torch.testing.assert_close(fused, reference, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("axis", [2, 3, 4])
def test_gradcheck(axis: int) -> None:
    shape = (2, 2, 3, 4, 3)
    query, key, value, residual = (torch.randn(shape, dtype=torch.float64, requires_grad=True) for _ in range(4))
    alpha = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q, k, v: slice_attention(q, k, v, axis), (query, key, value))
    assert torch.autograd.gradcheck(
        lambda r, a, q, k, v: slice_attention(q, k, v, axis, residual=r, alpha=a, scale="auto"),
        (residual, alpha, query, key, value),
    )


def test_same_tensor_as_query_key_value_accumulates_gradients() -> None:
    # projection-free blocks pass one tensor three times: autograd must sum the three paths
    x = torch.randn(1, 2, 3, 4, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: slice_attention(t, t, t, 3), (x,))


def test_double_backward_is_refused() -> None:
    x = torch.randn(1, 2, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(slice_attention(x, x, x, 2).pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="(?i)differentiable"):
        grad.sum().backward()


@given(qkv_case(), st.data())
def test_permuting_slices_permutes_output(case, data) -> None:
    query, key, value, axis, scale = case
    perm = torch.tensor(data.draw(st.permutations(range(query.shape[axis]))))
    out = slice_attention(query, key, value, axis, scale=scale)
    permuted = slice_attention(*(t.index_select(axis, perm) for t in (query, key, value)), axis, scale=scale)
    torch.testing.assert_close(permuted, out.index_select(axis, perm))


@given(qkv_case(max_spatial_dims=3), st.data())
def test_transposed_input_gives_transposed_output(case, data) -> None:
    query, key, value, axis, scale = case
    spatial = list(range(2, query.dim()))
    other = data.draw(st.sampled_from(spatial))
    swap = [t.transpose(axis, other) for t in (query, key, value)]
    out = slice_attention(query, key, value, axis, scale=scale)
    torch.testing.assert_close(slice_attention(*swap, other, scale=scale), out.transpose(axis, other))


@given(qkv_case())
def test_output_slices_are_convex_combinations_of_value_slices(case) -> None:
    query, key, value, axis, scale = case
    out = slice_attention(query, key, value, axis, scale=scale)
    low = value.amin(dim=axis, keepdim=True)
    high = value.amax(dim=axis, keepdim=True)
    assert bool(((out >= low - 1e-12) & (out <= high + 1e-12)).all())
    # constant value slices stay constant: the weights sum to one
    constant = value.narrow(axis, 0, 1).expand_as(value).contiguous()
    torch.testing.assert_close(slice_attention(query, key, constant, axis, scale=scale), constant)


@pytest.mark.parametrize("layout", ["channels_last_3d", "transposed", "sliced"])
def test_strided_inputs_match_contiguous(layout: str) -> None:
    base = torch.randn(2, 3, 4, 5, 6, dtype=torch.float64)
    if layout == "channels_last_3d":
        strided = base.to(memory_format=torch.channels_last_3d)
    elif layout == "transposed":
        strided = base.transpose(3, 4).contiguous().transpose(3, 4)
    else:
        strided = torch.randn(2, 6, 4, 5, 6, dtype=torch.float64)[:, ::2].copy_(base)
    assert not strided.is_contiguous()
    for axis in (2, 3, 4):
        for impl in ("fused", "reference"):
            torch.testing.assert_close(
                slice_attention(strided, strided, strided, axis, impl=impl), slice_attention(base, base, base, axis)
            )


def test_axis_names_and_negative_indices() -> None:
    q = torch.randn(1, 2, 3, 4, 5, dtype=torch.float64)
    for name, dim in (("axial", 2), ("coronal", 3), ("sagittal", 4)):
        expected = slice_attention(q, q, q, dim)
        torch.testing.assert_close(slice_attention(q, q, q, name), expected)
        torch.testing.assert_close(slice_attention(q, q, q, dim - 5), expected)


def attention_map(query: torch.Tensor, key: torch.Tensor, **kwargs) -> torch.Tensor:
    """Read the (B, L, L) map of axis D back through one-hot value slices: out[:, j, i] = A[i, j]."""
    length = query.shape[2]
    value = torch.eye(length, dtype=query.dtype)[None, :, :, None, None].expand(query.shape[0], -1, -1, *query.shape[3:])
    return slice_attention(query, key, value, 2, **kwargs)[:, :, :, 0, 0].transpose(1, 2)


def test_attention_map_rows_are_distributions() -> None:
    query, key = torch.randn(2, 3, 5, 2, 2, dtype=torch.float64), torch.randn(2, 3, 5, 2, 2, dtype=torch.float64)
    weights = attention_map(query, key, scale=0.1)
    logits = torch.einsum("bcihw,bcjhw->bij", query, key) * 0.1
    torch.testing.assert_close(weights, torch.softmax(logits, -1))


def test_unscaled_logits_saturate_and_auto_scale_softens() -> None:
    # why scale="auto" exists: with C*H*W = 2048 the paper's unscaled softmax is ~one-hot
    query, key = torch.randn(1, 8, 6, 16, 16, dtype=torch.float64), torch.randn(1, 8, 6, 16, 16, dtype=torch.float64)
    assert attention_map(query, key).amax(-1).mean() > 0.99
    assert attention_map(query, key, scale="auto").amax(-1).mean() < 0.9


@pytest.mark.parametrize(
    ("kwargs", "error", "fragment"),
    [
        ({"query": torch.randn(2, 3)}, ValueError, "at least one spatial dim"),
        ({"query": torch.ones(1, 2, 3, 3, 3, dtype=torch.int64)}, TypeError, "floating dtype"),
        ({"query": [1.0]}, TypeError, "torch.Tensor"),
        ({"key": torch.randn(1, 3, 3, 3, 3)}, ValueError, "same shape"),
        ({"value": torch.randn(1, 2, 3, 3, 4)}, ValueError, "spatial shape"),
        ({"value": torch.randn(2, 2, 3, 3, 3)}, ValueError, "batch"),
        ({"axis": 1}, ValueError, "not a spatial axis"),
        ({"axis": 5}, ValueError, "not a spatial axis"),
        ({"axis": -4}, ValueError, "not a spatial axis"),
        ({"axis": "frontal"}, ValueError, "not an axis name"),
        ({"axis": 2.0}, TypeError, "axis must be an int"),
        ({"scale": -1.0}, ValueError, "finite positive"),
        ({"scale": "sqrt"}, ValueError, "scale='sqrt'"),
        ({"impl": "cuda"}, ValueError, "impl='cuda'"),
        ({"impl": "auto"}, ValueError, "impl='auto' is not supported"),
    ],
)
def test_bad_input_raises_clear_error(kwargs: dict, error: type, fragment: str) -> None:
    args = {"query": torch.randn(1, 2, 3, 3, 3), "key": None, "value": None, "axis": 2}
    args.update(kwargs)
    query = args.pop("query")
    key = args.pop("key") if args["key"] is not None else query
    value = args.pop("value") if args["value"] is not None else query
    args.pop("key", None), args.pop("value", None)
    axis = args.pop("axis")
    with pytest.raises(error, match=fragment):
        slice_attention(query, key, value, axis, **args)


def test_axis_names_need_five_dims() -> None:
    q = torch.randn(1, 2, 3, 4)
    with pytest.raises(ValueError, match="5-D"):
        slice_attention(q, q, q, "axial")


def test_residual_checks() -> None:
    q = torch.randn(1, 2, 3, 3, 3)
    with pytest.raises(ValueError, match="residual must have value's shape"):
        slice_attention(q, q, q, 2, residual=torch.randn(1, 2, 3, 3, 4), alpha=torch.tensor(0.0))
    with pytest.raises(TypeError, match="alpha must be a 0-d tensor"):
        slice_attention(q, q, q, 2, residual=q, alpha=torch.zeros(2))
    with pytest.raises(ValueError, match="residual and alpha go together"):
        slice_attention(q, q, q, 2, residual=q)
    with pytest.raises(ValueError, match="residual and alpha go together"):
        slice_attention(q, q, q, 2, alpha=torch.tensor(0.0))


def test_runs_on_device(device: torch.device) -> None:
    q, k, v = (torch.randn(2, 3, 4, 5, 6, device=device) for _ in range(3))
    for axis in (2, 3, 4):
        torch.testing.assert_close(
            slice_attention(q, k, v, axis, impl="fused"), slice_attention(q, k, v, axis, impl="reference"),
            rtol=1e-4, atol=1e-5,
        )
