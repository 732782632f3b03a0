"""The MS-lesion example at the CPU preset: whole-scan prediction and the allocator setting.

- ``test_whole_scan_prediction``: one 182 x 218 x 182 three-modality scan (the synthetic ``mni`` preset,
  skull-stripped) through the CPU preset's network (``rsa-010``, filters 16..256) with 64^3 tiles at
  overlap 0.5, by the example's ``inference.segment`` (which tiles only the non-zero box) against MONAI's
  ``sliding_window_inference`` on the same network and tiles when MONAI is installed, else against a
  plain loop over the whole volume's tiles (``sliding_window_probabilities``). The baseline runs in the
  same test; ``extra_info`` holds both times and their ratio.
- ``test_train_step_allocator``: one training step (batch 2, 64^3 crops) with glibc's default allocator
  settings and with the example's ``tune_allocator`` (``M_MMAP_MAX`` = 0), alternating in one process.

The example's modules are imported from ``examples/ms_lesion`` (the folder a user copies).
"""

from __future__ import annotations

import ctypes
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "ms_lesion"
pytest.importorskip("nibabel", reason="the example's extra is not installed: pip install -e '.[examples]'")
pytest.importorskip("scipy", reason="the example's extra is not installed: pip install -e '.[examples]'")
if str(EXAMPLE) not in sys.path:
    sys.path.insert(0, str(EXAMPLE))

from cli import tune_allocator  # noqa: E402
from inference import segment, sliding_window_probabilities  # noqa: E402
from model import build_model  # noqa: E402

TILE = (64, 64, 64)
M_MMAP_MAX, GLIBC_DEFAULT_MMAP_MAX = -4, 65536


@pytest.fixture(scope="module")
def scan() -> np.ndarray:
    from synthetic import generate_case

    case = generate_case(0, preset="mni", seed=0)
    image = np.stack([case.images[m].astype(np.float32) for m in ("t1", "t2", "flair")])
    inside = image[:, case.brain_mask > 0]
    mean, std = inside.mean(1)[:, None, None, None], inside.std(1)[:, None, None, None]
    return np.where(case.brain_mask > 0, (image - mean) / std, 0).astype(np.float32)


@pytest.fixture(scope="module")
def network() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("rsa-010", filters="half").eval()


def seconds(call: Callable[[], object]) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def baseline(network: torch.nn.Module, scan: np.ndarray) -> tuple[str, Callable[[], object]]:
    """MONAI's sliding window on the same network and tiles, or a plain loop over the whole volume's tiles."""
    try:
        from monai.inferers import sliding_window_inference
    except ImportError:
        return "plain loop over the whole volume", lambda: sliding_window_probabilities(network, scan, TILE)
    volume = torch.from_numpy(scan)[None]

    @torch.no_grad()
    def monai() -> torch.Tensor:
        return torch.softmax(sliding_window_inference(volume, TILE, 2, network, overlap=0.5, mode="gaussian"), 1)

    return "monai.inferers.sliding_window_inference", monai


def test_whole_scan_prediction(benchmark, scan: np.ndarray, network: torch.nn.Module) -> None:
    name, call = baseline(network, scan)
    base = seconds(call)
    benchmark.group = "ms-lesion whole scan 182x218x182"
    benchmark.pedantic(lambda: segment(network, scan, TILE, overlap=0.5), rounds=1, iterations=1)
    ours = benchmark.stats.stats.min
    benchmark.extra_info.update(baseline=name, baseline_seconds=base, ratio=ours / base)


def test_train_step_allocator(benchmark) -> None:
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None:
        pytest.skip("no glibc mallopt on this platform")
    torch.manual_seed(0)
    network = build_model("rsa-010", filters="half")
    optimizer = torch.optim.Adam(network.parameters(), 1e-3)
    image, label = torch.randn(2, 3, *TILE), torch.randint(0, 2, (2, *TILE))

    def step() -> None:
        loss = torch.nn.functional.cross_entropy(network(image), label)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()  # warm-up
    default, tuned = [], []
    for _ in range(3):  # alternate, so that other load on the machine hits both alike
        mallopt(M_MMAP_MAX, GLIBC_DEFAULT_MMAP_MAX)
        default.append(seconds(step))
        assert tune_allocator()
        tuned.append(seconds(step))
    benchmark.group = "ms-lesion train step, rsa-010 16..256, batch 2, 64^3"
    benchmark.pedantic(step, rounds=1, iterations=1)  # with the tuned allocator, as the scripts run
    benchmark.extra_info.update(default_seconds=min(default), tuned_seconds=min(tuned),
                                ratio=min(tuned) / min(default))
