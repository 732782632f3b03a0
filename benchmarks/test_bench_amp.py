"""bf16 autocast on the CPU against float32, for the MS-lesion example: training steps, torch.compile and
whole-scan prediction (with onnxruntime beside them).

Every comparison runs its variants alternating in one process (round 1: A B, round 2: A B...), so that
other load on a shared machine hits them alike; ``extra_info`` holds each variant's fastest time, their
ratios and the load average (``os.getloadavg``) before and after. The benchmark's own timing is that
of the whole alternation and means nothing alone. bf16 runs only where the CPU executes it natively
(``mslesion.training.runtime.native_cpu_bf16``): elsewhere torch's reference kernels take minutes per
step, and ``extra_info`` says so instead.

- ``test_conv_bf16_probe`` (quick mode too): one ``Conv3d`` 16 -> 16 on ``1 x 16 x 8 x 16 x 16``, float32
  against bf16 autocast: what bf16 costs on this CPU, native or not, in a second.
- ``test_train_step``: one training step (batch 2, Adam, the weighted cross-entropy in float32) of the
  ``cpu`` preset's network (``rsa-010``, filters 16..256, 64^3 crops) and of candidate presets (96^3 and
  80 x 96 x 96 crops; the paper's filters 32..512), float32 and bf16.
- ``test_compile_train_step``, ``test_compile_tile_inference``: ``torch.compile`` (inductor) against eager
  for the ``cpu`` step and for one batch of two 64^3 inference tiles, in the dtype ``--amp auto`` picks
  here; the compilation is timed apart.
- ``test_whole_scan``: one 182 x 218 x 182 scan (the synthetic ``mni`` preset) through ``inference.segment``
  with 64^3 tiles at overlap 0.5: torch float32, torch bf16 and onnxruntime (float32; needs the ``onnx``
  extra); with bf16 also the Dice of its mask against float32's, the largest probability difference and
  the lesion counts. The network is untrained (its masks mean little) unless
  ``SLICEATTN_BENCH_CHECKPOINT`` names a ``train.py`` model.pt, whose tile (its training crop) is then used.

All but the probe run only with ``SLICEATTN_BENCH=full`` (minutes on 2 cores).
"""

from __future__ import annotations

import os
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

from mslesion.inference.lesions import label_lesions  # noqa: E402
from mslesion.inference.sliding_window import segment  # noqa: E402
from mslesion.model.loss import WeightedCrossEntropy  # noqa: E402
from mslesion.checkpoint import load_trained  # noqa: E402
from mslesion.model.unet import build_model  # noqa: E402
from mslesion.training.runtime import native_cpu_bf16, resolve_amp, tune_allocator  # noqa: E402

NATIVE = native_cpu_bf16()
ROUNDS = int(os.environ.get("SLICEATTN_BENCH_AMP_ROUNDS", "3"))
#: (name, filters, crop): the cpu preset and the candidates a preset search may choose from
CANDIDATES = [("cpu", "half", (64, 64, 64)), ("crop-96", "half", (96, 96, 96)),
              ("crop-80x96x96", "half", (80, 96, 96)), ("filters-paper", "paper", (64, 64, 64))]
full_only = pytest.mark.skipif(not FULL, reason="a long case: runs with SLICEATTN_BENCH=full")
Variant = Callable[[], object]


def autocast(dtype: torch.dtype | None) -> torch.autocast:
    return torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def alternate(variants: dict[str, Variant], rounds: int = ROUNDS, warm_up: bool = True) -> dict[str, object]:
    """Run ``variants`` in turn ``rounds`` times (after one warm-up call each with ``warm_up``); their fastest
    times, each one's ratio to the first variant, and the load averages before and after."""
    for call in variants.values() if warm_up else ():
        call()
    times: dict[str, list[float]] = {name: [] for name in variants}
    load_before = os.getloadavg()[0]
    for _ in range(rounds):
        for name, call in variants.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    best = {name: min(values) for name, values in times.items()}
    first = next(iter(best.values()))
    return {"seconds": best, "ratio": {name: value / first for name, value in best.items()},
            "load_average": [load_before, os.getloadavg()[0]], "rounds": rounds,
            "threads": torch.get_num_threads(), "native_bf16": NATIVE}


def bf16_or_reason(info: dict[str, object]) -> bool:
    """Whether bf16 is timed here; if not, ``info`` says why."""
    if NATIVE is None:
        info["bf16"] = "not timed: this CPU has no native bf16 (see test_conv_bf16_probe for what it costs)"
    return NATIVE is not None


def record(benchmark, group: str, info: dict[str, object]) -> None:
    benchmark.group = group
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    benchmark.extra_info.update(info)


def test_conv_bf16_probe(benchmark) -> None:
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(16, 16, 3, padding=1)
    image = torch.randn(1, 16, 8, 16, 16)

    def forward(dtype: torch.dtype | None) -> Variant:
        def call() -> None:
            with torch.no_grad(), autocast(dtype):
                conv(image)
        return call

    record(benchmark, "ms-lesion bf16 probe, Conv3d 16->16, 1x16x8x16x16",
           alternate({"float32": forward(None), "bf16": forward(torch.bfloat16)}))


def train_step(network: torch.nn.Module, crop: tuple[int, ...], dtype: torch.dtype | None) -> Variant:
    """One Adam step of ``network`` on a batch of two random crops, the loss outside autocast (float32)."""
    optimizer = torch.optim.Adam(network.parameters(), 1e-3)
    criterion = WeightedCrossEntropy(1e-3)
    generator = torch.Generator().manual_seed(0)
    image = torch.randn(2, 3, *crop, generator=generator)
    label = (torch.rand(2, *crop, generator=generator) < 0.05).long()

    def step() -> None:
        with autocast(dtype):
            logits = network(image)
        loss = criterion(logits, label)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


