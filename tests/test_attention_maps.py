"""``save_attention=True``: the last forward's maps in ``block.attention_maps``, one per step."""

from __future__ import annotations

import pytest
import torch

from sliceattn import NonLocal3d, RecurrentSliceAttention3d, SliceAttention3d, slice_attention


def step_map(x: torch.Tensor, dim: int) -> torch.Tensor:
    """The ``(B, L, L)`` map along ``dim`` without projections, read back through one-hot values."""
    moved = x.movedim(dim, 2)
    length = moved.shape[2]
    value = torch.eye(length, dtype=x.dtype)[None, :, :, None, None].expand(x.shape[0], -1, -1, *moved.shape[3:])
    return slice_attention(moved, moved, value, 2)[:, :, :, 0, 0].transpose(1, 2)


@pytest.mark.parametrize("impl", ["fused", "reference"])
def test_rsa_keeps_one_map_per_step_in_step_order(impl: str) -> None:
    block = RecurrentSliceAttention3d(2, projection=False, alpha_init=0.5, impl=impl, save_attention=True, dtype=torch.float64)
    x = torch.randn(2, 2, 3, 4, 5, dtype=torch.float64)
    block(x)
    assert isinstance(block.attention_maps, tuple) and len(block.attention_maps) == 3
    assert [tuple(m.shape) for m in block.attention_maps] == [(2, 4, 4), (2, 5, 5), (2, 3, 3)]  # coronal, sagittal, axial
    # each step attends over the previous step's output
    inputs = [x]
    for step, dim in enumerate(block.dims[:-1]):
        inputs.append(slice_attention(inputs[-1], inputs[-1], inputs[-1], dim, residual=inputs[-1], alpha=block.alpha[step]))
    for attention, step_input, dim in zip(block.attention_maps, inputs, block.dims):
        torch.testing.assert_close(attention, step_map(step_input.detach(), dim))
        assert not attention.requires_grad


def test_maps_are_replaced_by_each_forward_and_rows_sum_to_one() -> None:
    block = SliceAttention3d(3, "axial", save_attention=True)
    block(torch.randn(1, 3, 4, 5, 6))
    first = block.attention_maps
    block(torch.randn(2, 3, 7, 5, 6))
    assert len(block.attention_maps) == 1 and block.attention_maps[0].shape == (2, 7, 7)
    assert first[0].shape == (1, 4, 4)
    torch.testing.assert_close(block.attention_maps[0].sum(-1), torch.ones(2, 7))


def test_off_by_default_and_empty() -> None:
    for block in (SliceAttention3d(2, "axial"), RecurrentSliceAttention3d(2), NonLocal3d(2)):
        block(torch.randn(1, 2, 3, 4, 5))
        assert block.save_attention is False and block.attention_maps == ()


def test_batch_zero_and_autocast_maps_are_float32() -> None:
    block = RecurrentSliceAttention3d(4, save_attention=True)
    block(torch.randn(0, 4, 3, 4, 5))
    assert [tuple(m.shape) for m in block.attention_maps] == [(0, 4, 4), (0, 5, 5), (0, 3, 3)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        block(torch.randn(1, 4, 3, 4, 5))
    assert all(m.dtype == torch.float32 for m in block.attention_maps)


def test_checkpointed_block_keeps_the_maps_of_its_forward() -> None:
    block = RecurrentSliceAttention3d(2, checkpoint=True, alpha_init=0.5, save_attention=True)
    x = torch.randn(1, 2, 3, 4, 5, requires_grad=True)
    out = block(x)
    maps = block.attention_maps
    out.sum().backward()
    for before, after in zip(maps, block.attention_maps):
        torch.testing.assert_close(before, after)


def test_nonlocal_keeps_its_full_map() -> None:
    block = NonLocal3d(4, sub_sample=True, save_attention=True)
    block(torch.randn(2, 4, 3, 4, 6))
    (attention,) = block.attention_maps
    assert attention.shape == (2, 3 * 4 * 6, 3 * 2 * 3) and attention.dtype == torch.float32
    torch.testing.assert_close(attention.sum(-1), torch.ones(2, 72))


def test_compile_fullgraph_with_flag_off_and_on() -> None:
    x = torch.randn(2, 4, 3, 5, 6)
    for save in (False, True):
        block = RecurrentSliceAttention3d(4, alpha_init=0.5, save_attention=save)
        compiled = torch.compile(block, fullgraph=True)
        out = compiled(x)
        compiled_maps = block.attention_maps
        torch.testing.assert_close(out, block(x), rtol=1e-5, atol=1e-5)
        assert len(compiled_maps) == (3 if save else 0)
        for compiled_map, eager_map in zip(compiled_maps, block.attention_maps):
            torch.testing.assert_close(compiled_map, eager_map)
