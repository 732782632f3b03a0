"""Slice-wise attention, the math (Zhang et al., RSANet, MICCAI 2019, eqs. 1-2).

For an axis of length ``L`` every slice along it (all ``C x rest`` numbers) is one token:
``A = softmax(s * Q K^T)`` is ``L x L`` and ``out_i = sum_j A[i, j] V_j``; the SA block's output
is ``M' = M + alpha * out``.

One public entry point, :func:`slice_attention`, checks its arguments and calls the unchecked
core :func:`_slice_attention`, which the layers call at every step. The core has two
implementations of the same function:

* ``impl="fused"`` (the default): a custom autograd function that keeps the rearranged copies
  transient, saves only the inputs and the ``L x L`` map, folds the residual ``M + alpha * out``
  into the same step, and writes the gradients back in the inputs' layout.
* ``impl="reference"``: einops ``rearrange`` to ``(B, L, C*rest)`` (the paper's M1/M2/M3),
  matmul, softmax, matmul, ``rearrange`` back. Readable; autograd saves the rearranged copies.

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

from ._checks import AxisLike, autocast_off, check_choice, check_feature_map, resolve_axis

Scale = Union[float, Literal["auto"], None]
Impl = Literal["fused", "reference"]
IMPLS: tuple[str, ...] = ("fused", "reference")


def check_scale(scale: object) -> Scale:
    """Return ``scale`` (``"auto"`` in any case becomes ``"auto"``) if it is a valid logit scale, else raise."""
    if scale is None:
        return None
    if isinstance(scale, str):
        return check_choice(scale, "scale", ("auto",))  # type: ignore[return-value]
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be None, 'auto' or a float, got {type(scale).__name__}")
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a finite positive number, got {scale}")
    return float(scale)


def resolve_scale(scale: Scale, shape: torch.Size, dim: int) -> float:
    """The logit multiplier for a checked ``scale`` and query ``shape``.

    ``None`` -> 1 (the paper), ``"auto"`` -> ``1/sqrt(Cq * rest)`` with ``Cq`` the query's channels
    (1 when a slice is empty), a float -> itself.

    Args:
        scale: a value :func:`check_scale` returned.
        shape: the query's shape ``(B, Cq, *spatial)``.
        dim: the attention axis, a resolved dim index.
    """
    if scale is None:
        return 1.0
    if isinstance(scale, str):
        size = _slice_size(shape, dim)
        # a power, not math.sqrt: under torch.export (ONNX) ``size`` is symbolic and stays so
        return size**-0.5 if size else 1.0
    return scale


def _slice_size(shape: torch.Size, dim: int) -> int:
    """``C * rest``: the numbers in one slice along ``dim`` (a loop: torch.compile refuses a generator here)."""
    size = 1
    for i, extent in enumerate(shape):
        if i not in (0, dim):
            size *= extent
    return size


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float32, or float64 when any input is float64 (never below float32)."""
    dtype = torch.float32
    for tensor in tensors:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def _to_slices(x: Tensor, dim: int) -> Tensor:
    """``(B, C, *spatial)`` -> ``(B, L, C*rest)``; a view when ``dim`` is the last axis, else a copy.

    Sizes are explicit (no ``-1``) so that empty tensors reshape too.
    """
    return x.movedim(dim, 1).reshape(x.shape[0], x.shape[dim], _slice_size(x.shape, dim))


def _from_slices(flat: Tensor, shape: torch.Size, dim: int) -> Tensor:
    """Inverse of :func:`_to_slices`: ``(B, L, C*rest)`` -> a strided view of shape ``shape``."""
    moved = (shape[0], shape[dim]) + tuple(s for i, s in enumerate(shape) if i not in (0, dim))
    return flat.view(moved).movedim(1, dim)


class _FusedSliceAttention(torch.autograd.Function):
    """``(residual + alpha * SA(q, k, v), A)`` (``SA(q, k, v)`` when ``residual`` is None); ``A`` is not differentiable."""

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
    ) -> tuple[Tensor, Tensor]:
        with autocast_off(query.device):
            dtype = _compute_dtype(query, key)
            logits = torch.bmm(_to_slices(query, dim).to(dtype), _to_slices(key, dim).to(dtype).mT)
            attention = torch.softmax(logits.mul_(scale), dim=-1)
            out = _from_slices(torch.bmm(attention.to(value.dtype), _to_slices(value, dim)), value.shape, dim)
            if residual is not None:
                assert alpha is not None
                out = torch.addcmul(residual, alpha.to(residual.dtype), out.to(residual.dtype))
        ctx.save_for_backward(query, key, value, attention, alpha)
        ctx.dim, ctx.scale, ctx.has_residual = dim, scale, residual is not None
        ctx.mark_non_differentiable(attention)
        return out, attention

    @staticmethod
    @once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor, _grad_attention: None):  # type: ignore[override]
        query, key, value, attention, alpha = ctx.saved_tensors
        dim, scale = ctx.dim, ctx.scale
        with autocast_off(grad.device):
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


