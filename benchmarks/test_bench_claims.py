"""Where the paper's claims hold: 28x less attention-map memory, 100x fewer FLOPs than non-local.

The claim is about the attention maps of the blocks placed in the U-Net: ``010`` (bottom),
``101`` (second-bottom encoder and decoder) and ``111`` (all three). The table is analytic
(``sliceattn.cost``, exact against ``FlopCounterMode``); batch size cancels in every ratio.
It also gives the whole-block FLOP ratio, projections included, for the faithful RSA and the
lean ``qk_channels=C/8, project_once`` option.
"""

from __future__ import annotations

import pytest

from benchmarks.bench_common import CROPS, Size
from sliceattn import cost

PLACEMENTS: dict[str, tuple[str, ...]] = {"010": ("bottom",), "101": ("second", "second"), "111": ("second", "bottom", "second")}
MEMORY_CLAIM, FLOP_CLAIM = 28, 100


def claim_row(placement: str, crop: str) -> dict[str, object]:
    """Ratios non-local / RSA summed over the blocks of a placement at one crop."""
    shapes = [Size(crop, level, 1).shape for level in PLACEMENTS[placement]]

    def total(costs: list[cost.Cost]) -> cost.Cost:
        return sum(costs, cost.Cost(0, 0))

    rsa_maps = total([sum((cost.slice_attention_cost(s, d) for d in cost.RSA_ORDER), cost.Cost(0, 0)) for s in shapes])
    nl_half = total([cost.nonlocal_map_cost(s) for s in shapes])
    nl_full = total([cost.nonlocal_map_cost(s, inter_channels=s[1]) for s in shapes])
    rsa_block = total([cost.rsa_cost(s) for s in shapes])
    lean_block = total([cost.rsa_cost(s, qk_channels=s[1] // 8, project_once=True) for s in shapes])
    nl_block = total([cost.nonlocal_cost(s) for s in shapes])
    memory = nl_half.map_bytes / rsa_maps.map_bytes
    flops_half, flops_full = nl_half.forward / rsa_maps.forward, nl_full.forward / rsa_maps.forward
    return {
        "placement": placement,
        "crop": crop,
        "shapes": [list(s[1:]) for s in shapes],
        "map_memory_ratio": memory,
        "map_flop_ratio_half": flops_half,
        "map_flop_ratio_full": flops_full,
        "block_flop_ratio_faithful": nl_block.forward / rsa_block.forward,
        "block_flop_ratio_lean": nl_block.forward / lean_block.forward,
        "memory_claim_holds": memory >= MEMORY_CLAIM,
        "flop_claim_holds_half": flops_half >= FLOP_CLAIM,
        "flop_claim_holds_full": flops_full >= FLOP_CLAIM,
    }


@pytest.mark.parametrize("placement", sorted(PLACEMENTS))
def test_paper_claims(benchmark, placement: str) -> None:
    rows = benchmark(lambda: [claim_row(placement, crop) for crop in CROPS])
    benchmark.group = "paper claims"
    benchmark.extra_info.update({"block": "claims", "placement": placement, "claims": rows})
