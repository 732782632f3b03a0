"""Autocast on the CPU: native-bf16 detection and its float32 fallback, what each script resolves ``--amp`` to
and records, and bf16 numerics against float32 on the same model."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mslesion import checkpoint, evaluate, predict, train
from mslesion.evaluation.metrics import case_counts
from mslesion.inference.lesions import label_lesions
from mslesion.inference.sliding_window import segment
from mslesion.model.loss import DiceCrossEntropy, WeightedCrossEntropy
from mslesion.model.unet import build_model
from mslesion.training import runtime
from cli_checks import one_error_line

CPU = torch.device("cpu")
TINY = ["--preset", "demo", "--filters", "tiny", "--crop", "16", "32", "32", "--batch-size", "2", "--no-progress",
        "--val-every", "0", "--lesion-crop-fraction", "0.5"]


@pytest.fixture
def no_native_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    """This process sees a CPU without native bf16 (a fresh warning state)."""
    monkeypatch.setattr(runtime, "native_cpu_bf16", lambda: None)
    monkeypatch.setattr(runtime, "_warned", set())


@pytest.fixture
def native_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    """This process sees a CPU that executes bf16 natively."""
    monkeypatch.setattr(runtime, "native_cpu_bf16", lambda: "AVX-512 BF16")
    monkeypatch.setattr(runtime, "_warned", set())


@pytest.fixture(scope="module")
def float32_run(cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("amp") / "run"
    assert train.main(["--data", str(cohort), "--iterations", "2", "--test-fraction", "0.5", "--amp", "none",
                       "--out", str(out), *TINY]) == 0
    return out


def recorded_as(run: Path, amp: str, folder: Path) -> Path:
    """A copy of ``run``'s model.pt whose record says it trained (and evaluated itself) with ``amp``."""
    saved = checkpoint.read(run / "model.pt")
    record = dataclasses.replace(saved.record, training=dataclasses.replace(saved.record.training, amp=amp))
    folder.mkdir(parents=True, exist_ok=True)
    return checkpoint.write_model(folder / "model.pt", record, saved.weights)


# ------------------------------------------------------------------------------------------------ detection


@pytest.mark.parametrize(("amx", "avx512_bf16", "expected"), [(True, False, "AMX"), (False, True, "AVX-512 BF16"),
                                                             (False, False, None)])
def test_native_bf16_from_torchs_cpu_queries(monkeypatch: pytest.MonkeyPatch, amx: bool, avx512_bf16: bool,
                                             expected: str | None) -> None:
    monkeypatch.setattr(runtime, "onednn_bf16", lambda: True)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    monkeypatch.setattr(runtime, "cpu_flags", lambda: pytest.fail("torch's queries answer; /proc/cpuinfo is not read"))
    assert runtime.native_cpu_bf16() == expected
    monkeypatch.setattr(runtime, "onednn_bf16", lambda: False)  # a torch whose oneDNN has no bf16 kernels
    assert runtime.native_cpu_bf16() is None


@pytest.mark.parametrize(("flags", "expected"), [({"avx2", "avx512_bf16"}, "AVX-512 BF16"),
                                                 ({"avx512f", "amx_tile", "amx_bf16"}, "AMX"), ({"avx2", "fma"}, None)])
def test_native_bf16_falls_back_to_the_cpuinfo_flags(monkeypatch: pytest.MonkeyPatch, flags: set[str],
                                                     expected: str | None) -> None:
    monkeypatch.setattr(runtime, "onednn_bf16", lambda: True)
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported", raising=False)
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported", raising=False)
    monkeypatch.setattr(runtime, "cpu_flags", lambda: flags)
    assert runtime.native_cpu_bf16() == expected


def test_this_machines_detection_agrees_with_its_cpuinfo() -> None:
    flags = runtime.cpu_flags()
    if not flags:
        pytest.skip("no /proc/cpuinfo")
    native = runtime.native_cpu_bf16()
    assert (native is not None) <= bool(flags & {"avx512_bf16", "amx_bf16"})


# ----------------------------------------------------------------------------------------------- resolving


