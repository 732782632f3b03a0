"""Where the paper's claims hold: 28x less attention-map memory, 100x fewer FLOPs than non-local.

The claim is about the attention maps of the blocks placed in the U-Net: ``010`` (bottom),
``101`` (second-bottom encoder and decoder) and ``111`` (all three). The table is analytic
(``sliceattn.cost``, exact against ``FlopCounterMode``); batch size cancels in every ratio.
It also gives the whole-block FLOP ratio, projections included, for the faithful RSA and the
lean ``qk_channels=C/8, project_once`` option.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from benchmarks.bench_common import CROPS, FLOP_CLAIM, MEMORY_CLAIM, Size
from sliceattn import cost

PLACEMENTS: dict[str, tuple[str, ...]] = {"010": ("bottom",), "101": ("second", "second"), "111": ("second", "bottom", "second")}


def claim_row(placement: str, crop: str) -> dict[str, object]:
    """Ratios non-local / RSA summed over the blocks of a placement at one crop."""
    shapes = [Size(crop, level, 1).shape for level in PLACEMENTS[placement]]

    def total(options: Callable[[tuple[int, ...]], dict[str, object]]) -> cost.Comparison:
        comparisons = [cost.compare(shape, **options(shape)) for shape in shapes]  # type: ignore[arg-type]
        return sum(comparisons[1:], comparisons[0])

    half = total(lambda shape: {})
    full = total(lambda shape: {"inter_channels": shape[1]})
    lean = total(lambda shape: {"qk_channels": shape[1] // 8, "project_once": True})
    return {
        "placement": placement,
        "crop": crop,
        "shapes": [list(s[1:]) for s in shapes],
        "map_memory_ratio": half.map_memory_ratio,
        "map_flop_ratio_half": half.map_flop_ratio,
        "map_flop_ratio_full": full.map_flop_ratio,
        "block_flop_ratio_faithful": half.block_flop_ratio,
        "block_flop_ratio_lean": lean.block_flop_ratio,
        "memory_claim_holds": half.map_memory_ratio >= MEMORY_CLAIM,
        "flop_claim_holds_half": half.map_flop_ratio >= FLOP_CLAIM,
        "flop_claim_holds_full": full.map_flop_ratio >= FLOP_CLAIM,
    }


@pytest.mark.parametrize("placement", sorted(PLACEMENTS))
def test_paper_claims(benchmark, placement: str) -> None:
    rows = benchmark(lambda: [claim_row(placement, crop) for crop in CROPS])
    benchmark.group = "paper claims"
    benchmark.extra_info.update({"block": "claims", "placement": placement, "claims": rows})
