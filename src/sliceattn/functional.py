"""Slice-wise attention, the math (Zhang et al., RSANet, MICCAI 2019, eqs. 1-2).

For an axis of length ``L`` every slice along it (all ``C x rest`` numbers) is one token:
``A = softmax(s * Q K^T)`` is ``L x L`` and ``out_i = sum_j A[i, j] V_j``.

Two implementations of the same function:

* ``impl="reference"``: einops ``rearrange`` to ``(B, L, C*rest)`` (the paper's M1/M2/M3),
  matmul, softmax, matmul, ``rearrange`` back. Readable; autograd saves the rearranged copies.
* ``impl="fused"`` (the default): a custom autograd function that keeps the rearranged copies
  transient, saves only the inputs and the ``L x L`` map, folds the residual ``M + alpha * out``
  into the same step, and writes the gradients back in the inputs' layout.

The logits and the softmax run in float32 (float64 stays float64) whatever the input dtype or
autocast state: ``<Q_i, K_j>`` sums ``C*H*W`` products and overflows float16 at ordinary
activation scales.
"""

from __future__ import annotations

import math
from typing import Literal, Optional, Union

import torch
from einops import rearrange
from torch import Tensor
from torch.autograd.function import once_differentiable

from ._checks import AxisLike, check_choice, check_feature_map, resolve_axis

Scale = Union[float, Literal["auto"], None]
Impl = Literal["auto", "fused", "reference"]
IMPLS: tuple[str, ...] = ("auto", "fused", "reference")


def resolve_scale(scale: Scale, query: Tensor, dim: int) -> float:
    """The logit multiplier: ``None`` -> 1 (the paper), ``"auto"`` -> ``1/sqrt(C * rest)``, or a float."""
    if scale is None:
        return 1.0
    if isinstance(scale, str):
        check_choice(scale, "scale", ("auto",))
        return 1.0 / math.sqrt(query.shape[1] * (query[0, 0].numel() // query.shape[dim]))
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be None, 'auto' or a float, got {type(scale).__name__}")
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a finite positive number, got {scale}")
    return float(scale)


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float32, or float64 when any input is float64 (never below float32)."""
    dtype = torch.float32
    for tensor in tensors:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def _to_slices(x: Tensor, dim: int) -> Tensor:
    """``(B, C, *spatial)`` -> ``(B, L, C*rest)``; a view when ``dim`` is the last axis, else a copy."""
    return x.movedim(dim, 1).reshape(x.shape[0], x.shape[dim], -1)


def _from_slices(flat: Tensor, shape: torch.Size, dim: int) -> Tensor:
    """Inverse of :func:`_to_slices`: ``(B, L, C*rest)`` -> a strided view of shape ``shape``."""
    moved = (shape[0], shape[dim]) + tuple(s for i, s in enumerate(shape) if i not in (0, dim))
    return flat.view(moved).movedim(1, dim)


class _FusedSliceAttention(torch.autograd.Function):
    """``residual + alpha * SA(q, k, v)`` (or ``SA(q, k, v)`` when ``residual`` is None)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        dim: int,
        scale: float,
        residual: Optional[Tensor],
        alpha: Optional[Tensor],
    ) -> Tensor:
        with torch.autocast(query.device.type, enabled=False):
            dtype = _compute_dtype(query, key)
            logits = torch.bmm(_to_slices(query, dim).to(dtype), _to_slices(key, dim).to(dtype).mT)
            attention = torch.softmax(logits.mul_(scale), dim=-1)
            out = _from_slices(torch.bmm(attention.to(value.dtype), _to_slices(value, dim)), value.shape, dim)
            if residual is not None:
                assert alpha is not None
                out = torch.addcmul(residual, alpha.to(residual.dtype), out.to(residual.dtype))
        ctx.save_for_backward(query, key, value, attention, alpha)
        ctx.dim, ctx.scale, ctx.has_residual = dim, scale, residual is not None
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor):  # type: ignore[override]
        query, key, value, attention, alpha = ctx.saved_tensors
        dim, scale = ctx.dim, ctx.scale
        with torch.autocast(grad.device.type, enabled=False):
            dtype = _compute_dtype(query, key, value, grad)
            grad_flat = _to_slices(grad, dim)
            value_flat = _to_slices(value, dim)
            # d(loss)/d(attention) before the alpha factor: grad_out @ V^T, an L x L matrix
            grad_map = torch.bmm(grad_flat.to(dtype), value_flat.to(dtype).mT)
            weights = attention.mT
            grad_alpha = None
            if ctx.has_residual:
                # d(loss)/d(alpha) = <grad, out> = sum(A * (grad_out @ V^T)): no need to keep `out`
                grad_alpha = (attention * grad_map).sum().to(alpha.dtype)
                grad_map = grad_map * alpha.to(dtype)
                weights = weights * alpha.to(dtype)
            grad_value = torch.bmm(weights.to(grad.dtype), grad_flat)
            # softmax backward, then the scale of the logits
            grad_logits = attention * (grad_map - (grad_map * attention).sum(-1, keepdim=True))
            grad_logits = grad_logits.mul_(scale)
            query_flat = _to_slices(query, dim).to(dtype)
            grad_query = torch.bmm(grad_logits, _to_slices(key, dim).to(dtype))
            grad_key = torch.bmm(grad_logits.mT, query_flat)
        return (
            _from_slices(grad_query.to(query.dtype), query.shape, dim),
            _from_slices(grad_key.to(key.dtype), key.shape, dim),
            _from_slices(grad_value.to(value.dtype), value.shape, dim),
            None,
            None,
            grad if ctx.has_residual else None,
            grad_alpha,
        )


