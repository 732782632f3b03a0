"""The MS-lesion example's training-time augmentation against one training step of the demo network.

``test_augment_batch[strength]``: ``augment`` on a batch of two crops of the demo preset (32 x 64 x 64,
three channels), each cut from a random volume with ``margin(strength, crop)`` around it, every round
with a new ``np.random.Generator`` (the transforms are drawn per crop, so the mean over rounds is the cost
per iteration). The baseline, measured in the same run: one training step (forward, backward, Adam) of
the demo network (``rsa-010``, filters ``tiny``) on a batch of the same size; ``extra_info`` holds the
step's seconds and the ratio (mean augmentation time / step time).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "ms_lesion"
pytest.importorskip("nibabel", reason="the example's extra is not installed: pip install -e '.[examples]'")
pytest.importorskip("scipy", reason="the example's extra is not installed: pip install -e '.[examples]'")
pytest.importorskip("batchgeneratorsv2", reason="the example's extra is not installed: pip install -e '.[examples]'")
if str(EXAMPLE) not in sys.path:
    sys.path.insert(0, str(EXAMPLE))

from mslesion.data.augment import augment, margin  # noqa: E402
from mslesion.model.unet import build_model  # noqa: E402

CROP = (32, 64, 64)
BATCH = 2
ROUNDS = 20


@pytest.fixture(scope="module")
def step_seconds() -> float:
    """The median of 3 training steps of the demo network (after one warm-up) on a batch of ``CROP``."""
    torch.manual_seed(0)
    network = build_model("rsa-010", filters="tiny")
    optimizer = torch.optim.Adam(network.parameters(), 1e-3)
    image, label = torch.randn(BATCH, 3, *CROP), torch.randint(0, 2, (BATCH, *CROP))
    times = []
    for _ in range(4):
        start = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(network(image), label)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return float(np.median(times[1:]))


@pytest.mark.parametrize("strength", ["light", "default", "heavy"])
def test_augment_batch(benchmark, step_seconds: float, strength: str) -> None:
    shape = tuple(c + 2 * m for c, m in zip(CROP, margin(strength, CROP)))
    data = np.random.default_rng(0)
    crops = [(data.standard_normal((3, *shape), dtype=np.float32), (data.random(shape) < 0.01).astype(np.uint8))
             for _ in range(BATCH)]
    seeds = iter(range(10**6))

    def batch() -> None:
        rng = np.random.default_rng([0, next(seeds)])
        for image, label in crops:
            augment(image, label, rng, strength, CROP)

    benchmark.group = f"ms-lesion augmentation, batch {BATCH} of {'x'.join(map(str, CROP))}"
    benchmark.pedantic(batch, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    mean = benchmark.stats.stats.mean
    benchmark.extra_info.update(baseline="one training step, rsa-010 tiny", baseline_seconds=step_seconds,
                                margin=margin(strength, CROP), ratio=mean / step_seconds)
