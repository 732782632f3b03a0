"""End to end on a tiny synthetic cohort: model, train, resume, evaluate, predict, figure."""

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from mslesion import evaluate
from mslesion import predict
from mslesion import train
from mslesion.checkpoint import load_trained, read
from mslesion.model.unet import METHODS, build_model, parse_method
from mslesion.run import UsageError
from sliceattn import NonLocal3d, RecurrentSliceAttention3d

TINY = ["--filters", "tiny", "--crop", "16", "32", "32", "--batch-size", "2", "--test-fraction", "0.5",
        "--no-progress", "--lesion-crop-fraction", "0.5"]


@pytest.fixture(scope="module")
def rsa_run(cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("rsa")
    train.main(["--data", str(cohort), "--method", "rsa-010", "--iterations", "4", "--val-every", "2",
                "--out", str(out), *TINY])
    return out


@pytest.mark.parametrize(("method", "kind", "count"), [
    ("unet", None, 0), ("rsa-010", RecurrentSliceAttention3d, 1), ("rsa-101", RecurrentSliceAttention3d, 2),
    ("rsa-111", RecurrentSliceAttention3d, 3), ("ncl-010", NonLocal3d, 1), ("ncl-101", NonLocal3d, 2),
    ("ncl-111", NonLocal3d, 3),
])
def test_placements(method: str, kind: type | None, count: int) -> None:
    model = build_model(method, filters="tiny")
    blocks = [m for m in model.modules() if kind is not None and isinstance(m, kind)]
    assert len(blocks) == count
    if method.endswith("010") or method.endswith("111"):
        assert isinstance(model.bottom_attention, kind)
    if method.endswith("101") or method.endswith("111"):
        assert isinstance(model.encoder_attention, kind) and isinstance(model.decoder_attention, kind)
        assert model.encoder_attention is not model.decoder_attention
    assert model(torch.randn(1, 3, 16, 32, 32)).shape == (1, 2, 16, 32, 32)


def test_default_filters_are_the_papers() -> None:
    model = build_model("unet")
    assert [block[0].out_channels for block in model.encoders] == [32, 64, 128, 256]
    assert model.bottom[0].out_channels == 512 and len(model.pools) == 4


@pytest.mark.parametrize(("kwargs", "fragment"), [
    ({"method": "rsa-011"}, "method must be one of"),
    ({"method": "unet", "filters": "huge"}, "filters must be one of"),
])
def test_bad_model_arguments(kwargs: dict, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        build_model(**kwargs)


def test_help_documents_every_flag(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        train.main(["--help"])
    text = capsys.readouterr().out
    for flag in ("--data", "--method", "--iterations", "--batch-size", "--crop", "--lr", "--weight-decay",
                 "--loss-weights", "--resume", "--device", "--amp", "--seed", "--out"):
        assert flag in text
    assert "paper 800" in text and "1e-3" in text and "1e-5" in text


def test_training_writes_the_run_folder(rsa_run: Path) -> None:
    for name in ("model.pt", "checkpoint.pt", "log.csv", "metrics.json", "cases.csv", "figure.png", "split.json",
                 "attention.png"):
        assert (rsa_run / name).is_file(), name
    log = (rsa_run / "log.csv").read_text().splitlines()
    assert len(log) == 5 and log[0].startswith("iteration,loss")
    assert log[2].split(",")[3] != ""  # validation at iteration 2
    metrics = json.loads((rsa_run / "metrics.json").read_text())
    assert metrics["method"] == "rsa-010" and 0.0 <= metrics["summary"]["sample_dice"] <= 1.0
    assert len(metrics["test"]) == 2 and not set(metrics["test"]) & set(metrics["train"])
    assert (rsa_run / "figure.png").read_bytes()[:4] == b"\x89PNG"
    model, saved = load_trained(rsa_run / "model.pt")
    assert saved.record.training.crop == (16, 32, 32) and isinstance(model.bottom_attention, RecurrentSliceAttention3d)


@pytest.mark.parametrize("extra", [[], ["--ema", "0.5", "--loss", "dice-ce"]], ids=["final", "ema-dice-ce"])
def test_resume_equals_uninterrupted(cohort: Path, tmp_path: Path, extra: list[str]) -> None:
    common = ["--data", str(cohort), "--method", "ncl-101", "--iterations", "4", "--val-every", "0",
              "--checkpoint-every", "10", *TINY, *extra]
    train.main([*common, "--out", str(tmp_path / "whole")])
    train.main([*common, "--out", str(tmp_path / "killed"), "--stop-at", "2"])
    assert not (tmp_path / "killed" / "model.pt").exists()
    assert read(tmp_path / "killed" / "checkpoint.pt").state.iteration == 2
    train.main([*common, "--out", str(tmp_path / "killed"), "--resume"])
    whole = read(tmp_path / "whole" / "model.pt").weights
    resumed = read(tmp_path / "killed" / "model.pt").weights
    for name, value in whole.items():
        assert torch.equal(value, resumed[name]), name
    if extra:  # model.pt holds the moving average; the checkpoint holds it too, and the last weights to resume
        last = read(tmp_path / "whole" / "checkpoint.pt")
        assert all(torch.equal(value, last.weights[name]) for name, value in whole.items())
        assert not all(torch.equal(value, last.state.network[name]) for name, value in whole.items())
    losses = [line.split(",")[1] for line in (tmp_path / "whole" / "log.csv").read_text().splitlines()]
    assert losses == [line.split(",")[1] for line in (tmp_path / "killed" / "log.csv").read_text().splitlines()]


def test_evaluate_cli(rsa_run: Path, cohort: Path, tmp_path: Path) -> None:
    assert evaluate.main(["--checkpoint", str(rsa_run / "model.pt"), "--data", str(cohort),
                          "--split", str(rsa_run / "split.json"), "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "metrics.json").read_text())
    expected = json.loads((rsa_run / "metrics.json").read_text())["summary"]
    assert summary["cases"] == 2
    assert summary["voxel_dice"] == pytest.approx(expected["voxel_dice"])
    high = tmp_path / "high"
    assert evaluate.main(["--checkpoint", str(rsa_run / "model.pt"), "--data", str(cohort), "--threshold", "0.9",
                          "--split", str(rsa_run / "split.json"), "--out", str(high)]) == 0
    rows = {row["id"]: row for row in csv.DictReader((tmp_path / "cases.csv").open())}
    for row in csv.DictReader((high / "cases.csv").open()):  # a higher threshold never predicts more
        assert int(row["predicted_voxels"]) <= int(rows[row["id"]]["predicted_voxels"])


def test_predict_writes_masks_in_the_original_geometry(rsa_run: Path, cohort: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    subjects = tmp_path / "subjects"
    for source in sorted(cohort.glob("sub-00[123]")):
        (subjects / source.name).mkdir(parents=True)
        for name in ("t1", "t2", "flair"):
            (subjects / source.name / f"{name}.nii.gz").write_bytes((source / f"{name}.nii.gz").read_bytes())
    (subjects / "sub-002" / "flair.nii.gz").write_bytes(b"not a nifti")  # a broken file
    (subjects / "sub-003" / "t2.nii.gz").unlink()  # a missing modality
    out = tmp_path / "masks"
    code = predict.main(["--checkpoint", str(rsa_run / "model.pt"), "--data", str(subjects), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 1 and "subject sub-002" in err and "flair" in err
    assert "subject sub-003" in err and "t2" in err
    # no temporary files left behind
    assert sorted(p.name for p in out.iterdir()) == ["report.csv", "sub-001.nii.gz", "sub-001_lesions.csv"]
    mask = nib.load(out / "sub-001.nii.gz")
    source = nib.load(cohort / "sub-001" / "flair.nii.gz")
    assert mask.shape == source.shape and np.allclose(mask.affine, source.affine)
    assert mask.get_data_dtype() == np.uint8 and set(np.unique(np.asanyarray(mask.dataobj))) <= {0, 1}


@pytest.mark.parametrize("method", METHODS)
def test_every_method_name_builds_its_blocks_at_its_placement(method: str) -> None:
    kind, placement = parse_method(method)
    model = build_model(method, filters="tiny")
    sites = (model.encoder_attention, model.bottom_attention, model.decoder_attention)
    block = {None: torch.nn.Identity, "rsa": RecurrentSliceAttention3d, "nonlocal": NonLocal3d}[kind]
    # The name's three bits are the encoder, bottom and decoder sites; the other sites stay the identity.
    assert "".join("0" if isinstance(site, torch.nn.Identity) else "1" for site in sites) == placement
    assert all(isinstance(site, block if bit == "1" else torch.nn.Identity) for site, bit in zip(sites, placement))
    assert sum(isinstance(m, (RecurrentSliceAttention3d, NonLocal3d)) for m in model.modules()) == placement.count("1")
    assert model(torch.randn(1, 3, 16, 32, 32)).shape == (1, 2, 16, 32, 32)


def test_experiment_table_has_table1_columns_and_mean_std() -> None:
    from mslesion.evaluation import report as experiment_report

    def run(dice: float) -> dict:
        summary = {"sample_dice": dice, "voxel_dice": dice, "sample_iou": dice / 2, "voxel_iou": dice / 2,
                   "voxel_lesion_f1": 0.5}
        return {"summary": summary, "train_seconds": 10.0, "peak_memory_mb": 100.0, "peak_memory_kind": "cpu-max-rss"}

    text = experiment_report.table({"rsa-010": [run(0.6), run(0.8)]})
    header, _, row = text.splitlines()[:3]
    assert "Sample-avg Dice" in header and "Voxel-avg IoU" in header and "Peak memory" in header
    assert row.startswith("| rsa-010 | 70.00 ± 14.14 | 70.00 ± 14.14 | 35.00 ± 7.07")


def test_experiment_splits_are_saved_and_reused(cohort: Path, tmp_path: Path) -> None:
    from mslesion import experiment

    ids = [f"sub-00{i}" for i in range(1, 5)]
    first = experiment.make_splits(ids, 2, 0.5, tmp_path)
    split = json.loads(first[0].read_text())
    assert len(split["train"]) == 2 and sorted(split["train"] + split["test"]) == [f"sub-00{i}" for i in range(1, 5)]
    first[1].write_text(json.dumps({"train": ["sub-004"], "test": ["sub-001"]}))
    assert json.loads(experiment.make_splits(ids, 2, 0.5, tmp_path)[1].read_text())["train"] == ["sub-004"]
    first[1].write_text(json.dumps({"train": ["x"], "test": ["y"]}))  # a split of other data is refused
    with pytest.raises(UsageError, match=r"ids \['x', 'y'\] are not in the data"):
        experiment.make_splits(ids, 2, 0.5, tmp_path)
