"""The MS-lesion example at the CPU preset: whole-scan prediction and the allocator setting.

- ``test_whole_scan_prediction``: one 182 x 218 x 182 three-modality scan (the synthetic ``mni`` preset,
  skull-stripped) through the CPU preset's network (``rsa-010``, filters 16..256) with 64^3 tiles at
  overlap 0.5, by the example's ``inference.segment`` (which tiles only the non-zero box) against MONAI's
  ``sliding_window_inference`` on the same network and tiles when MONAI is installed, else against a
  plain loop over the whole volume's tiles (``sliding_window_probabilities``). The baseline runs in the
  same test; ``extra_info`` holds both times and their ratio.
- ``test_train_step_allocator``: one training step (batch 2, 64^3 crops) with glibc's default allocator
  settings and with the example's ``tune_allocator`` (``M_MMAP_MAX`` = 0), each in a fresh process,
  alternating; the benchmark's own timing is empty, the step times are in ``extra_info``.

- ``test_whole_scan_prediction_onnx``: the same scan, network and tiles through ``inference.segment``
  with the torch network and with its onnxruntime export (``onnx_engine.onnx_network``, same thread
  count); the export itself is not timed. Needs the ``onnx`` extra.

All three take 30 s to minutes on 2 cores and run only with ``SLICEATTN_BENCH=full``. The example's
modules are imported from ``examples/ms_lesion`` (the folder a user copies).
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.bench_common import FULL

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "ms_lesion"
pytest.importorskip("nibabel", reason="the example's extra is not installed: pip install -e '.[examples]'")
pytest.importorskip("scipy", reason="the example's extra is not installed: pip install -e '.[examples]'")
if str(EXAMPLE) not in sys.path:
    sys.path.insert(0, str(EXAMPLE))

from mslesion.inference.sliding_window import segment, sliding_window_probabilities  # noqa: E402
from mslesion.model.unet import build_model  # noqa: E402

TILE = (64, 64, 64)
#: every case here is long: the quick mode (the default) leaves them out
pytestmark = pytest.mark.skipif(not FULL, reason="a long whole-scan or fresh-process case: runs with SLICEATTN_BENCH=full")


@pytest.fixture(scope="module")
def scan() -> np.ndarray:
    from mslesion.synthetic.cohort import generate_case

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


def test_whole_scan_prediction_onnx(benchmark, scan: np.ndarray, network: torch.nn.Module) -> None:
    pytest.importorskip("onnxruntime", reason="the onnx extra is not installed: pip install -e '.[onnx]'")
    pytest.importorskip("onnxscript", reason="the onnx extra is not installed: pip install -e '.[onnx]'")
    from mslesion.inference.onnx_engine import onnx_network

    engine = onnx_network(network, TILE)
    start = time.perf_counter()
    expected = segment(network, scan, TILE, overlap=0.5)[0]
    torch_seconds = time.perf_counter() - start
    benchmark.group = "ms-lesion whole scan 182x218x182, onnxruntime"
    probability = benchmark.pedantic(lambda: segment(engine, scan, TILE, overlap=0.5)[0], rounds=1, iterations=1)
    onnx_seconds = benchmark.stats.stats.min
    difference = float(np.abs(probability - expected).max())
    benchmark.extra_info.update(baseline="torch (inference.segment, same network and tiles)", baseline_seconds=torch_seconds,
                                ratio=onnx_seconds / torch_seconds, max_probability_difference=difference,
                                threads=torch.get_num_threads())


STEP = """
import sys, time, torch
sys.path.insert(0, sys.argv[1])
from mslesion.training.runtime import tune_allocator
from mslesion.model.unet import build_model
if sys.argv[2] == "tuned":
    assert tune_allocator()
torch.manual_seed(0)
network = build_model("rsa-010", filters="half")
optimizer = torch.optim.Adam(network.parameters(), 1e-3)
image, label = torch.randn(2, 3, 64, 64, 64), torch.randint(0, 2, (2, 64, 64, 64))
times = []
for _ in range(6):
    start = time.perf_counter()
    loss = torch.nn.functional.cross_entropy(network(image), label)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    times.append(time.perf_counter() - start)
print(min(times[1:]))
"""


def step_seconds(setting: str) -> float:
    """The fastest of 5 training steps (after one warm-up) in a fresh process with ``setting``."""
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_MAX_"}
    child = subprocess.run([sys.executable, "-c", STEP, str(EXAMPLE), setting], env=env, capture_output=True,
                           text=True, check=True)
    return float(child.stdout.split()[-1])


def test_train_step_allocator(benchmark) -> None:
    if getattr(ctypes.CDLL(None), "mallopt", None) is None:
        pytest.skip("no glibc mallopt on this platform")
    # Each setting in its own process (an allocator setting changed mid-process keeps the heap the other
    # one built), alternating so that other load on the machine hits both alike.
    default, tuned = [], []
    for _ in range(2):
        default.append(step_seconds("default"))
        tuned.append(step_seconds("tuned"))
    benchmark.group = "ms-lesion train step, rsa-010 16..256, batch 2, 64^3"
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    benchmark.extra_info.update(default_seconds=min(default), tuned_seconds=min(tuned),
                                ratio=min(tuned) / min(default))