def _reference(query: Tensor, key: Tensor, value: Tensor, dim: int, scale: float) -> tuple[Tensor, Tensor]:
    """The einops reference: ``(B, L, C*rest)`` slices, two matmuls, float32 softmax; returns ``(out, A)``."""
    names = [f"s{i}" for i in range(query.dim() - 2)]
    axis = names[dim - 2]
    rest = " ".join(name for name in names if name != axis)
    layout = f"b c {' '.join(names)}"
    slices = f"b {axis} (c {rest})"
    with autocast_off(query.device):
        dtype = _compute_dtype(query, key)
        m1 = rearrange(key, f"{layout} -> b (c {rest}) {axis}").to(dtype)
        m2 = rearrange(query, f"{layout} -> {slices}").to(dtype)
        m3 = rearrange(value, f"{layout} -> {slices}")
        attention = torch.softmax(torch.matmul(m2, m1) * scale, dim=-1)
        out = torch.matmul(attention.to(value.dtype), m3)
        # every size given: einops cannot infer a factor of an empty composite axis
        sizes = dict(zip(names, value.shape[2:]), c=value.shape[1])
        return rearrange(out, f"{slices} -> {layout}", **sizes), attention.detach()


def _slice_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    dim: int,
    scale: float,
    residual: Optional[Tensor],
    alpha: Optional[Tensor],
    impl: str,
) -> tuple[Tensor, Tensor]:
    """The unchecked core of :func:`slice_attention`, for callers that own the checks (the layers).

    Args:
        query, key, value: as in :func:`slice_attention`.
        dim: a resolved spatial dim index.
        scale: the resolved logit multiplier (:func:`resolve_scale`).
        residual, alpha: both tensors (gated residual output) or both None.
        impl: ``"fused"`` or ``"reference"``.

    Returns:
        The output ``(B, Cv, *spatial)`` and the attention map ``(B, L, L)`` (float32, float64 for
        float64 inputs), detached from autograd.
    """
    if impl == "reference":
        out, attention = _reference(query, key, value, dim, scale)
        if residual is not None:
            assert alpha is not None
            out = residual + alpha.to(residual.dtype) * out.to(residual.dtype)
        return out, attention
    return _FusedSliceAttention.apply(query, key, value, dim, scale, residual, alpha)


def _check_arguments(
    query: Tensor, key: Tensor, value: Tensor, axis: AxisLike, residual: Optional[Tensor], alpha: Optional[Tensor]
) -> int:
    """Check :func:`slice_attention`'s tensors; return the resolved dim of ``axis``."""
    check_feature_map(query, "query")
    check_feature_map(key, "key")
    check_feature_map(value, "value")
    if query.shape != key.shape:
        raise ValueError(f"query and key must have the same shape, got {tuple(query.shape)} and {tuple(key.shape)}")
    if value.dim() != query.dim() or value.shape[0] != query.shape[0] or value.shape[2:] != query.shape[2:]:
        raise ValueError(
            "value must share the batch and spatial shape of query (channels may differ), "
            f"got value {tuple(value.shape)} and query {tuple(query.shape)}"
        )
    if not (query.device == key.device == value.device):
        raise ValueError(f"query, key and value must be on one device, got {query.device}, {key.device}, {value.device}")
    if (residual is None) != (alpha is None):
        raise ValueError(
            f"residual and alpha go together (M + alpha * out): got residual={'a tensor' if residual is not None else None}, "
            f"alpha={'a tensor' if alpha is not None else None}"
        )
    if residual is not None:
        check_feature_map(residual, "residual")
        if residual.shape != value.shape:
            raise ValueError(f"residual must have value's shape {tuple(value.shape)}, got {tuple(residual.shape)}")
        if not isinstance(alpha, Tensor) or alpha.dim() != 0:
            raise TypeError(f"alpha must be a 0-d tensor, got {alpha!r}")
    return resolve_axis(axis, query.dim())


def slice_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    axis: AxisLike,
    *,
    residual: Optional[Tensor] = None,
    alpha: Optional[Tensor] = None,
    scale: Scale = None,
    impl: Impl = "fused",
) -> Tensor:
    """Slice-wise attention along one spatial axis, optionally gated into a residual.

    Args:
        query: ``(B, Cq, *spatial)``; ``Q_i`` is its ``i``-th slice along ``axis``.
        key: same shape as ``query``.
        value: ``(B, Cv, *spatial)``.
        axis: spatial dim (``2..ndim-1`` or negative), or ``"axial"`` (D), ``"coronal"`` (H),
            ``"sagittal"`` (W) for 5-D tensors (case-insensitive).
        residual: ``(B, Cv, *spatial)``, the block input ``M``; with ``alpha`` the result is
            ``residual + alpha * out``, the SA block's ``M'`` (the fused path recovers
            ``alpha``'s gradient from the ``L x L`` map instead of keeping ``out``).
        alpha: 0-d gate, given together with ``residual``.
        scale: logit multiplier ``s``: ``None`` = 1 (the paper), ``"auto"`` (any case) =
            ``1/sqrt(Cq*rest)``, or a positive float.
        impl: ``"fused"`` (default) or the einops ``"reference"``; the same function.

    Returns:
        ``(B, Cv, *spatial)``: ``out_i = sum_j softmax_j(s <Q_i, K_j>) V_j`` in ``value``'s dtype,
        or ``residual + alpha * out`` in ``residual``'s dtype. Empty inputs (batch or a spatial
        size 0) give an empty result of that shape.

    Raises:
        TypeError: a non-tensor or non-floating input, a non-0-d ``alpha``, a bad ``scale`` type.
        ValueError: shapes that do not match, a bad ``axis``, ``impl`` or ``scale`` value,
            ``residual`` without ``alpha`` or the reverse.
    """
    dim = _check_arguments(query, key, value, axis, residual, alpha)
    impl = check_choice(impl, "impl", IMPLS)  # type: ignore[assignment]
    factor = resolve_scale(check_scale(scale), query.shape, dim)
    return _slice_attention(query, key, value, dim, factor, residual, alpha, impl)[0]
