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

For the question the paper's claim answers, "what will a block cost at my sizes?", use
:func:`unet_shapes` and :func:`cost_table`::

    from sliceattn import cost
    print(cost.cost_table(cost.unet_shapes((48, 160, 160), filters=(32, 64, 128, 256, 512))))

The counters that measure these numbers (``FlopCounterMode``, profiler memory events) live with
the benchmarks (``benchmarks/measure.py``); ``tests/test_cost.py`` holds the two sides equal.

Shapes are ``(B, C, D, H, W)``; ``N = D*H*W``. Axis convention of the library: dim 2 (D) axial,
dim 3 (H) coronal, dim 4 (W) sagittal.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

from ._checks import AxisLike, check_positive_int, resolve_axis

__all__ = [
    "RSA_ORDER",
    "Comparison",
    "Cost",
    "compare",
    "cost_table",
    "format_bytes",
    "nonlocal_cost",
    "nonlocal_keys",
    "nonlocal_map_cost",
    "pointwise_cost",
    "rsa_cost",
    "rsa_saved_bytes",
    "slice_attention3d_cost",
    "slice_attention_cost",
    "unet_shapes",
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
    """``shape`` as five positive ints ``(B, C, D, H, W)``, checked like the layers' arguments."""
    if isinstance(shape, str) or not isinstance(shape, Sequence) or len(shape) != 5:
        raise ValueError(f"shape must be five positive ints (B, C, D, H, W), got {shape!r}")
    return tuple(check_positive_int(size, f"shape[{i}]") for i, size in enumerate(shape))  # type: ignore[return-value]


def _check_channels(value: Optional[int], name: str, default: int) -> int:
    return default if value is None else check_positive_int(value, name)


def voxels(shape: Shape) -> int:
    """``N = D*H*W`` of a ``(B, C, D, H, W)`` shape."""
    return math.prod(_check_shape(shape)[2:])


def pointwise_cost(shape: Shape, out_channels: int, *, input_requires_grad: bool = True) -> Cost:
    """A 1x1x1 convolution ``C -> out_channels`` on a ``(B, C, D, H, W)`` input.

    Forward ``2*B*N*C*out``; backward the same for the weight, and again for the input when it
    requires a gradient. The bias is element-wise and not counted.

    Args:
        shape: ``(B, C, D, H, W)`` input.
        out_channels: output channels of the convolution.
        input_requires_grad: whether backward computes the gradient of the input.
    """
    batch, channels = _check_shape(shape)[:2]
    flops = 2 * batch * voxels(shape) * channels * out_channels
    return Cost(flops, flops * (2 if input_requires_grad else 1))


def slice_attention_cost(
    shape: Shape, dim: AxisLike, *, qk_channels: Optional[int] = None, value_channels: Optional[int] = None
) -> Cost:
    """The two matmuls of slice attention along ``dim`` (the attention map only, no projections).

    Along an axis of length ``L`` with ``S = N / L``: logits ``(L, Cq*S) @ (Cq*S, L)`` and output
    ``(L, L) @ (L, Cv*S)``, so forward ``2*B*L*N*(Cq + Cv)`` FLOPs (``4*B*C*N*L`` with
    ``Cq = Cv = C``) and an ``L x L`` float32 map per batch item. Backward: four matmuls of the
    same sizes (gradients of map and value, then of query and key), twice the forward.

    Args:
        shape: ``(B, C, D, H, W)``; ``C`` is the default of both channel counts.
        dim: 2 (axial, ``L = D``), 3 (coronal, ``L = H``) or 4 (sagittal, ``L = W``), a
            negative index or an axis name, as in the layers.
        qk_channels: ``Cq``, query/key channels.
        value_channels: ``Cv``, value channels.
    """
    batch, channels = _check_shape(shape)[:2]
    length = shape[resolve_axis(dim, name="dim")]
    qk = _check_channels(qk_channels, "qk_channels", channels)
    v = _check_channels(value_channels, "value_channels", channels)
    flops = 2 * batch * length * voxels(shape) * (qk + v)
    return Cost(flops, 2 * flops, batch * length * length * MAP_ITEMSIZE)


def slice_attention3d_cost(
    shape: Shape,
    dim: AxisLike,
    *,
    projection: bool = True,
    qk_channels: Optional[int] = None,
    input_requires_grad: bool = True,
) -> Cost:
    """One :class:`~sliceattn.SliceAttention3d` step: projections (``C -> 2*Cq + C``) plus the map.

    Args:
        shape: ``(B, C, D, H, W)`` input.
        dim: the attention axis, as in :func:`slice_attention_cost`.
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
    order: Sequence[AxisLike] = RSA_ORDER,
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
        order: step axes, dims or names (default coronal, sagittal, axial).
        projection, qk_channels, project_once: as in the layer.
        input_requires_grad: whether backward computes the gradient of the block input (the
            later steps' inputs always need one: they depend on the gates).
    """
    if project_once and not projection:
        raise ValueError("project_once=True needs projection=True")
    if isinstance(order, str) or not isinstance(order, Sequence) or len(order) == 0:
        raise TypeError(f"order must be a non-empty sequence of axes, got {order!r}")
    cost = Cost(0, 0)
    for step, dim in enumerate(resolve_axis(axis, name="order") for axis in order):
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
    """``N'``, the number of keys of a non-local block: ``N``, or ``D*(H//2)*(W//2)`` sub-sampled.

    Args:
        shape: ``(B, C, D, H, W)`` input.
        sub_sample: as in :class:`~sliceattn.NonLocal3d` (max pooling by 2 in ``H`` and ``W``).
    """
    _, _, depth, height, width = _check_shape(shape)
    return depth * (height // 2) * (width // 2) if sub_sample else depth * height * width


def nonlocal_map_cost(shape: Shape, *, inter_channels: Optional[int] = None, sub_sample: bool = False) -> Cost:
    """The two matmuls of a non-local block: ``(N, C') @ (C', N')`` and ``(C', N') @ (N', N)``.

    Forward ``4*B*N*N'*C'`` FLOPs (``C'`` default ``C // 2``), an ``N x N'`` float32 map per
    batch item; backward twice the forward.

    Args:
        shape: ``(B, C, D, H, W)`` input.
        inter_channels, sub_sample: as in :class:`~sliceattn.NonLocal3d`.
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

    Args:
        shape: ``(B, C, D, H, W)`` input.
        inter_channels, sub_sample: as in :class:`~sliceattn.NonLocal3d`.
        input_requires_grad: whether backward computes the gradient of the block input.
    """
    batch, channels, depth, height, width = _check_shape(shape)
    inter = _check_channels(inter_channels, "inter_channels", max(channels // 2, 1))
    project = pointwise_cost(shape, 3 * inter, input_requires_grad=input_requires_grad)
    out = pointwise_cost((batch, inter, depth, height, width), channels)
    return project + nonlocal_map_cost(shape, inter_channels=inter, sub_sample=sub_sample) + out


def _maps_cost(shape: Shape, order: Sequence[AxisLike], qk_channels: Optional[int]) -> Cost:
    """The attention maps of every RSA step, projections excluded."""
    return sum((slice_attention_cost(shape, dim, qk_channels=qk_channels) for dim in order), Cost(0, 0))


@dataclass(frozen=True)
class Comparison:
    """RSA against the non-local block at one or more shapes (costs add over blocks).

    Attributes:
        rsa_maps, nonlocal_maps: the attention maps alone (the paper's claim: memory and FLOPs).
        rsa_block, nonlocal_block: whole blocks, projections included.
    """

    rsa_maps: Cost
    nonlocal_maps: Cost
    rsa_block: Cost
    nonlocal_block: Cost

    def __add__(self, other: "Comparison") -> "Comparison":
        return Comparison(
            self.rsa_maps + other.rsa_maps,
            self.nonlocal_maps + other.nonlocal_maps,
            self.rsa_block + other.rsa_block,
            self.nonlocal_block + other.nonlocal_block,
        )

    @property
    def map_memory_ratio(self) -> float:
        """Non-local / RSA attention-map bytes (the paper: at least 28)."""
        return self.nonlocal_maps.map_bytes / self.rsa_maps.map_bytes

    @property
    def map_flop_ratio(self) -> float:
        """Non-local / RSA attention-map forward FLOPs (the paper: at least 100)."""
        return self.nonlocal_maps.forward / self.rsa_maps.forward

    @property
    def block_flop_ratio(self) -> float:
        """Non-local / RSA whole-block forward FLOPs (below 1: RSA costs more)."""
        return self.nonlocal_block.forward / self.rsa_block.forward


def compare(
    shape: Shape,
    *,
    order: Sequence[AxisLike] = RSA_ORDER,
    projection: bool = True,
    qk_channels: Optional[int] = None,
    project_once: bool = False,
    inter_channels: Optional[int] = None,
    sub_sample: bool = False,
) -> Comparison:
    """Costs of an RSA block and a non-local block at one ``(B, C, D, H, W)`` input.

    Args:
        shape: the block input.
        order, projection, qk_channels, project_once: the RSA block's options (as in the layer).
        inter_channels, sub_sample: the non-local block's options (``C'`` default ``C // 2``).
    """
    rsa = dict(order=order, projection=projection, qk_channels=qk_channels, project_once=project_once)
    nonlocal_options = dict(inter_channels=inter_channels, sub_sample=sub_sample)
    return Comparison(
        _maps_cost(shape, order, qk_channels if projection else None),
        nonlocal_map_cost(shape, **nonlocal_options),  # type: ignore[arg-type]
        rsa_cost(shape, **rsa),  # type: ignore[arg-type]
        nonlocal_cost(shape, **nonlocal_options),  # type: ignore[arg-type]
    )


def unet_shapes(
    spatial_shape: Sequence[int], filters: Sequence[int] = (32, 64, 128, 256, 512), *, batch: int = 1
) -> list[tuple[int, int, int, int, int]]:
    """The ``(B, C, D, H, W)`` feature maps of a U-Net's levels, top to bottom.

    Level ``i`` has ``filters[i]`` channels and the input's ``(D, H, W)`` divided by ``2**i``
    (stride-2 steps, rounded down as by pooling).

    Args:
        spatial_shape: ``(D, H, W)`` of the network input (a crop or a whole volume).
        filters: channels per level (the paper's backbone: 32 ... 512).
        batch: ``B``.
    """
    if isinstance(spatial_shape, str) or not isinstance(spatial_shape, Sequence) or len(spatial_shape) != 3:
        raise ValueError(f"spatial_shape must be (D, H, W), got {spatial_shape!r}")
    sizes = [check_positive_int(size, f"spatial_shape[{i}]") for i, size in enumerate(spatial_shape)]
    if isinstance(filters, str) or not isinstance(filters, Sequence) or len(filters) == 0:
        raise ValueError(f"filters must be a non-empty sequence of channel counts, got {filters!r}")
    check_positive_int(batch, "batch")
    shapes = []
    for level, channels in enumerate(filters):
        check_positive_int(channels, f"filters[{level}]")
        depth, height, width = (size // 2**level for size in sizes)
        if min(depth, height, width) < 1:
            raise ValueError(f"spatial_shape={tuple(spatial_shape)} is too small for {len(filters)} levels")
        shapes.append((batch, channels, depth, height, width))
    return shapes


def format_bytes(count: float) -> str:
    """``count`` bytes in GiB, MiB or KiB with one decimal (``"1.5 MiB"``)."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count:.0f} B"


def cost_table(shapes: Sequence[Shape], **options: object) -> str:
    """A Markdown table of RSA against the non-local block at each shape (e.g. from :func:`unet_shapes`).

    Columns: the shape, the attention-map bytes of both and their ratio, the maps' forward
    GFLOP and their ratio, and the whole blocks' forward GFLOP (projections included) and ratio.
    Ratios are non-local / RSA (above 1: RSA is cheaper).

    Args:
        shapes: ``(B, C, D, H, W)`` block inputs.
        **options: passed to :func:`compare` (``qk_channels``, ``project_once``, ``sub_sample``...).
    """
    header = [
        "B×C×D×H×W",
        "map bytes RSA",
        "map bytes NL",
        "NL/RSA",
        "map GFLOP RSA",
        "map GFLOP NL",
        "NL/RSA",
        "block GFLOP RSA",
        "block GFLOP NL",
        "NL/RSA",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for shape in shapes:
        c = compare(shape, **options)  # type: ignore[arg-type]
        cells = [
            "×".join(str(size) for size in shape),
            format_bytes(c.rsa_maps.map_bytes),
            format_bytes(c.nonlocal_maps.map_bytes),
            f"{c.map_memory_ratio:,.0f}",
            f"{c.rsa_maps.forward / 1e9:.3g}",
            f"{c.nonlocal_maps.forward / 1e9:.3g}",
            f"{c.map_flop_ratio:,.1f}",
            f"{c.rsa_block.forward / 1e9:.3g}",
            f"{c.nonlocal_block.forward / 1e9:.3g}",
            f"{c.block_flop_ratio:.2f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
