"""checkpoint.py, the one module that writes and reads model.pt and checkpoint.pt, and what the files record:
the configuration once (its flags in one table), the moving average with --ema, the training voxel spacing."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from mslesion import evaluate, experiment, predict, train
from mslesion.checkpoint import (
    SPACING_TOLERANCE, ResumeState, RunRecord, load_trained, read, spacing_warning, write_checkpoint, write_model,
)
from mslesion.config import FLAGS, TrainingConfig
from mslesion.data.reading import DataOptions
from mslesion.model.unet import build_model
from cli_checks import exit_code, one_error_line

PACKAGE = Path(train.__file__).resolve().parent
TINY = ["--preset", "demo", "--filters", "tiny", "--crop", "16", "32", "32", "--batch-size", "2", "--no-progress",
        "--val-every", "0", "--lesion-crop-fraction", "0.5"]


@pytest.fixture(scope="module")
def ema_run(cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 3-iteration run with a moving average of the weights, on half the cohort."""
    out = tmp_path_factory.mktemp("ema") / "run"
    assert train.main(["--data", str(cohort), "--iterations", "3", "--test-fraction", "0.5", "--ema", "0.5",
                       "--out", str(out), *TINY]) == 0
    return out


def tiny_record(**changes) -> RunRecord:
    training = TrainingConfig(data="/d", data_options=DataOptions(), preset="demo", iterations=4, batch_size=2,
                              crop=(16, 32, 32), filters=(4, 8, 16, 32, 64), lesion_crop_fraction=0.5, val_every=0,
                              lr_schedule="constant", out="/o", device="cpu", ema=0.5)
    values = {"training": training, "r": 0.002, "split": {"train": ["a", "b"], "test": ["c"]},
              "files": {"a": {"t1": "0f"}}, "spacings": {"a": (6.0, 4.0, 4.0), "b": (5.0, 4.0, 3.5)}}
    return RunRecord(**{**values, **changes})


# ------------------------------------------------------------------------------------------ one module


def test_no_other_module_loads_or_saves_torch_files() -> None:
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        calls = [node.func for node in ast.walk(tree) if isinstance(node, ast.Call)]
        torch_io = [f"torch.{f.attr}" for f in calls if isinstance(f, ast.Attribute) and f.attr in ("load", "save")
                    and isinstance(f.value, ast.Name) and f.value.id == "torch"]
        imported = [a.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module == "torch"
                    for a in node.names if a.name in ("load", "save")]
        if path.name == "checkpoint.py":
            assert sorted(set(torch_io)) == ["torch.load", "torch.save"]
        else:
            assert not torch_io and not imported, path


def test_model_and_checkpoint_round_trip(tmp_path: Path) -> None:
    record = tiny_record()
    network = build_model(**record.training.network_config)
    ema = AveragedModel(network, multi_avg_fn=get_ema_multi_avg_fn(0.5), use_buffers=True)
    ema.update_parameters(network)  # the first update copies, the next ones average
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.add_(1.0)
    ema.update_parameters(network)
    optimizer = torch.optim.Adam(network.parameters())
    state = ResumeState(3, 1.5, network.state_dict(), optimizer.state_dict(), {"scale": 1.0}, {"python": (3, 4)},
                        ema.state_dict())
    write_checkpoint(tmp_path / "checkpoint.pt", record, state)
    write_model(tmp_path / "model.pt", record, ema.module.state_dict())
    saved, model = read(tmp_path / "checkpoint.pt"), read(tmp_path / "model.pt")
    assert saved.record == record == model.record and model.state is None
    # Both files predict with the average; the checkpoint also holds the last weights and the average's state.
    for name, value in ema.module.state_dict().items():
        assert torch.equal(saved.weights[name], value) and torch.equal(model.weights[name], value)
        assert torch.equal(saved.state.network[name], network.state_dict()[name])
    assert not torch.equal(saved.weights["head.bias"], saved.state.network["head.bias"])
    assert (saved.state.iteration, saved.state.seconds, saved.state.rng) == (3, 1.5, {"python": (3, 4)})
    again = AveragedModel(build_model(**record.training.network_config), multi_avg_fn=get_ema_multi_avg_fn(0.5),
                          use_buffers=True)
    again.load_state_dict(saved.state.ema)
    assert int(again.n_averaged) == int(ema.n_averaged) == 2
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # written atomically, no leftovers