def _reference(query: Tensor, key: Tensor, value: Tensor, dim: int, scale: float) -> Tensor:
    """The einops reference: ``(B, L, C*rest)`` slices, two matmuls, float32 softmax."""
    names = [f"s{i}" for i in range(query.dim() - 2)]
    axis = names[dim - 2]
    rest = " ".join(name for name in names if name != axis)
    layout = f"b c {' '.join(names)}"
    slices = f"b {axis} (c {rest})"
    with torch.autocast(query.device.type, enabled=False):
        dtype = _compute_dtype(query, key)
        m1 = rearrange(key, f"{layout} -> b (c {rest}) {axis}").to(dtype)
        m2 = rearrange(query, f"{layout} -> {slices}").to(dtype)
        m3 = rearrange(value, f"{layout} -> {slices}")
        attention = torch.softmax(torch.matmul(m2, m1) * scale, dim=-1)
        out = torch.matmul(attention.to(value.dtype), m3)
        sizes = dict(zip(names, value.shape[2:]))
        return rearrange(out, f"{slices} -> {layout}", **sizes)


def _check_qkv(query: Tensor, key: Tensor, value: Tensor, axis: AxisLike, impl: str) -> int:
    check_feature_map(query, "query")
    check_feature_map(key, "key")
    check_feature_map(value, "value")
    check_choice(impl, "impl", IMPLS)
    if query.shape != key.shape:
        raise ValueError(f"query and key must have the same shape, got {tuple(query.shape)} and {tuple(key.shape)}")
    if value.dim() != query.dim() or value.shape[0] != query.shape[0] or value.shape[2:] != query.shape[2:]:
        raise ValueError(
            "value must share the batch and spatial shape of query (channels may differ), "
            f"got value {tuple(value.shape)} and query {tuple(query.shape)}"
        )
    if not (query.device == key.device == value.device):
        raise ValueError(f"query, key and value must be on one device, got {query.device}, {key.device}, {value.device}")
    return resolve_axis(axis, query.dim())


def slice_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    axis: AxisLike,
    *,
    scale: Scale = None,
    impl: Impl = "auto",
) -> Tensor:
    """Slice-wise attention along one spatial axis.

    Args:
        query: ``(B, Cq, *spatial)``; ``Q_i`` is its ``i``-th slice along ``axis``.
        key: same shape as ``query``.
        value: ``(B, Cv, *spatial)``.
        axis: spatial dim (``2..ndim-1`` or negative), or ``"axial"`` (D), ``"coronal"`` (H),
            ``"sagittal"`` (W) for 5-D tensors.
        scale: logit multiplier ``s``: ``None`` = 1 (the paper), ``"auto"`` = ``1/sqrt(Cq*rest)``,
            or a positive float.
        impl: ``"fused"`` (default for ``"auto"``) or the einops ``"reference"``.

    Returns:
        ``(B, Cv, *spatial)`` in ``value``'s dtype: ``out_i = sum_j softmax_j(s <Q_i, K_j>) V_j``.
    """
    dim = _check_qkv(query, key, value, axis, impl)
    factor = resolve_scale(scale, query, dim)
    if impl == "reference":
        return _reference(query, key, value, dim, factor)
    return _FusedSliceAttention.apply(query, key, value, dim, factor, None, None)


def residual_slice_attention(
    residual: Tensor,
    alpha: Tensor,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    axis: AxisLike,
    *,
    scale: Scale = None,
    impl: Impl = "auto",
) -> Tensor:
    """``residual + alpha * slice_attention(query, key, value, axis)``, the SA block's output ``M'``.

    Args:
        residual: ``(B, Cv, *spatial)``, the block input ``M``.
        alpha: 0-d learnable gate.
        query, key, value, axis, scale, impl: as in :func:`slice_attention`.

    Returns:
        ``(B, Cv, *spatial)`` in ``residual``'s dtype. The fused path does not keep the attention
        output for ``alpha``'s gradient: it recovers ``<grad, out>`` from the ``L x L`` map.
    """
    dim = _check_qkv(query, key, value, axis, impl)
    check_feature_map(residual, "residual")
    if residual.shape != value.shape:
        raise ValueError(f"residual must have value's shape {tuple(value.shape)}, got {tuple(residual.shape)}")
    if not isinstance(alpha, Tensor) or alpha.dim() != 0:
        raise TypeError(f"alpha must be a 0-d tensor, got {alpha!r}")
    return gated_slice_attention(residual, alpha, query, key, value, dim, scale, impl)


def gated_slice_attention(
    residual: Tensor, alpha: Tensor, query: Tensor, key: Tensor, value: Tensor, dim: int, scale: Scale, impl: str
) -> Tensor:
    """:func:`residual_slice_attention` without the argument checks, for callers that own them.

    ``dim`` is a resolved spatial dim index; the layers check their input once per forward and
    call this at every step.
    """
    factor = resolve_scale(scale, query, dim)
    if impl == "reference":
        out = _reference(query, key, value, dim, factor)
        return residual + alpha.to(residual.dtype) * out.to(residual.dtype)
    return _FusedSliceAttention.apply(query, key, value, dim, factor, residual, alpha)
