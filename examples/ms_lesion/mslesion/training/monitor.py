"""Is the attention alive? Each block's gates and how far its maps are from uniform, logged while training.

An attention block starts as the identity (RSA: ``alpha = 0``; non-local: a zero-initialised batch
norm after its output convolution). If its gates stay near zero the network trains as a plain U-Net
whatever the method's name says: the project once published a whole comparison made that way (Adam's
weight decay held every block at the identity). ``train.py`` therefore logs, per block, every gate
(``<block>.alpha_<axis>`` for RSA, ``<block>.gate`` for non-local: the root mean square of the batch
norm's weight), the mean over rows of each attention map's largest weight (``<block>.max_weight...``:
``1/L`` for a uniform map over ``L`` slices or voxels, 1 for a one-hot map) and the block's effect
``||out - in|| / ||in||`` on the training batch (``<block>.effect``: the gate times what the attention
adds, so it also sees projections decayed to zero under a non-zero gate) and each map's distance from
uniform (``<block>.peak...``: ``(largest weight - 1/L) / (1 - 1/L)``, 0 for the uniform map, 1 for a one-hot
one). At the end of a run it warns when a block's effect, averaged over the last tenth of the iterations,
stayed below ``ALIVE_EFFECT``, and when every map of a block stayed within ``UNIFORM_PEAK`` of uniform: such a
block adds the mean of the slices (a global-context term) and attends to nothing, however far its gate moved
(measured on a real scan: every map of a trained rsa-010 at 0.250 on 4-slice axes, effect 0.33).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from sliceattn import NonLocal3d, RecurrentSliceAttention3d

# A block whose output differs from its input by less than this fraction (``effect``) at the end of
# training stayed (numerically) the identity: the network trained as a plain U-Net.
ALIVE_EFFECT = 1e-3
# A block whose maps are all within this distance of uniform (``peak``, on [0, 1]) attends to nothing.
UNIFORM_PEAK = 0.05


def attention_blocks(network: nn.Module) -> dict[str, nn.Module]:
    """The network's attention blocks by module name (e.g. ``bottom_attention``)."""
    return {name: module for name, module in network.named_modules()
            if isinstance(module, (RecurrentSliceAttention3d, NonLocal3d))}


def _record_effect(block: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
    with torch.no_grad():
        block.effect = float((output - inputs[0]).float().norm() / inputs[0].float().norm().clamp_min(1e-12))


def watch(network: nn.Module) -> None:
    """Make every attention block keep its last forward's maps (detached; small for RSA) and its ``effect``
    ``||out - in|| / ||in||``, for ``attention_state``."""
    for block in attention_blocks(network).values():
        block.save_attention = True
        block.register_forward_hook(_record_effect)


def gates(block: nn.Module) -> dict[str, float]:
    """The block's gates: ``alpha_<axis>`` per RSA step, or ``gate`` for a non-local block."""
    if isinstance(block, RecurrentSliceAttention3d):
        return {f"alpha_{axis}": float(a) for axis, a in zip(block.order, block.alpha.detach().float().cpu())}
    norm = next((m for m in block.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)), None)
    if norm is None:  # no batch norm: the output convolution's weight is the gate
        norm = block.W
    return {"gate": float(norm.weight.detach().float().pow(2).mean().sqrt())}


def peak(largest: float, length: int) -> float:
    """A map's distance from uniform: ``(largest - 1/L) / (1 - 1/L)`` of its mean largest weight over ``L``
    keys; 0 for the uniform map (and for ``L = 1``, where there is nothing to choose), 1 for one-hot."""
    return 0.0 if length < 2 else (largest - 1 / length) / (1 - 1 / length)


def max_weights(block: nn.Module) -> dict[str, float]:
    """Mean over rows of each kept map's largest weight (``max_weight...``) and its distance from uniform
    (``peak...``, see ``peak``); empty before a forward with maps kept. Maps are ``(B, L, L)``."""
    maps = getattr(block, "attention_maps", ())
    suffixes = [f"_{axis}" for axis in block.order] if isinstance(block, RecurrentSliceAttention3d) else [""]
    columns: dict[str, float] = {}
    for suffix, weights in zip(suffixes, maps):
        largest = float(weights.float().amax(-1).mean())
        columns |= {f"max_weight{suffix}": largest, f"peak{suffix}": peak(largest, weights.shape[-1])}
    return columns


def attention_state(network: nn.Module) -> dict[str, dict[str, float]]:
    """Every block's gates, map weights and effect (after ``watch``): ``{block name: {column: value}}``."""
    return {name: {**gates(block), **max_weights(block), **({"effect": block.effect} if hasattr(block, "effect") else {})}
            for name, block in attention_blocks(network).items()}


def log_columns(state: dict[str, dict[str, float]]) -> dict[str, str]:
    """``attention_state`` flattened into ``log.csv`` columns ``<block>.<column>``."""
    return {f"{name}.{key}": f"{value:.6g}" for name, values in state.items() for key, value in values.items()}


def with_recent_effect(state: dict[str, dict[str, float]], log: Sequence[Mapping[str, Any]],
                       fraction: float = 0.1) -> dict[str, dict[str, float]]:
    """``state`` with each block's ``effect`` and ``peak...`` values replaced by their means over the last
    ``fraction`` of the log rows (at least one): one batch's values are noisy (a live block measured 8e-4 on
    its last batch and 2e-3 on average over its last 30)."""
    recent = list(log)[-max(1, int(len(log) * fraction)):]
    averaged = {}
    for name, values in state.items():
        averaged[name] = dict(values)
        for key in [k for k in values if k == "effect" or k.startswith("peak")]:
            seen = [float(row[f"{name}.{key}"]) for row in recent if row.get(f"{name}.{key}", "") != ""]
            if seen:
                averaged[name][key] = sum(seen) / len(seen)
    return averaged


def stayed_identity(state: dict[str, dict[str, float]]) -> list[str]:
    """The blocks whose ``effect`` (see ``with_recent_effect``) is below ``ALIVE_EFFECT``."""
    return [name for name, values in state.items() if values.get("effect", 0.0) < ALIVE_EFFECT]


def stayed_uniform(state: dict[str, dict[str, float]]) -> list[str]:
    """The blocks that kept maps and whose every ``peak...`` value is below ``UNIFORM_PEAK``: they attend to
    nothing (each output slice is the mean of all slices)."""
    return [name for name, values in state.items()
            if (peaks := [v for k, v in values.items() if k.startswith("peak")]) and max(peaks) < UNIFORM_PEAK]


def attention_summary(state: dict[str, dict[str, float]]) -> dict[str, Any]:
    """What ``metrics.json`` records: ``attention`` (the state), ``attention_alive`` (gates moved) and
    ``attention_attends`` (some map left uniform); both None without blocks."""
    if not state:
        return {"attention": {}, "attention_alive": None, "attention_attends": None}
    return {"attention": state, "attention_alive": not stayed_identity(state),
            "attention_attends": not stayed_uniform(state)}

