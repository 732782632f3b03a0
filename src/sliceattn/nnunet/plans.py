"""nnU-Net v2 plans files: add a configuration whose network has slice-wise attention.

nnU-Net builds a configuration's network from ``configurations[name].architecture``:
``network_class_name`` (a dotted path it imports with ``pydoc.locate``) and ``arch_kwargs``.
A new configuration that ``inherits_from`` the base one keeps the base's preprocessed data,
patch size and batch size; it carries a whole ``architecture`` dict of its own, because nnU-Net
merges inherited configurations shallowly (a partial ``architecture`` would drop the base's
``arch_kwargs``).

Nothing here imports nnU-Net: editing a plans file needs only the JSON.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from .._checks import check_mapping
from ..factory import build_attention
from ..io import save_atomically

__all__ = [
    "ATTENTION_NETWORKS",
    "PlansError",
    "add_attention_configuration",
    "resolve_configuration",
    "resolve_stages",
    "write_plans",
]

#: Plain nnU-Net network class (last dotted part) -> the dotted path of its attention subclass.
ATTENTION_NETWORKS: dict[str, str] = {
    "PlainConvUNet": "sliceattn.nnunet.AttentionPlainConvUNet",
    "ResidualEncoderUNet": "sliceattn.nnunet.AttentionResidualEncoderUNet",
}


class PlansError(ValueError):
    """A plans file or a requested configuration that cannot be used (a user mistake)."""


def _is_stage_index(value: object) -> bool:
    """An ``int`` or numpy integer, not a bool: what a stage index may be."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _given_stages(stages: object) -> tuple[Any, ...]:
    """``stages`` as given, as a tuple (one index becomes a 1-tuple); raises ``TypeError`` for anything else."""
    if _is_stage_index(stages):
        return (stages,)
    if isinstance(stages, str) or not isinstance(stages, Sequence) or len(stages) == 0:
        raise TypeError(f"attention_stages must be a non-empty sequence of encoder stage indices, got {stages!r}")
    return tuple(stages)


def resolve_stages(stages: Union[int, Sequence[int]], n_stages: int) -> tuple[int, ...]:
    """Encoder stage indices (negative count from the end, ``-1`` = bottleneck) -> sorted indices in ``[0, n_stages)``.

    Args:
        stages: one index or a non-empty sequence of them; an index is an ``int`` or a numpy
            integer (not a bool).
        n_stages: the encoder's number of stages.

    Raises:
        TypeError: ``stages`` is not an index or a non-empty sequence.
        ValueError: an index out of range or not an index, or the same stage twice.
    """
    stages = _given_stages(stages)
    resolved = []
    for stage in stages:
        if not _is_stage_index(stage) or not -n_stages <= stage < n_stages:
            raise ValueError(
                f"attention_stages must hold encoder stage indices in [{-n_stages}, {n_stages - 1}] "
                f"(-1 = bottleneck) for a {n_stages}-stage encoder, got {stage!r} in {tuple(stages)!r}"
            )
        resolved.append(int(stage) % n_stages)
    if len(set(resolved)) != len(resolved):
        raise ValueError(f"attention_stages must name distinct stages, got {tuple(stages)!r} (= {tuple(resolved)})")
    return tuple(sorted(resolved))


def resolve_configuration(plans: Mapping[str, Any], name: str) -> dict[str, Any]:
    """A configuration with its ``inherits_from`` chain merged in, as nnU-Net's ``PlansManager`` does.

    Args:
        plans: the parsed plans JSON (not modified).
        name: the configuration, e.g. ``"3d_cascade_fullres"``.

    Returns:
        A new dict: the entries of ``name`` over those of its ancestors (shallow merge).

    Raises:
        PlansError: no such configuration, or an inheritance cycle.
    """
    configurations = plans.get("configurations")
    if not isinstance(configurations, Mapping):
        raise PlansError("not an nnU-Net plans file: no 'configurations' entry")
    chain: list[str] = []
    while True:
        if name not in configurations:
            raise PlansError(f"configuration {name!r} is not in the plans file (it has {sorted(configurations)})")
        if name in chain:
            raise PlansError(f"configurations inherit in a cycle: {' -> '.join(chain + [name])}")
        chain.append(name)
        parent = configurations[name].get("inherits_from")
        if parent is None:
            break
        name = parent
    merged: dict[str, Any] = {}
    for link in reversed(chain):
        merged.update(copy.deepcopy(configurations[link]))
    return merged


