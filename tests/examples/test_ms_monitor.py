"""Does the attention attend? Each map's distance from uniform, and the warning for uniform maps."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mslesion.training.loop import warn_uniform_blocks
from mslesion.training.monitor import (
    UNIFORM_PEAK, attention_state, attention_summary, peak, stayed_uniform, watch, with_recent_effect,
)
from sliceattn import RecurrentSliceAttention3d


def _state(query_key_scale: float) -> dict[str, dict[str, float]]:
    """The monitor's state after one forward of an RSA block whose query and key projections are scaled."""
    torch.manual_seed(0)
    block = RecurrentSliceAttention3d(4)
    query_key = slice(0, 2 * block.projection.qk_channels)
    with torch.no_grad():
        block.alpha.fill_(0.5)
        block.projection.weight[query_key].mul_(query_key_scale)
        block.projection.bias[query_key].mul_(query_key_scale)
    network = nn.Sequential(block)
    watch(network)
    network(torch.randn(1, 4, 4, 6, 5) * 3)
    return attention_state(network)


def test_peak_is_zero_for_the_uniform_map_and_one_for_one_hot() -> None:
    assert peak(0.25, 4) == 0.0 and peak(1.0, 4) == 1.0 and peak(1.0, 1) == 0.0
    assert peak(0.5, 4) == pytest.approx(1 / 3)


def test_uniform_maps_are_flagged_and_warned(capsys: pytest.CaptureFixture) -> None:
    state = _state(0.0)  # zero query and key: every logit 0, every map uniform
    values = state["0"]
    assert values["max_weight_axial"] == pytest.approx(1 / 4) and values["max_weight_sagittal"] == pytest.approx(1 / 5)
    assert max(v for k, v in values.items() if k.startswith("peak")) < 1e-6
    assert stayed_uniform(state) == ["0"]
    summary = attention_summary(state)
    assert summary["attention_alive"] is True and summary["attention_attends"] is False  # gate moved, attends to nothing
    warn_uniform_blocks(state)
    err = capsys.readouterr().err
    assert "warning: the attention block 0 attends to nothing" in err and "axial 0.250" in err


def test_peaked_maps_are_not_flagged(capsys: pytest.CaptureFixture) -> None:
    state = _state(4.0)  # large projections: logits of many C*H*W products, near one-hot maps
    assert min(v for k, v in state["0"].items() if k.startswith("peak")) > 10 * UNIFORM_PEAK
    assert stayed_uniform(state) == [] and attention_summary(state)["attention_attends"] is True
    warn_uniform_blocks(state)
    assert capsys.readouterr().err == ""


def test_the_peak_is_averaged_over_the_last_tenth_of_the_log() -> None:
    state = {"b": {"peak_axial": 0.5, "effect": 0.2}}
    log = [{"b.peak_axial": "0.5", "b.effect": "0.2"}] * 18 + [{"b.peak_axial": "0.01", "b.effect": "0.2"}] * 2
    assert stayed_uniform(with_recent_effect(state, log)) == ["b"]
    assert stayed_uniform(with_recent_effect(state, log[:18])) == []