def test_auto_is_bf16_only_where_native_and_none_is_float32(monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(runtime, "native_cpu_bf16", lambda: None)
    assert runtime.resolve_amp("auto", CPU) == "none" and runtime.amp_dtype("auto", CPU) is None
    monkeypatch.setattr(runtime, "native_cpu_bf16", lambda: "AMX")
    assert runtime.resolve_amp("auto", CPU) == "bf16" and runtime.amp_dtype("auto", CPU) is torch.bfloat16
    assert runtime.resolve_amp("none", CPU) == "none" and runtime.amp_dtype("none", CPU) is None
    assert "native AMX" in runtime.describe_amp("bf16", CPU)
    assert capsys.readouterr().err == ""


def test_explicit_bf16_without_native_support_is_honoured_with_one_warning(no_native_bf16: None,
                                                                            capsys: pytest.CaptureFixture) -> None:
    assert runtime.amp_dtype("bf16", CPU) is torch.bfloat16
    assert runtime.amp_dtype("bf16", CPU) is torch.bfloat16
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: --amp bf16: this CPU has no native bf16"), err


def test_fp16_on_the_cpu_is_refused_before_any_work(cohort: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(runtime.UsageError, match="--amp fp16 is for CUDA"):
        runtime.resolve_amp("fp16", CPU)
    out = tmp_path / "run"
    assert train.main(["--data", str(cohort), "--iterations", "1", "--amp", "fp16", "--out", str(out), *TINY]) == 2
    one_error_line(capsys, "--amp fp16 is for CUDA", "--amp bf16")
    assert not out.exists()


@pytest.mark.parametrize(("native", "expected"), [(None, "none"), ("AVX-512 BF16", "bf16")])
def test_the_run_records_the_autocast_it_used(cohort: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              native: str | None, expected: str) -> None:
    monkeypatch.setattr(runtime, "native_cpu_bf16", lambda: native)
    used: list[torch.dtype | None] = []
    real = runtime.amp_dtype

    def spy(choice: str, device: torch.device) -> None:  # records the dtype asked for, trains in float32 (fast)
        used.append(real(choice, device))

    monkeypatch.setattr("mslesion.training.loop.amp_dtype", spy)
    out = tmp_path / "run"
    assert train.main(["--data", str(cohort), "--iterations", "1", "--test-fraction", "0.25", "--out", str(out),
                       *TINY]) == 0
    assert json.loads((out / "metrics.json").read_text())["training"]["amp"] == expected
    assert used == [torch.bfloat16 if native else None]


def test_runs_recorded_before_the_choice_was_resolved_used_float32_on_the_cpu() -> None:
    assert runtime.recorded_amp("auto", "cpu") == "none"
    assert runtime.recorded_amp("bf16", "cpu") == "bf16"
    assert runtime.recorded_amp("auto", "cuda:0") in ("bf16", "fp16")


# -------------------------------------------------------------------------------------- evaluate, predict


def test_evaluate_uses_the_runs_autocast_unless_it_is_slow_here(float32_run: Path, cohort: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture) -> None:
    common = ["--data", str(cohort), "--split", str(float32_run / "split.json")]
    used: list[torch.dtype | None] = []
    real = evaluate.evaluate_cases
    # record the dtype asked for, run in float32 (fast everywhere; bf16 numerics are tested below)
    monkeypatch.setattr(evaluate, "evaluate_cases",
                        lambda *a, **k: used.append(k["amp_dtype"]) or real(*a, **{**k, "amp_dtype": None}))
    bf16_model = recorded_as(float32_run, "bf16", tmp_path / "bf16")
    monkeypatch.setattr(runtime, "native_cpu_bf16", lambda: None)
    assert evaluate.main(["--checkpoint", str(bf16_model), *common, "--out", str(tmp_path / "slow")]) == 0
    assert "using float32" in capsys.readouterr().err
    assert json.loads((tmp_path / "slow" / "metrics.json").read_text())["amp"] == "none"
    monkeypatch.setattr(runtime, "native_cpu_bf16", lambda: "AMX")
    assert evaluate.main(["--checkpoint", str(bf16_model), *common, "--out", str(tmp_path / "native")]) == 0
    assert evaluate.main(["--checkpoint", str(bf16_model), *common, "--amp", "none", "--out", str(tmp_path / "f")]) == 0
    assert evaluate.main(["--checkpoint", str(float32_run / "model.pt"), *common, "--out", str(tmp_path / "r")]) == 0
    assert used == [None, torch.bfloat16, None, None]
    assert json.loads((tmp_path / "native" / "metrics.json").read_text())["amp"] == "bf16"
    # the float32 run evaluated in float32 reproduces its own metrics.json
    expected = json.loads((float32_run / "metrics.json").read_text())["summary"]
    assert json.loads((tmp_path / "r" / "metrics.json").read_text())["voxel_dice"] == pytest.approx(expected["voxel_dice"])


def test_predict_takes_amp_and_onnx_refuses_a_low_precision_one(float32_run: Path, cohort: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture) -> None:
    common = ["--checkpoint", str(float32_run / "model.pt"), "--data", str(cohort)]
    assert predict.main([*common, "--engine", "onnx", "--amp", "bf16", "--out", str(tmp_path / "onnx")]) == 2
    one_error_line(capsys, "--engine onnx runs the network in float32", "--engine torch")
    assert not (tmp_path / "onnx").exists()
    assert predict.main([*common, "--amp", "fp16", "--out", str(tmp_path / "fp16")]) == 2
    one_error_line(capsys, "--amp fp16 is for CUDA")
    used: list[torch.dtype | None] = []
    monkeypatch.setattr(predict, "segment",
                        lambda *a, **k: used.append(k["amp_dtype"]) or segment(*a, **{**k, "amp_dtype": None}))
    monkeypatch.setattr(runtime, "native_cpu_bf16", lambda: "AMX")
    bf16_model = recorded_as(float32_run, "bf16", tmp_path / "bf16")
    assert predict.main(["--checkpoint", str(bf16_model), "--data", str(cohort), "--out", str(tmp_path / "p")]) == 0
    assert predict.main([*common, "--out", str(tmp_path / "q")]) == 0
    assert used == [torch.bfloat16] * 4 + [None] * 4
    assert "autocast: bf16 (native AMX" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------- numerics


@pytest.mark.parametrize("loss", [WeightedCrossEntropy, DiceCrossEntropy])
def test_the_loss_and_its_class_weights_stay_float32_under_bf16(loss: type) -> None:
    criterion = loss(1e-3, "swapped")
    torch.manual_seed(0)
    logits = torch.randn(2, 2, 4, 8, 8).bfloat16()
    target = torch.randint(0, 2, (2, 4, 8, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = criterion(logits, target)
    weight = criterion.cross_entropy.weight if loss is DiceCrossEntropy else criterion.weight
    assert weight.dtype == torch.float32
    assert low.dtype == torch.float32
    assert low.item() == pytest.approx(criterion(logits.float(), target).item(), rel=1e-6)


@pytest.fixture(scope="module")
def fitted() -> tuple[torch.nn.Module, np.ndarray, np.ndarray]:
    """A tiny network fitted to a 16 x 32 x 32 volume of bright spheres in noise: its mask is far from empty."""
    rng = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(*(np.arange(n) for n in (16, 32, 32)), indexing="ij"), -1)
    label = np.zeros((16, 32, 32), bool)
    for centre, radius in zip(rng.uniform((3, 5, 5), (13, 27, 27), (6, 3)), rng.uniform(1.5, 3.5, 6)):
        label |= np.linalg.norm(grid - centre, axis=-1) < radius
    image = (rng.normal(0, 0.5, (3, 16, 32, 32)) + 1.5 * label).astype(np.float32)
    torch.manual_seed(0)
    network = build_model("rsa-010", filters="tiny")
    optimizer = torch.optim.Adam(network.parameters(), 1e-2)
    inputs, target = torch.from_numpy(image)[None], torch.from_numpy(label.astype(np.int64))[None]
    for _ in range(40):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(network(inputs), target).backward()
        optimizer.step()
    return network.eval(), image, label


def test_bf16_masks_match_float32_on_the_same_model(fitted: tuple[torch.nn.Module, np.ndarray, np.ndarray]) -> None:
    network, image, label = fitted
    probability, mask = segment(network, image, (16, 32, 32))
    low_probability, low_mask = segment(network, image, (16, 32, 32), amp_dtype=torch.bfloat16)
    assert mask.sum() > 0.5 * label.sum()  # the fit predicts lesions, so the comparison means something
    agreement = case_counts(low_mask, mask)
    dice = 2 * agreement.tp / (2 * agreement.tp + agreement.fp + agreement.fn)
    assert dice > 0.97, dice
    assert abs(label_lesions(low_mask)[1] - label_lesions(mask)[1]) <= 1
    assert 0 < np.abs(low_probability - probability).max() < 0.1  # bf16 did run, and stayed close


def test_the_experiment_table_says_which_autocast_its_runs_used() -> None:
    from mslesion.evaluation.report import COLUMNS, table

    def run(amp: str) -> dict:
        return {"summary": {key: 0.5 for key, _ in COLUMNS}, "train_seconds": 1.0, "peak_memory_mb": 1.0,
                "peak_memory_kind": "cpu-max-rss", "training": {"amp": amp, "device": "cpu"}}

    assert "autocast: bf16, none." in table({"unet": [run("bf16"), run("auto")]})  # "auto" on the CPU: float32
