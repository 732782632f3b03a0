"""Cost model of the blocks: analytic FLOPs and bytes, and the counters that measure them.

Analytic side (no tensors are built): FLOPs of the attention maps and of whole blocks
(:class:`~sliceattn.SliceAttention3d`, :class:`~sliceattn.RecurrentSliceAttention3d` in its
faithful and lean forms, :class:`~sliceattn.NonLocal3d` with and without sub-sampling), forward
and backward, and the bytes of their attention maps. FLOPs follow
``torch.utils.flop_counter.FlopCounterMode``: a GEMM or 1x1x1 convolution of an ``(M, K)`` by
``(K, N)`` product costs ``2*M*N*K``; its backward costs the same again for each operand that
needs a gradient. Element-wise work (softmax, residual, bias, norm, pooling) is counted by
neither side: it is linear in the size of a feature map or of an attention map, a small fraction
of the GEMMs that produce them.

Measured side: :func:`measure_flops` (``FlopCounterMode``), :func:`peak_memory` (on CPU the
allocation events of the autograd profiler with ``profile_memory=True``, replayed in time order
-- dispatch-mode tensor trackers change what they measure; on CUDA
``torch.cuda.max_memory_allocated``) and :func:`saved_bytes` (tensors packed for backward, seen
through ``saved_tensors_hooks``, one count per storage).

Shapes are ``(B, C, D, H, W)``; ``N = D*H*W``. Axis convention of the library: dim 2 (D) axial,
dim 3 (H) coronal, dim 4 (W) sagittal.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode

__all__ = [
    "RSA_ORDER",
    "Cost",
    "Measured",
    "measure_block",
    "measure_flops",
    "nonlocal_cost",
    "nonlocal_keys",
    "nonlocal_map_cost",
    "peak_memory",
    "pointwise_cost",
    "rsa_cost",
    "rsa_saved_bytes",
    "saved_bytes",
    "slice_attention3d_cost",
    "slice_attention_cost",
    "voxels",
]

Shape = Sequence[int]

#: The reference RSA block's step order (coronal, sagittal, axial) as dims of ``(B, C, D, H, W)``.
RSA_ORDER: tuple[int, ...] = (3, 4, 2)
#: float32: the dtype of every attention map and logit in the library.
MAP_ITEMSIZE = 4


@dataclass(frozen=True)
class Cost:
    """FLOPs of one block call (``FlopCounterMode`` convention) and bytes of its attention maps.

    Attributes:
        forward: FLOPs of the forward pass.
        backward: FLOPs of the backward pass (every operand that needs a gradient gets one).
        map_bytes: bytes of all attention maps the forward forms (float32), i.e. what training
            keeps of them for backward.
    """

    forward: int
    backward: int
    map_bytes: int = 0

    @property
    def total(self) -> int:
        """Forward plus backward FLOPs."""
        return self.forward + self.backward

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(self.forward + other.forward, self.backward + other.backward, self.map_bytes + other.map_bytes)


def _check_shape(shape: Shape) -> tuple[int, int, int, int, int]:
    dims = tuple(shape)
    if len(dims) != 5 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in dims):
        raise ValueError(f"shape must be five positive ints (B, C, D, H, W), got {shape!r}")
    return dims  # type: ignore[return-value]


def _check_dim(dim: int) -> int:
    if dim not in (2, 3, 4):
        raise ValueError(f"dim must be 2 (axial), 3 (coronal) or 4 (sagittal), got {dim!r}")
    return dim


def _check_channels(value: Optional[int], name: str, default: int) -> int:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int or None, got {value!r}")
    return value


def voxels(shape: Shape) -> int:
    """``N = D*H*W`` of a ``(B, C, D, H, W)`` shape."""
    return math.prod(_check_shape(shape)[2:])


def pointwise_cost(shape: Shape, out_channels: int, *, input_requires_grad: bool = True) -> Cost:
    """A 1x1x1 convolution ``C -> out_channels`` on a ``(B, C, D, H, W)`` input.

    Forward ``2*B*N*C*out``; backward the same for the weight, and again for the input when it
    requires a gradient. The bias is element-wise and not counted.
    """
    batch, channels = _check_shape(shape)[:2]
    flops = 2 * batch * voxels(shape) * channels * out_channels
    return Cost(flops, flops * (2 if input_requires_grad else 1))


def slice_attention_cost(
    shape: Shape, dim: int, *, qk_channels: Optional[int] = None, value_channels: Optional[int] = None
) -> Cost:
    """The two matmuls of slice attention along ``dim`` (the attention map only, no projections).

    Along an axis of length ``L`` with ``S = N / L``: logits ``(L, Cq*S) @ (Cq*S, L)`` and output
    ``(L, L) @ (L, Cv*S)``, so forward ``2*B*L*N*(Cq + Cv)`` FLOPs (``4*B*C*N*L`` with
    ``Cq = Cv = C``) and an ``L x L`` float32 map per batch item. Backward: four matmuls of the
    same sizes (gradients of map and value, then of query and key), twice the forward.

    Args:
        shape: ``(B, C, D, H, W)``; ``C`` is the default of both channel counts.
        dim: 2 (axial, ``L = D``), 3 (coronal, ``L = H``) or 4 (sagittal, ``L = W``).
        qk_channels: ``Cq``, query/key channels.
        value_channels: ``Cv``, value channels.
    """
    batch, channels = _check_shape(shape)[:2]
    length = shape[_check_dim(dim)]
    qk = _check_channels(qk_channels, "qk_channels", channels)
    v = _check_channels(value_channels, "value_channels", channels)
    flops = 2 * batch * length * voxels(shape) * (qk + v)
    return Cost(flops, 2 * flops, batch * length * length * MAP_ITEMSIZE)


def slice_attention3d_cost(
    shape: Shape,
    dim: int,
    *,
    projection: bool = True,
    qk_channels: Optional[int] = None,
    input_requires_grad: bool = True,
) -> Cost:
    """One :class:`~sliceattn.SliceAttention3d` step: projections (``C -> 2*Cq + C``) plus the map.

    Args:
        shape: ``(B, C, D, H, W)`` input.
        dim: the attention axis, 2, 3 or 4.
        projection: with the 1x1x1 query/key/value projection (paper's code) or without.
        qk_channels: ``Cq`` (default ``C``); needs ``projection``.
        input_requires_grad: whether backward computes the gradient of the block input.
    """
    channels = _check_shape(shape)[1]
    if not projection:
        if qk_channels is not None:
            raise ValueError(f"qk_channels={qk_channels} needs projection=True")
        return slice_attention_cost(shape, dim)
    qk = _check_channels(qk_channels, "qk_channels", channels)
    project = pointwise_cost(shape, 2 * qk + channels, input_requires_grad=input_requires_grad)
    return project + slice_attention_cost(shape, dim, qk_channels=qk)


def rsa_cost(
    shape: Shape,
    *,
    order: Sequence[int] = RSA_ORDER,
    projection: bool = True,
    qk_channels: Optional[int] = None,
    project_once: bool = False,
    input_requires_grad: bool = True,
) -> Cost:
    """A :class:`~sliceattn.RecurrentSliceAttention3d` block.

    Faithful (the paper's code): every step projects its own input, ``3 * (2*B*N*3C*C)``
    projection FLOPs against ``4*B*C*N*(D+H+W)`` for the maps; the projections dominate
    (94-99.6 % at U-Net bottom levels). ``project_once`` projects the block input once;
    ``projection=False`` drops the projections; ``qk_channels`` shrinks query/key.
    ``checkpoint=True`` adds one forward to the backward: add :attr:`Cost.forward` yourself.

    Args:
        shape: ``(B, C, D, H, W)`` input.
        order: step dims (default coronal, sagittal, axial).
        projection, qk_channels, project_once: as in the layer.
        input_requires_grad: whether backward computes the gradient of the block input (the
            later steps' inputs always need one: they depend on the gates).
    """
    if project_once and not projection:
        raise ValueError("project_once=True needs projection=True")
    cost = Cost(0, 0)
    for step, dim in enumerate(order):
        if projection and project_once and step > 0:
            cost = cost + slice_attention_cost(shape, dim, qk_channels=qk_channels)
        else:
            cost = cost + slice_attention3d_cost(
                shape,
                dim,
                projection=projection,
                qk_channels=qk_channels,
                input_requires_grad=input_requires_grad or step > 0,
            )
    return cost


def rsa_saved_bytes(
    shape: Shape,
    *,
    steps: int = 3,
    projection: bool = True,
    qk_channels: Optional[int] = None,
    project_once: bool = False,
    checkpoint: bool = False,
    itemsize: int = 4,
) -> int:
    """Bytes the library's RSA block saves for backward (parameters excluded), as measured.

    Each step keeps its input (for the projection's weight gradient; without projections it is
    query, key and value at once), the ``(B, 2*Cq + C, N)`` projection output and its float32
    ``L x L`` maps: ``steps * B*N*(2C + 2Cq)`` values plus the maps, 12 ``B*C*N`` values for the
    faithful block. ``project_once`` keeps one input and one projection. ``checkpoint`` keeps
    only the block input. The naive reference keeps ``5*B*C*N`` values per step (input,
    permuted copies of query, key and value, the attention output) plus the maps.

    Args:
        shape: ``(B, C, D, H, W)`` input, ``steps`` axes taken from :data:`RSA_ORDER`.
        itemsize: bytes per feature value (4 for float32).
    """
    batch, channels = _check_shape(shape)[:2]
    if not 1 <= steps <= 3:
        raise ValueError(f"steps must be 1, 2 or 3, got {steps!r}")
    feature = batch * voxels(shape) * itemsize
    if checkpoint:
        return channels * feature
    maps = sum(slice_attention_cost(shape, dim).map_bytes for dim in RSA_ORDER[:steps])
    if not projection:
        return steps * channels * feature + maps
    qk = _check_channels(qk_channels, "qk_channels", channels)
    per_projection = (2 * channels + 2 * qk) * feature
    return (1 if project_once else steps) * per_projection + maps


def nonlocal_keys(shape: Shape, sub_sample: bool = False) -> int:
    """``N'``, the number of keys of a non-local block: ``N``, or ``D*(H//2)*(W//2)`` sub-sampled."""
    _, _, depth, height, width = _check_shape(shape)
    return depth * (height // 2) * (width // 2) if sub_sample else depth * height * width


def nonlocal_map_cost(shape: Shape, *, inter_channels: Optional[int] = None, sub_sample: bool = False) -> Cost:
    """The two matmuls of a non-local block: ``(N, C') @ (C', N')`` and ``(C', N') @ (N', N)``.

    Forward ``4*B*N*N'*C'`` FLOPs (``C'`` default ``C // 2``), an ``N x N'`` float32 map per
    batch item; backward twice the forward.
    """
    batch, channels = _check_shape(shape)[:2]
    inter = _check_channels(inter_channels, "inter_channels", max(channels // 2, 1))
    keys = nonlocal_keys(shape, sub_sample)
    flops = 4 * batch * voxels(shape) * keys * inter
    return Cost(flops, 2 * flops, batch * voxels(shape) * keys * MAP_ITEMSIZE)


def nonlocal_cost(
    shape: Shape, *, inter_channels: Optional[int] = None, sub_sample: bool = False, input_requires_grad: bool = True
) -> Cost:
    """A :class:`~sliceattn.NonLocal3d` block: ``theta, phi, g`` (``C -> C'``), the map, ``W`` (``C' -> C``).

    Pooling (``sub_sample``) follows ``phi`` and ``g``, so their convolutions run on all ``N``
    voxels. BatchNorm is element-wise and not counted.
    """
    batch, channels, depth, height, width = _check_shape(shape)
    inter = _check_channels(inter_channels, "inter_channels", max(channels // 2, 1))
    project = pointwise_cost(shape, 3 * inter, input_requires_grad=input_requires_grad)
    out = pointwise_cost((batch, inter, depth, height, width), channels)
    return project + nonlocal_map_cost(shape, inter_channels=inter, sub_sample=sub_sample) + out


# --------------------------------------------------------------------------------------------
# measured counters


@dataclass(frozen=True)
class Measured:
    """Measured cost of one block call.

    Attributes:
        forward_flops, backward_flops: ``FlopCounterMode`` totals.
        train_peak: peak bytes allocated above the starting level during a forward with autograd
            recording (what the forward of a training step adds, output included).
        inference_peak: the same under ``torch.inference_mode()``.
        saved: bytes saved for backward by the forward (distinct storages, parameters excluded).
    """

    forward_flops: int
    backward_flops: int
    train_peak: int
    inference_peak: int
    saved: int


def measure_flops(fn: Callable[[], object]) -> int:
    """FLOPs counted by ``FlopCounterMode`` while ``fn()`` runs (matmuls and convolutions)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def _memory_events(prof: torch.autograd.profiler.profile, device: torch.device) -> list[tuple[int, int]]:
    """``(time_ns, bytes)`` of every allocation (+) and free (-) on ``device``'s type, in time order."""
    kind = torch.autograd.DeviceType.CUDA if device.type == "cuda" else torch.autograd.DeviceType.CPU
    events = [
        (event.start_ns(), event.nbytes())
        for event in prof.kineto_results.events()
        if event.name() == "[memory]" and event.device_type() == kind
    ]
    return sorted(events)


def peak_memory(fn: Callable[[], object], device: Union[str, torch.device] = "cpu") -> int:
    """Peak bytes allocated above the starting level while ``fn()`` runs, on ``device``'s type.

    On CPU the allocation and free events of the autograd profiler (``profile_memory=True``)
    are replayed in time order; they agree with the process's peak RSS. On CUDA it is
    ``torch.cuda.max_memory_allocated`` minus the level before the call. What ``fn`` returns
    stays alive until the end, so it counts.
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        result = fn()
        torch.cuda.synchronize(device)
        del result
        return int(torch.cuda.max_memory_allocated(device) - start)
    with torch.autograd.profiler.profile(profile_memory=True) as prof:
        result = fn()
    del result
    level = peak = 0
    for _, nbytes in _memory_events(prof, device):
        level += nbytes
        peak = max(peak, level)
    return peak


def saved_bytes(fn: Callable[[], object], exclude: Iterable[Tensor] = ()) -> int:
    """Bytes of the tensors that ``fn()`` saves for backward, each storage counted once.

    Args:
        fn: runs a forward with autograd recording (its result is kept alive while counting).
        exclude: tensors whose storages are not counted (typically the module's parameters,
            which exist whatever the implementation).

    Under ``torch.utils.checkpoint`` (non-reentrant) only the checkpointed region's inputs
    are counted: that is what it keeps.
    """
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    storages: dict[int, int] = {}

    def pack(tensor: Tensor) -> Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in skip:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        result = fn()
    del result
    return sum(storages.values())


def measure_block(module: torch.nn.Module, x: Tensor) -> Measured:
    """FLOPs (forward, backward), peaks (training forward, inference) and saved bytes of ``module(x)``.

    ``x`` is ``(B, C, D, H, W)``; it is used as given (set ``requires_grad`` to measure a block
    inside a network). Backward is driven by ``out.sum()``.
    """
    params = list(module.parameters())
    with FlopCounterMode(display=False) as counter:
        out = module(x)
    forward = int(counter.get_total_flops())
    with FlopCounterMode(display=False) as counter:
        out.sum().backward()
    backward = int(counter.get_total_flops())
    del out
    module.zero_grad(set_to_none=True)
    x.grad = None
    train = peak_memory(lambda: module(x), x.device)
    with torch.inference_mode():
        inference = peak_memory(lambda: module(x), x.device)
    saved = saved_bytes(lambda: module(x), exclude=params)
    return Measured(forward, backward, train, inference, saved)
