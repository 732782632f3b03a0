"""Warm start: a plain nnU-Net checkpoint into an attention network, the blocks at identity.

nnU-Net's ``-pretrained_weights`` refuses a checkpoint that lacks any of the network's keys, so
a plain network's checkpoint cannot start an attention network directly. These helpers copy
every plain entry and leave the attention blocks (``attention.*`` keys) as they are, which at
init is the identity: the warm-started network computes what the plain one computed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Union

import torch
from torch import Tensor, nn

__all__ = ["ATTENTION_PREFIX", "load_plain_weights", "plain_state_dict", "warm_start_state_dict"]

#: State-dict prefix of the attention blocks in the attention networks.
ATTENTION_PREFIX = "attention."
# added by DistributedDataParallel and torch.compile around a saved module
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")

Checkpoint = Union[str, os.PathLike, Mapping[str, Any]]


def plain_state_dict(checkpoint: Checkpoint) -> dict[str, Tensor]:
    """The network weights of an nnU-Net checkpoint file or dict, or a bare state dict.

    ``module.`` (DDP) and ``_orig_mod.`` (``torch.compile``) prefixes are removed.

    Raises:
        TypeError: neither a path nor a mapping of tensors.
    """
    if isinstance(checkpoint, (str, os.PathLike)):
        checkpoint = torch.load(checkpoint, map_location="cpu", weights_only=False)
    if not isinstance(checkpoint, Mapping):
        raise TypeError(f"checkpoint must be a path, an nnU-Net checkpoint dict or a state dict, got {type(checkpoint).__name__}")
    weights = checkpoint.get("network_weights", checkpoint)
    state = {}
    for key, value in weights.items():
        if not isinstance(value, Tensor):
            raise TypeError(f"checkpoint entry {key!r} is a {type(value).__name__}, not a tensor: not a state dict")
        for prefix in _WRAPPER_PREFIXES:
            while key.startswith(prefix):
                key = key[len(prefix):]
        state[key] = value
    return state


def _unwrap(network: nn.Module) -> nn.Module:
    while isinstance(getattr(network, "module", None), nn.Module) or isinstance(getattr(network, "_orig_mod", None), nn.Module):
        network = getattr(network, "_orig_mod", None) or network.module
    return network


def warm_start_state_dict(network: nn.Module, checkpoint: Checkpoint) -> dict[str, Tensor]:
    """``network``'s state dict with every entry outside the attention blocks taken from ``checkpoint``.

    Args:
        network: an attention network (e.g. :class:`~sliceattn.nnunet.AttentionPlainConvUNet`),
            possibly wrapped by DDP or ``torch.compile``.
        checkpoint: the plain network's checkpoint (path, nnU-Net checkpoint dict or state dict).

    Raises:
        KeyError: the checkpoint lacks a plain key of the network, or has keys the network does
            not (listed by name): it is not the plain counterpart of this network.
        ValueError: a tensor of a different shape (e.g. another number of classes).
    """
    plain = plain_state_dict(checkpoint)
    state = _unwrap(network).state_dict()
    expected = {key for key in state if not key.startswith(ATTENTION_PREFIX)}
    missing, unexpected = sorted(expected - set(plain)), sorted(set(plain) - expected)
    if missing or unexpected:
        raise KeyError(
            f"checkpoint is not the plain counterpart of this network: missing keys {missing[:8]}"
            f"{' ...' if len(missing) > 8 else ''}, unexpected keys {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}"
        )
    for key in sorted(expected):
        if plain[key].shape != state[key].shape:
            raise ValueError(
                f"checkpoint entry {key!r} has shape {tuple(plain[key].shape)}, the network expects {tuple(state[key].shape)}"
            )
        state[key] = plain[key].to(dtype=state[key].dtype, device=state[key].device)
    return state


def load_plain_weights(network: nn.Module, checkpoint: Checkpoint) -> nn.Module:
    """Load a plain nnU-Net checkpoint into an attention network in place; the blocks are untouched.

    Args:
        network, checkpoint: as in :func:`warm_start_state_dict`.

    Returns:
        ``network``.

    Raises:
        KeyError, ValueError: as :func:`warm_start_state_dict`.
    """
    _unwrap(network).load_state_dict(warm_start_state_dict(network, checkpoint))
    return network
