"""The training configuration (one frozen object, recorded whole) and the cases that used to pass silently."""

from __future__ import annotations

import csv
import dataclasses
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from mslesion import evaluate
from mslesion import predict
from mslesion import train
from mslesion.training import loop as training
from mslesion.checkpoint import read
from mslesion.config import RUN_FIELDS, TrainingConfig
from mslesion.data.reading import DataOptions
from mslesion.training.monitor import ALIVE_EFFECT
from mslesion.run import UsageError, read_split
from mslesion.synthetic.cohort import make_cohort
from cli_checks import one_error_line

TINY = ["--preset", "demo", "--filters", "tiny", "--crop", "16", "32", "32", "--batch-size", "2", "--no-progress",
        "--val-every", "0", "--lesion-crop-fraction", "0.5"]




def config_of(argv: list[str]) -> TrainingConfig:
    return train.make_config(train.build_parser().parse_args(argv))[0]


@pytest.fixture(scope="module")
def trained(cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 2-iteration run on half the cohort."""
    out = tmp_path_factory.mktemp("trained") / "run"
    assert train.main(["--data", str(cohort), "--iterations", "2", "--test-fraction", "0.5", "--out", str(out),
                       *TINY]) == 0
    return out


# ------------------------------------------------------------------------------------------ the config


def test_the_config_is_frozen_recorded_whole_and_read_back(cohort: Path, trained: Path) -> None:
    config = config_of(["--data", str(cohort), "--out", "x", *TINY])
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.lr = 1.0  # type: ignore[misc]
    assert TrainingConfig.from_record(json.loads(json.dumps(config.record()))) == config
    recorded = read(trained / "model.pt").record.training
    assert recorded.iterations == 2
    assert json.loads((trained / "metrics.json").read_text())["training"] == recorded.record()


def test_equal_values_written_differently_are_the_same_config(cohort: Path) -> None:
    a = config_of(["--data", str(cohort), "--out", "x", *TINY])
    b = config_of(["--data", str(cohort) + "/", "--out", "x", *TINY[:2], "--filters", "4,8,16,32,64", *TINY[4:]])
    assert a == b and not a.resume_differences(b)


def test_resume_ignores_only_the_fields_that_cannot_change_the_weights(cohort: Path) -> None:
    config = config_of(["--data", str(cohort), "--out", "x", *TINY])
    assert {"threads", "progress", "checkpoint_every", "out"} <= RUN_FIELDS
    assert not {"seed", "lr", "crop", "filters", "data_options", "method", "loss_weights"} & RUN_FIELDS
    changed = dataclasses.replace(config, threads=1, progress=True, checkpoint_every=7, out="elsewhere")
    assert config.resume_differences(changed) == []
    assert config.resume_differences(dataclasses.replace(config, seed=3)) == ["--seed: recorded 3, now 0"]


def test_a_split_file_with_another_key_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "split.json"
    path.write_text(json.dumps({"train": ["a"], "test": ["b"], "val": ["c"]}))
    with pytest.raises(UsageError, match=r"has keys \['val'\] besides 'train' and 'test'"):
        read_split(path)


# ------------------------------------------------------------------------------------------- evaluate


def test_evaluate_refuses_the_models_training_subjects_naming_them(trained: Path, cohort: Path, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture) -> None:
    split = json.loads((trained / "split.json").read_text())
    train_ids = split["train"]
    leaky = tmp_path / "leaky.json"
    leaky.write_text(json.dumps({"train": split["test"], "test": train_ids}))
    common = ["--checkpoint", str(trained / "model.pt"), "--data", str(cohort)]
    for extra in (["--split", str(leaky)], []):
        assert evaluate.main([*common, *extra, "--out", str(tmp_path / "e")]) == 2
        one_error_line(capsys, "the model was trained on", train_ids[0], "--include-training-subjects")
    assert not (tmp_path / "e").exists()
    assert evaluate.main([*common, "--split", str(trained / "split.json"), "--out", str(tmp_path / "held")]) == 0


def test_evaluate_refuses_a_brain_sized_reference_mask(trained: Path, cohort: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    data = tmp_path / "data"
    test_id = json.loads((trained / "split.json").read_text())["test"][0]
    shutil.copytree(cohort / test_id, data / test_id)
    shutil.copy(data / test_id / "brain_mask.nii.gz", data / test_id / "mask.nii.gz")
    assert evaluate.main(["--checkpoint", str(trained / "model.pt"), "--data", str(data), "--out",
                          str(tmp_path / "e")]) == 2
    one_error_line(capsys, "cover more than 10% of the brain")


def test_evaluate_warns_when_every_reference_mask_is_empty(trained: Path, cohort: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    data = tmp_path / "data"
    test_id = json.loads((trained / "split.json").read_text())["test"][0]
    shutil.copytree(cohort / test_id, data / test_id)
    mask = nib.load(data / test_id / "mask.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros(mask.shape, np.uint8), mask.affine), data / test_id / "mask.nii.gz")
    assert evaluate.main(["--checkpoint", str(trained / "model.pt"), "--data", str(data), "--out",
                          str(tmp_path / "e")]) == 0
    assert "warning: every reference mask is empty" in capsys.readouterr().err
    assert "every reference mask is empty" in json.loads((tmp_path / "e" / "metrics.json").read_text())["warnings"][0]


# -------------------------------------------------------------------------------------------- predict


def test_predict_refuses_an_out_folder_inside_the_subject_folders_even_when_discovery_fails(
        trained: Path, cohort: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = tmp_path / "data"
    shutil.copytree(cohort / "sub-001", data / "sub-001")
    (data / "sub-001" / "flair_old.nii.gz").write_bytes((data / "sub-001" / "flair.nii.gz").read_bytes())
    assert predict.main(["--checkpoint", str(trained / "model.pt"), "--data", str(data), "--out",
                         str(data / "sub-001")]) == 2
    one_error_line(capsys, "is inside the input data")
    assert not (data / "sub-001" / "sub-001.nii.gz").exists() and not (data / "sub-001" / "report.csv").exists()


def test_predict_says_which_nnunet_image_folder_it_reads(trained: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    data = make_cohort(tmp_path / "nn", subjects=2, preset="small", seed=0, montage=False, layout="nnunet")
    (data / "imagesTs").mkdir()
    for image in (data / "imagesTr").glob("sub-002_*"):
        image.rename(data / "imagesTs" / image.name.replace("sub-002", "sub-009"))
    common = ["--checkpoint", str(trained / "model.pt"), "--data", str(data)]
    assert predict.main([*common, "--out", str(tmp_path / "tr")]) == 0
    out = capsys.readouterr().out
    assert "reading imagesTr; imagesTs is not read (--nnunet-images imagesTs or both)" in out
    assert sorted(p.name for p in (tmp_path / "tr").glob("*.nii.gz")) == ["sub-001.nii.gz"]
    assert predict.main([*common, "--out", str(tmp_path / "all"), "--nnunet-images", "both"]) == 0
    assert sorted(p.name for p in (tmp_path / "all").glob("*.nii.gz")) == ["sub-001.nii.gz", "sub-009.nii.gz"]


# ------------------------------------------------------------------------------------------- training


def test_resume_refuses_training_files_that_changed_on_disk(cohort: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    data = tmp_path / "data"
    shutil.copytree(cohort, data)
    args = ["--data", str(data), "--iterations", "3", "--test-fraction", "0.5", "--out", str(tmp_path / "run"), *TINY]
    assert train.main([*args, "--stop-at", "1", "--checkpoint-every", "1"]) == 0
    train_id = read(tmp_path / "run" / "checkpoint.pt").record.split["train"][0]
    flair = nib.load(data / train_id / "flair.nii.gz")
    nib.save(nib.Nifti1Image(np.asanyarray(flair.dataobj) * 1.5, flair.affine), data / train_id / "flair.nii.gz")
    capsys.readouterr()
    assert train.main([*args, "--resume"]) == 2
    one_error_line(capsys, "input files changed on disk", f"{train_id} flair")


def test_ctrl_c_is_one_line_naming_the_last_checkpoint(cohort: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    step = training.train_step

    def interrupted(run: training.Run, iteration: int) -> float:
        if iteration == 3:
            raise KeyboardInterrupt
        return step(run, iteration)

    monkeypatch.setattr(training, "train_step", interrupted)
    out = tmp_path / "run"
    args = ["--data", str(cohort), "--iterations", "4", "--test-fraction", "0.5", "--out", str(out), *TINY]
    assert train.main([*args, "--checkpoint-every", "2"]) == 130
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("warning: ")]
    assert err == [f"interrupted: the last checkpoint is {out / 'checkpoint.pt'} (iteration 2 of 4); continue with "
                   "the same command and --resume"]
    monkeypatch.setattr(training, "train_step", step)
    assert train.main([*args, "--checkpoint-every", "2", "--resume"]) == 0


def test_the_log_shows_the_attention_alive_and_decay_kills_it(cohort: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture) -> None:
    common = ["--data", str(cohort), "--iterations", "80", "--test-fraction", "0.5", *TINY, "--augment", "none"]
    assert train.main([*common, "--out", str(tmp_path / "alive")]) == 0
    assert "stayed the identity" not in capsys.readouterr().err
    alive = last_log_row(tmp_path / "alive")
    axes = ("coronal", "sagittal", "axial")
    assert [c for c in alive if "alpha" in c] == [f"bottom_attention.alpha_{a}" for a in axes]
    assert float(alive["bottom_attention.effect"]) > ALIVE_EFFECT
    # The bottom of a 16x32x32 crop is 1x2x2: a coronal map over 2 slices, uniform at 0.5.
    assert float(alive["bottom_attention.max_weight_coronal"]) > 0.6
    metrics = json.loads((tmp_path / "alive" / "metrics.json").read_text())
    assert metrics["attention_alive"] is True and set(metrics["attention"]) == {"bottom_attention"}
    assert train.main([*common, "--out", str(tmp_path / "dead"), "--attention-weight-decay", "1e-5"]) == 0
    assert "warning: the attention block bottom_attention stayed the identity" in capsys.readouterr().err
    dead = last_log_row(tmp_path / "dead")
    assert float(dead["bottom_attention.effect"]) < ALIVE_EFFECT
    assert float(dead["bottom_attention.max_weight_coronal"]) < 0.6  # drifting back to uniform
    assert json.loads((tmp_path / "dead" / "metrics.json").read_text())["attention_alive"] is False


def last_log_row(run: Path) -> dict[str, str]:
    with (run / "log.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))[-1]


def test_a_unet_run_records_no_attention(trained: Path, cohort: Path, tmp_path: Path) -> None:
    assert train.main(["--data", str(cohort), "--iterations", "1", "--test-fraction", "0.5", "--method", "unet",
                       "--out", str(tmp_path / "u"), *TINY]) == 0
    metrics = json.loads((tmp_path / "u" / "metrics.json").read_text())
    assert metrics["attention_alive"] is None and metrics["attention"] == {}


def test_data_options_refuse_unknown_and_repeated_modalities() -> None:
    with pytest.raises(ValueError, match="distinct"):
        DataOptions(modalities=("t1", "t1"))
    with pytest.raises(ValueError, match="normalisation must be one of"):
        DataOptions(normalisation="auto")


def test_batches_without_augmentation_are_todays_crops_and_augmented_ones_keep_the_shape(cohort: Path) -> None:
    from mslesion.data.sampling import sample_crop

    config = config_of(["--data", str(cohort), "--out", "x", *TINY, "--augment", "none"])
    cases = [DataOptions().load(p) for p in DataOptions().find(cohort)]
    image, label = training.batch_for(5, cases, config, 0, 1)
    rng = np.random.default_rng([config.seed, 5])
    expected = []
    for _ in range(config.batch_size):
        case = cases[int(rng.integers(len(cases)))]
        expected.append(sample_crop(case, config.crop, rng, lesion_fraction=config.lesion_crop_fraction,
                                    centre=config.crop_centre))
    assert torch.equal(image, torch.from_numpy(np.stack([e[0] for e in expected])))
    assert torch.equal(label, torch.from_numpy(np.stack([e[1] for e in expected])))
    augmented = dataclasses.replace(config, augment="default")
    image_a, label_a = training.batch_for(5, cases, augmented, 0, 1)
    assert image_a.shape == image.shape and label_a.shape == label.shape and image_a.dtype == torch.float32
    assert set(torch.unique(label_a).tolist()) <= {0, 1, 255} and not torch.equal(image_a, image)
    again = training.batch_for(5, cases, augmented, 0, 1)
    assert torch.equal(again[0], image_a) and torch.equal(again[1], label_a)


def test_liveness_averages_the_effect_over_the_last_tenth_of_the_log() -> None:
    from mslesion.training.monitor import stayed_identity, with_recent_effect

    state = {"bottom_attention": {"alpha_axial": 3e-3, "effect": 8e-4}}  # one noisy last batch
    log = [{"bottom_attention.effect": str(e)} for e in [0.0] * 90 + [2e-3] * 9 + [8e-4]]
    assert stayed_identity(state) == ["bottom_attention"]
    assert stayed_identity(with_recent_effect(state, log)) == []
    dead = [{"bottom_attention.effect": "5e-5"}] * 100
    assert stayed_identity(with_recent_effect(state, dead)) == ["bottom_attention"]