def add_attention_configuration(
    plans: Mapping[str, Any],
    name: str,
    base: str,
    *,
    attention: str = "rsa",
    stages: Union[int, Sequence[int]] = (-1,),
    attention_kwargs: Optional[Mapping[str, Any]] = None,
    force: bool = False,
) -> dict[str, Any]:
    """A copy of ``plans`` with configuration ``name``: ``base`` plus attention after ``stages``.

    The new configuration inherits from ``base`` (same preprocessed data, patch and batch size)
    and holds the base's whole ``architecture`` with the network class swapped for its attention
    subclass and ``attention``/``attention_stages``/``attention_kwargs`` added to ``arch_kwargs``.

    Args:
        plans: the parsed plans JSON (not modified).
        name: the new configuration's name, e.g. ``"3d_fullres_rsa"``.
        base: a 3-D configuration whose network is ``PlainConvUNet`` or ``ResidualEncoderUNet``.
        attention, stages, attention_kwargs: the networks' ``attention``, ``attention_stages``
            (indices as in :func:`resolve_stages`, numpy integers included) and
            ``attention_kwargs`` (checked here by building the blocks on the meta device).
        force: replace an existing configuration called ``name``; never one that other
            configurations inherit from (``3d_lowres``, which ``3d_cascade_fullres`` inherits
            from): they would change with it.

    Raises:
        PlansError: unknown or unsuitable base, existing name without ``force``, a name that
            others inherit from (named in the message), bad attention options.
    """
    configurations = plans.get("configurations")
    if not isinstance(configurations, Mapping):
        raise PlansError("not an nnU-Net plans file: no 'configurations' entry")
    if not name or name == base:
        raise PlansError(f"the new configuration needs a name other than the base's, got name={name!r}")
    if name in configurations and not force:
        raise PlansError(f"configuration {name!r} already exists in the plans file; pass --force to replace it")
    heirs = sorted(other for other, entry in configurations.items() if isinstance(entry, Mapping) and entry.get("inherits_from") == name)
    if heirs and name in configurations:
        # even with force: the heirs would silently take the new network (and a base inheriting
        # from its own heir would make a cycle)
        raise PlansError(
            f"configuration {name!r} cannot be replaced: {', '.join(heirs)} {'inherits' if len(heirs) == 1 else 'inherit'} "
            f"from {name} and would change with it; choose another name"
        )
    architecture = resolve_configuration(plans, base).get("architecture")
    if not isinstance(architecture, Mapping) or "network_class_name" not in architecture:
        raise PlansError(f"configuration {base!r} has no 'architecture' with a 'network_class_name' (nnU-Net < 2.5 plans?)")
    class_name = str(architecture["network_class_name"]).rsplit(".", 1)[-1]
    if class_name not in ATTENTION_NETWORKS:
        raise PlansError(
            f"configuration {base!r} uses network {architecture['network_class_name']!r}; "
            f"attention can be added to {sorted(ATTENTION_NETWORKS)}"
        )
    arch_kwargs = dict(architecture.get("arch_kwargs", {}))
    conv_op = str(arch_kwargs.get("conv_op", ""))
    if not conv_op.endswith("Conv3d"):
        raise PlansError(f"configuration {base!r} is not 3-D (conv_op {conv_op!r}); slice attention needs a 3-D configuration")
    features = arch_kwargs.get("features_per_stage")
    n_stages = int(arch_kwargs.get("n_stages", len(features) if isinstance(features, Sequence) else 0))
    if isinstance(features, int):
        features = [features] * n_stages
    try:
        resolved = resolve_stages(stages, n_stages)
        options = check_mapping(attention_kwargs, "attention_kwargs")
        for stage in resolved:
            build_attention(attention, int(features[stage]), **{**options, "device": "meta"})
    except (TypeError, ValueError) as error:
        raise PlansError(str(error)) from error
    arch_kwargs.update(
        attention=attention,
        attention_stages=[int(stage) for stage in _given_stages(stages)],  # JSON: plain ints
        attention_kwargs=options,
    )
    new_plans = copy.deepcopy(dict(plans))
    new_plans["configurations"][name] = {
        "inherits_from": base,
        "architecture": {
            **copy.deepcopy(dict(architecture)),
            "network_class_name": ATTENTION_NETWORKS[class_name],
            "arch_kwargs": arch_kwargs,
        },
    }
    return new_plans


def write_plans(path: Union[str, Path], plans: Mapping[str, Any]) -> Path:
    """Write a plans dict as JSON (nnU-Net's indentation) through :func:`sliceattn.io.save_atomically`.

    Args:
        path: the plans file, e.g. ``nnUNetPlans.json``.
        plans: the plans, as :func:`add_attention_configuration` returns them.

    Returns:
        ``path`` as a ``Path``.
    """
    text = json.dumps(plans, indent=4, sort_keys=False) + "\n"
    return save_atomically(path, lambda temporary: temporary.write_text(text))