def test_an_older_or_incomplete_checkpoint_is_one_error_line(ema_run: Path, cohort: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    record = tiny_record()
    older = tmp_path / "older.pt"
    torch.save({"config": record.training.network_config, "model": {}, "training": record.training.record()}, older)
    incomplete = tmp_path / "incomplete.pt"
    content = torch.load(ema_run / "model.pt", weights_only=False)
    torch.save({k: v for k, v in content.items() if k != "spacings"}, incomplete)
    for path, fragments in ((older, ("has an older layout", "retrain it")), (incomplete, ("lacks spacings",))):
        assert predict.main(["--checkpoint", str(path), "--data", str(cohort), "--out", str(tmp_path / "p")]) == 2
        one_error_line(capsys, str(path), *fragments)
        assert evaluate.main(["--checkpoint", str(path), "--data", str(cohort), "--out", str(tmp_path / "e")]) == 2
        one_error_line(capsys, str(path), *fragments)
    assert not (tmp_path / "p").exists() and not (tmp_path / "e").exists()


# -------------------------------------------------------------------------------------------------- EMA


def test_the_checkpoint_of_an_ema_run_predicts_with_the_average(ema_run: Path, cohort: Path, tmp_path: Path) -> None:
    final, _ = load_trained(ema_run / "model.pt")
    latest, saved = load_trained(ema_run / "checkpoint.pt")
    for name, value in final.state_dict().items():
        assert torch.equal(value, latest.state_dict()[name]), name
    assert not all(torch.equal(v, saved.state.network[k]) for k, v in final.state_dict().items())  # not the last
    subject = tmp_path / "data" / "sub-001"
    subject.mkdir(parents=True)
    for name in ("t1", "t2", "flair"):
        shutil.copy(cohort / "sub-001" / f"{name}.nii.gz", subject)
    for name in ("model.pt", "checkpoint.pt"):
        assert predict.main(["--checkpoint", str(ema_run / name), "--data", str(tmp_path / "data"), "--out",
                             str(tmp_path / name), "--probabilities"]) == 0
    a, b = (np.asanyarray(nib.load(tmp_path / name / "sub-001_prob.nii.gz").dataobj) for name in ("model.pt",
                                                                                                 "checkpoint.pt"))
    np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------------------------- spacing


def resampled_copy(cohort: Path, subject: str, root: Path, factor: float) -> Path:
    """``subject``'s files with every voxel ``factor`` times the size in the header (the same arrays)."""
    (root / subject).mkdir(parents=True)
    for source in sorted((cohort / subject).glob("*.nii.gz")):
        image = nib.load(source)
        affine = image.affine.copy()
        affine[:3, :3] *= factor
        nib.save(nib.Nifti1Image(np.asanyarray(image.dataobj), affine), root / subject / source.name)
    return root


def test_the_training_spacing_is_recorded_and_another_one_warns(ema_run: Path, cohort: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture) -> None:
    record = read(ema_run / "model.pt").record
    assert sorted(record.spacings) == sorted(record.split["train"])
    assert set(record.spacings.values()) == {(6.0, 4.0, 4.0)}  # the small preset, in model order (D, H, W)
    test_id = record.split["test"][0]
    finer = resampled_copy(cohort, test_id, tmp_path / "finer", 0.5)
    shutil.copytree(cohort / record.split["test"][1], finer / record.split["test"][1])  # as trained: no warning
    capsys.readouterr()
    assert predict.main(["--checkpoint", str(ema_run / "model.pt"), "--data", str(finer), "--out",
                         str(tmp_path / "p")]) == 0
    warned = [line for line in capsys.readouterr().err.splitlines() if "trained at" in line]
    assert warned == [f"warning: subject {test_id}: the model was trained at 6x4x4 mm (D, H, W) and this scan is "
                      "3x2x2 mm, more than 25% apart on an axis; its results may be worse than on scans like the "
                      "training ones"]
    assert "resampl" not in warned[0]  # interpolating to the training grid measured worse (Dice 0.46 against 0.66)
    assert evaluate.main(["--checkpoint", str(ema_run / "model.pt"), "--data", str(finer), "--out",
                          str(tmp_path / "e")]) == 0
    assert [line for line in capsys.readouterr().err.splitlines() if "trained at" in line] == warned
    assert json.loads((tmp_path / "e" / "metrics.json").read_text())["warnings"] == [warned[0][len("warning: "):]]


def test_the_spacing_tolerance_is_relative_to_the_training_range() -> None:
    record = tiny_record()  # trained at 5-6 x 4 x 3.5-4 mm
    assert SPACING_TOLERANCE == 0.25
    for spacing in ((6.0, 4.0, 4.0), (7.5, 4.0, 4.0), (4.1, 3.3, 2.9), (5.5, 5.0, 5.0)):
        assert spacing_warning(record, "s", spacing) is None, spacing
    for spacing in ((7.6, 4.0, 4.0), (5.0, 3.1, 4.0), (3.0, 1.0, 1.0)):
        note = spacing_warning(record, "s", spacing)
        assert note is not None and "trained at 5x4x3.5 to 6x4x4 mm" in note, spacing


# -------------------------------------------------------------------------------------------- the flags


def test_every_field_has_its_flag_in_the_one_table_and_the_parser_has_it() -> None:
    fields = {f.name for f in dataclasses.fields(TrainingConfig)} - {"data_options"}
    fields |= {f"data_options.{f.name}" for f in dataclasses.fields(DataOptions)}
    assert set(FLAGS) == fields
    options = {flag: action for action in train.build_parser()._actions for flag in action.option_strings}
    assert set(FLAGS.values()) <= set(options)
    # make_config reads a field as given from its flag's dest, which is then the field's name (it derives the
    # fields whose dest is not, such as malloc_tuning from --no-malloc-tuning).
    given = {key for key, flag in FLAGS.items() if options[flag].dest == key}
    assert {"split_file", "prior_start", "progress", "lr", "seed", "overlap", "threads", "stop_at"} <= given
    assert {"malloc_tuning", "demo_cohort"}.isdisjoint(given)


def test_resume_differences_name_the_real_flags(tmp_path: Path) -> None:
    config = train.make_config(train.build_parser().parse_args(["--data", str(tmp_path), "--out", "x", *TINY]))[0]
    changed = dataclasses.replace(config, split_file="split.json", prior_start=False,
                                  data_options=DataOptions(label2="ignore", patterns={"mask": "*les*"}))
    assert changed.resume_differences(config) == [
        "--split (split_file): recorded None, now 'split.json'",
        "--pattern (patterns): recorded {}, now {'mask': '*les*'}",
        "--label2: recorded 'error', now 'ignore'",
        "--no-prior-start (prior_start): recorded True, now False",
    ]
    for line in changed.resume_differences(config):
        assert line.split()[0].rstrip(":") in {a for action in train.build_parser()._actions for a in action.option_strings}


def test_a_resumed_run_with_other_data_and_prior_options_names_their_flags(cohort: Path, tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture) -> None:
    args = ["--data", str(cohort), "--iterations", "2", "--test-fraction", "0.5", "--out", str(tmp_path / "r"), *TINY]
    assert train.main([*args, "--stop-at", "1", "--checkpoint-every", "1"]) == 0
    capsys.readouterr()
    assert train.main([*args, "--resume", "--no-prior-start", "--label2", "ignore"]) == 2
    one_error_line(capsys, "--label2: recorded 'error', now 'ignore'",
                   "--no-prior-start (prior_start): recorded True, now False")


# ------------------------------------------------------------------------------------------ experiment


def test_experiment_makes_each_run_as_train_makes_it(cohort: Path, tmp_path: Path) -> None:
    flags = experiment.training_parser().parse_args(["--iterations", "2", *TINY, "--lr", "0.01"])
    options = DataOptions(modalities=("flair", "t1"))
    made = experiment.run_config(flags, options, str(cohort), "ncl-010", tmp_path / "split-1.json", 1, tmp_path / "r")
    same = train.make_config(train.build_parser().parse_args([
        "--data", str(cohort), "--split", str(tmp_path / "split-1.json"), "--method", "ncl-010", "--seed", "1",
        "--out", str(tmp_path / "r"), "--resume", "--modalities", "flair,t1", "--iterations", "2", *TINY,
        "--lr", "0.01"]))[0]
    assert made == same
    assert TrainingConfig.from_record(json.loads(json.dumps(made.record()))) == made  # what the child reads


def test_experiment_refuses_a_bad_training_flag_before_writing_anything(cohort: Path, tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "exp"
    common = ["--data", str(cohort), "--methods", "unet", "--splits", "1", "--train-fraction", "0.5", "--out", str(out)]
    for extra, fragments in ((["--weight-decay", "-1"], ["--weight-decay"]),
                             (["--iteratons", "3"], ["unrecognized arguments: --iteratons", "train.py --help"])):
        assert exit_code(experiment.main, [*common, "--", *TINY, *extra]) == 2
        one_error_line(capsys, *fragments)
        assert not out.exists()


def test_the_child_refuses_its_internal_option_with_other_flags(capsys: pytest.CaptureFixture) -> None:
    assert train.main(["--run-config", "-", "--iterations", "3"]) == 2
    one_error_line(capsys, "--run-config is experiment.py's internal option")
    assert isinstance(train.build_parser().parse_args(["--run-config", "-"]), argparse.Namespace)