@full_only
@pytest.mark.parametrize(("name", "filters", "crop"), CANDIDATES, ids=[c[0] for c in CANDIDATES])
def test_train_step(benchmark, name: str, filters: str, crop: tuple[int, int, int]) -> None:
    tune_allocator()
    torch.manual_seed(0)
    network = build_model("rsa-010", filters=filters)
    info: dict[str, object] = {"candidate": name, "filters": filters, "crop": list(crop), "batch": 2}
    variants = {"float32": train_step(network, crop, None)}
    if bf16_or_reason(info):
        variants["bf16"] = train_step(network, crop, torch.bfloat16)
    record(benchmark, f"ms-lesion train step, rsa-010 {filters}, batch 2, {'x'.join(map(str, crop))}",
           {**info, **alternate(variants)})


def compiled_against_eager(benchmark, group: str, build: Callable[[torch.nn.Module], Variant],
                           network: torch.nn.Module) -> None:
    """Time ``build(network)`` eager and ``build(torch.compile(network))`` alternating; the compilation apart."""
    eager = build(network)
    compiled = build(torch.compile(network))
    start = time.perf_counter()
    compiled()  # compiles
    compile_seconds = time.perf_counter() - start
    record(benchmark, group, {**alternate({"eager": eager, "compiled": compiled}),
                              "compile_seconds": compile_seconds, "amp": resolve_amp("auto", torch.device("cpu"))})


@full_only
def test_compile_train_step(benchmark) -> None:
    tune_allocator()
    torch.manual_seed(0)
    dtype = torch.bfloat16 if resolve_amp("auto", torch.device("cpu")) == "bf16" else None
    compiled_against_eager(benchmark, "ms-lesion torch.compile, cpu train step",
                           lambda network: train_step(network, (64, 64, 64), dtype), build_model("rsa-010", filters="half"))


@full_only
def test_compile_tile_inference(benchmark) -> None:
    torch.manual_seed(0)
    dtype = torch.bfloat16 if resolve_amp("auto", torch.device("cpu")) == "bf16" else None
    tiles = torch.randn(2, 3, 64, 64, 64)

    def build(network: torch.nn.Module) -> Variant:
        def infer() -> None:
            with torch.inference_mode(), autocast(dtype):
                network(tiles)
        return infer

    compiled_against_eager(benchmark, "ms-lesion torch.compile, two 64^3 tiles", build,
                           build_model("rsa-010", filters="half").eval())


@pytest.fixture(scope="module")
def scan() -> np.ndarray:
    from mslesion.synthetic.cohort import generate_case

    case = generate_case(0, preset="mni", seed=0)
    image = np.stack([case.images[m].astype(np.float32) for m in ("t1", "t2", "flair")])
    inside = image[:, case.brain_mask > 0]
    mean, std = inside.mean(1)[:, None, None, None], inside.std(1)[:, None, None, None]
    return np.where(case.brain_mask > 0, (image - mean) / std, 0).astype(np.float32)


def scan_network() -> tuple[torch.nn.Module, tuple[int, int, int], str]:
    """The network of the whole-scan case, its tile and where it came from."""
    checkpoint = os.environ.get("SLICEATTN_BENCH_CHECKPOINT")
    if checkpoint:
        model, saved = load_trained(checkpoint, torch.device("cpu"))
        return model.eval(), tuple(saved.record.training.crop), checkpoint
    torch.manual_seed(0)
    return build_model("rsa-010", filters="half").eval(), (64, 64, 64), "untrained rsa-010, filters 16..256"


def agreement(low: tuple[np.ndarray, np.ndarray], reference: tuple[np.ndarray, np.ndarray]) -> dict[str, float]:
    """Dice of the masks, the largest probability difference and both lesion counts."""
    (low_probability, low_mask), (probability, mask) = low, reference
    both = int(np.count_nonzero(low_mask & mask))
    total = int(np.count_nonzero(low_mask)) + int(np.count_nonzero(mask))
    return {"mask_dice": 2 * both / total if total else 1.0,
            "max_probability_difference": float(np.abs(low_probability - probability).max()),
            "lesions": label_lesions(low_mask)[1], "lesions_reference": label_lesions(mask)[1],
            "mask_voxels": int(np.count_nonzero(low_mask)), "mask_voxels_reference": int(np.count_nonzero(mask))}


@full_only
def test_whole_scan(benchmark, scan: np.ndarray) -> None:
    tune_allocator()
    network, tile, source = scan_network()
    results: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def predict(name: str, model: object, dtype: torch.dtype | None) -> Variant:
        def call() -> None:
            results[name] = segment(model, scan, tile, overlap=0.5, amp_dtype=dtype)
        return call

    info: dict[str, object] = {"network": source, "tile": list(tile), "overlap": 0.5}
    variants = {"float32": predict("float32", network, None)}
    if bf16_or_reason(info):
        variants["bf16"] = predict("bf16", network, torch.bfloat16)
    try:
        from mslesion.inference.onnx_engine import onnx_network

        variants["onnx"] = predict("onnx", onnx_network(network, tile), None)
    except ImportError as exc:
        info["onnx"] = f"not timed: {exc} (pip install -e '.[onnx]')"
    # no warm-up call: a whole scan is hundreds of tiles, the first ones warm it up
    info.update(alternate(variants, rounds=int(os.environ.get("SLICEATTN_BENCH_AMP_SCAN_ROUNDS", "1")), warm_up=False))
    for name in ("bf16", "onnx"):
        if name in results:
            info[f"{name}_against_float32"] = agreement(results[name], results["float32"])
    record(benchmark, "ms-lesion whole scan 182x218x182, float32 / bf16 / onnxruntime", info)
