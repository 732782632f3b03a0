"""The example as a tool for real scans: names as data sets write them, options on the command line and
recorded by the run, nothing overwritten, one ``error:`` line per user mistake."""

from __future__ import annotations

import ast
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from mslesion import evaluate
from mslesion import experiment
from mslesion import make_cohort as make_cohort_cli
from mslesion import predict
from mslesion import train
from mslesion.checkpoint import read
from mslesion.data.reading import default_roles, find_cases
from mslesion.run import LOCK_NAME, UsageError, locked
from mslesion.training import loop as training_loop
from mslesion.checkpoint import read as read_checkpoint
from mslesion.synthetic.cohort import make_cohort
from cli_checks import exit_code, one_error_line

EXAMPLE = Path(train.__file__).resolve().parents[1]  # the folder a user copies
TINY = ["--preset", "demo", "--filters", "tiny", "--crop", "16", "32", "32", "--batch-size", "2", "--no-progress",
        "--val-every", "0", "--lesion-crop-fraction", "0.5"]
# A real-world naming of the synthetic cohort's files (t1, t2, flair, mask, brain_mask), one per subject.
NAMINGS = [
    {"t1": "sub-01_space-FLAIR_T1w", "t2": "sub-01_T2w", "flair": "sub-01_FLAIR",
     "mask": "sub-01_space-FLAIR_label-lesion_mask", "brain_mask": "sub-01_desc-brain_mask"},
    {"t1": "T1_reg2FLAIR", "t2": "T2_in_FLAIR_space", "flair": "FLAIR_brain_n4", "mask": "consensus_reg2FLAIR",
     "brain_mask": "brainmask"},
    {"t1": "patient03_T1W", "t2": "patient03_T2W", "flair": "patient03_FLAIR", "mask": "patient03_lesions",
     "brain_mask": "brain_mask"},
    {"t1": "P4_T1_T1", "t2": "P4_T1_T2", "flair": "P4_T1_FLAIR", "mask": "P4_T1_MASK", "brain_mask": "P4_brainmask"},
]




@pytest.fixture(scope="module")
def renamed(cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The cohort with each subject's files named as another data set names them."""
    root = tmp_path_factory.mktemp("renamed")
    for naming, source in zip(NAMINGS, sorted(cohort.glob("sub-*"))):
        (root / source.name).mkdir()
        for role, name in naming.items():
            shutil.copy(source / f"{role}.nii.gz", root / source.name / f"{name}.nii.gz")
    return root


@pytest.fixture(scope="module")
def foreground_run(cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run") / "fg"
    # The cohort has brain-mask files; the default normalisation does not use them.
    assert train.main(["--data", str(cohort), "--iterations", "3", "--test-fraction", "0.5", "--label2", "ignore",
                       "--out", str(out), *TINY]) == 0
    return out


# ------------------------------------------------------------------------------------------------- names


@pytest.mark.parametrize(("name", "roles"), [
    ("sub-01_FLAIR.nii.gz", {"flair"}), ("sub-01_space-FLAIR_T1w.nii.gz", {"t1"}), ("sub-01_T2w.nii", {"t2"}),
    ("sub-01_space-FLAIR_label-lesion_mask.nii.gz", {"mask"}), ("sub-01_desc-brain_mask.nii.gz", {"brain_mask"}),
    ("sub-01_ce-gadolinium_T1w.nii.gz", set()),
    ("T1_reg2FLAIR.nii.gz", {"t1"}), ("T2_in_FLAIR_space.nii.gz", {"t2"}), ("FLAIR_brain_n4.nii.gz", {"flair"}),
    ("consensus_reg2FLAIR.nii.gz", {"mask"}), ("T1_brain.nii.gz", {"t1"}), ("brainmask.nii.gz", {"brain_mask"}),
    ("brain_mask.nii.gz", {"brain_mask"}), ("T1_brain_mask.nii.gz", {"brain_mask", "t1"}),
    ("brain_regtoMNI.nii.gz", set()), ("lesions.nii.gz", {"mask"}), ("length.nii.gz", set()),
    ("T2star.nii.gz", set()), ("T2*.nii.gz", set()), ("T1_gado.nii.gz", set()), ("wmh.nii.gz", {"mask"}),
])
def test_names_are_read_by_whole_tokens_and_bids_entities(name: str, roles: set[str]) -> None:
    assert default_roles(name) == roles


def test_a_brain_file_is_never_taken_as_the_lesion_mask(tmp_path: Path) -> None:
    # With substring globs "*gt*" matched "regtoMNI": the brain mask trained as the lesion label.
    folder = tmp_path / "s1"
    folder.mkdir()
    for name in ("T1", "T2", "FLAIR", "brain_regtoMNI", "lesions"):
        (folder / f"{name}.nii.gz").write_bytes(b"x")
    (case,) = find_cases(tmp_path)
    assert case.mask.name == "lesions.nii.gz" and case.brain_mask is None


def test_real_world_names_resolve_with_no_option(renamed: Path, capsys: pytest.CaptureFixture) -> None:
    found = {c.id: c for c in find_cases(renamed)}
    for naming, case_id in zip(NAMINGS, sorted(found)):
        case = found[case_id]
        chosen = {**{m: p.name for m, p in case.images.items()}, "mask": case.mask.name,
                  "brain_mask": case.brain_mask.name}
        assert chosen == {role: f"{name}.nii.gz" for role, name in naming.items()}
    # --list shows the roles and the lesion fractions, and stops.
    assert train.main(["--data", str(renamed), "--list"]) == 0
    printed = capsys.readouterr().out
    assert "sub-01_space-FLAIR_label-lesion_mask.nii.gz" in printed and "% of the brain" in printed
    assert "looks like a brain" not in printed


def test_ambiguous_names_list_the_candidates_and_name_pattern(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder = tmp_path / "training01"
    folder.mkdir()
    for name in ("mprage_pp", "t2_pp", "flair_pp", "mask1", "mask2"):
        (folder / f"{name}.nii.gz").write_bytes(b"x")
    assert train.main(["--data", str(tmp_path), "--list"]) == 1
    one_error_line(capsys, "2 files could be the lesion mask", "mask1.nii.gz", "mask2.nii.gz", "--pattern mask=GLOB")
    (case,) = find_cases(tmp_path, patterns={"mask": "*mask1*"})
    assert case.mask.name == "mask1.nii.gz"


def test_a_brain_mask_given_as_lesion_mask_is_refused_before_training(cohort: Path, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture) -> None:
    args = ["--data", str(cohort), "--pattern", "mask=brain_mask*", "--pattern", "brain_mask=none",
            "--iterations", "1", "--out", str(tmp_path / "run"), *TINY]
    assert train.main([*args[:6], "--list"]) == 0
    assert "this looks like a brain or tissue mask" in capsys.readouterr().out
    assert train.main(args) == 2
    one_error_line(capsys, "cover more than 10% of the brain", "--pattern mask=GLOB")
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------------- recorded data options


def test_patterns_and_label2_are_recorded_and_used_downstream(foreground_run: Path, cohort: Path,
                                                              tmp_path: Path) -> None:
    recorded = read(foreground_run / "model.pt").record.training
    assert recorded.data_options.record() == {"layout": "auto", "modalities": ["t1", "t2", "flair"], "patterns": {},
                                                "label2": "ignore", "resample": False, "normalisation": "foreground"}
    # evaluate.py has --label2 and reads the recorded value by default.
    assert evaluate.main(["--checkpoint", str(foreground_run / "model.pt"), "--data", str(cohort), "--out",
                          str(tmp_path / "e"), "--label2", "lesion", "--overlap", "0.25",
                          "--include-training-subjects"]) == 0
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())  # strict JSON: no bare NaN
    assert metrics["cases"] == 4


def test_contradicting_the_model_is_refused_naming_both(foreground_run: Path, cohort: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    common = ["--checkpoint", str(foreground_run / "model.pt"), "--data", str(cohort), "--out", str(tmp_path)]
    assert predict.main([*common, "--modalities", "flair,t1"]) == 2
    one_error_line(capsys, "--modalities flair,t1 differs from the model's t1,t2,flair")
    assert evaluate.main([*common, "--normalisation", "brain-mask"]) == 2
    one_error_line(capsys, "--normalisation brain-mask differs from the model's foreground")
    assert not any(tmp_path.iterdir())


def test_modalities_flag_takes_the_documented_comma_list(cohort: Path, tmp_path: Path) -> None:
    out = tmp_path / "ft"
    assert train.main(["--data", str(cohort), "--modalities", "flair,t1", "--iterations", "1", "--test-fraction",
                       "0.25", "--out", str(out), *TINY]) == 0
    recorded = read(out / "model.pt").record.training
    assert recorded.data_options.modalities == ("flair", "t1") and recorded.network_config["in_channels"] == 2


def test_experiment_passes_data_options_to_training_splits_and_figure(cohort: Path, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "exp"
    command = ["--data", str(cohort), "--methods", "unet", "--splits", "1", "--train-fraction", "0.5", "--out",
               str(out), "--modalities", "flair", "t1", "--", "--iterations", "1", *TINY]
    assert experiment.main(command) == 0
    assert read(out / "runs" / "unet" / "split-0" / "model.pt").record.training.data_options.modalities == ("flair", "t1")
    assert (out / "figure.png").is_file()
    stamp = (out / "runs" / "unet" / "split-0" / "model.pt").stat().st_mtime_ns
    assert experiment.main(command) == 0  # the same command reuses the finished run
    assert (out / "runs" / "unet" / "split-0" / "model.pt").stat().st_mtime_ns == stamp
    capsys.readouterr()
    # Other arguments: the finished run is not reused as if it answered them.
    assert experiment.main([*command[:-len(TINY) - 2], "--iterations", "1", "--lr", "0.01", *TINY]) == 2
    one_error_line(capsys, "unet split-0", "--lr: recorded 0.001, now 0.01")
    assert experiment.main([*command, "--modalities", "t2"]) == 2
    one_error_line(capsys, "--modalities after '--'")


# ----------------------------------------------------------------------------------------- normalisation


def copy_subjects(cohort: Path, root: Path, names: tuple[str, ...]) -> Path:
    for source in sorted(cohort.glob("sub-00[12]")):
        (root / source.name).mkdir(parents=True)
        for name in names:
            shutil.copy(source / f"{name}.nii.gz", root / source.name)
    return root


def test_prediction_does_not_depend_on_an_optional_brain_mask_file(foreground_run: Path, cohort: Path,
                                                                   tmp_path: Path) -> None:
    with_mask = copy_subjects(cohort, tmp_path / "a", ("t1", "t2", "flair", "brain_mask"))
    without = copy_subjects(cohort, tmp_path / "b", ("t1", "t2", "flair"))
    for data, out in ((with_mask, "pa"), (without, "pb")):
        assert predict.main(["--checkpoint", str(foreground_run / "model.pt"), "--data", str(data), "--out",
                             str(tmp_path / out), "--device", "cpu"]) == 0
    for case_id in ("sub-001", "sub-002"):
        a = np.asanyarray(nib.load(tmp_path / "pa" / f"{case_id}.nii.gz").dataobj)
        b = np.asanyarray(nib.load(tmp_path / "pb" / f"{case_id}.nii.gz").dataobj)
        np.testing.assert_array_equal(a, b)


def test_a_brain_mask_model_refuses_scans_without_their_brain_mask(cohort: Path, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "bm"
    assert train.main(["--data", str(cohort), "--iterations", "1", "--test-fraction", "0.25", "--out", str(out),
                       "--normalisation", "brain-mask", *TINY]) == 0
    assert read(out / "model.pt").record.training.data_options.normalisation == "brain-mask"
    capsys.readouterr()
    without = copy_subjects(cohort, tmp_path / "b", ("t1", "t2", "flair"))
    assert predict.main(["--checkpoint", str(out / "model.pt"), "--data", str(without), "--out",
                         str(tmp_path / "p")]) == 1
    err = capsys.readouterr().err
    assert "error: subject sub-001:" in err and "has no brain-mask file" in err and "--normalisation foreground" in err
    assert not (tmp_path / "p" / "sub-001.nii.gz").exists()


# ----------------------------------------------------------------------------------- nothing overwritten


def test_predict_never_replaces_files_and_refuses_input_folders(foreground_run: Path, cohort: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture) -> None:
    nnunet = make_cohort(tmp_path / "nn", subjects=2, preset="small", seed=0, montage=False, layout="nnunet")
    labels = {p.name: p.read_bytes() for p in (nnunet / "labelsTr").iterdir()}
    common = ["--checkpoint", str(foreground_run / "model.pt"), "--data", str(nnunet)]
    assert predict.main([*common, "--out", str(nnunet / "labelsTr")]) == 2
    one_error_line(capsys, "is inside the input data")
    assert predict.main([*common, "--out", str(nnunet / "imagesTr"), "--overwrite"]) == 2
    capsys.readouterr()
    assert {p.name: p.read_bytes() for p in (nnunet / "labelsTr").iterdir()} == labels
    masks = tmp_path / "masks"
    masks.mkdir()
    (masks / "sub-001.nii.gz").write_bytes(b"a mask made by hand")
    assert predict.main([*common, "--out", str(masks)]) == 2
    one_error_line(capsys, "already holds sub-001.nii.gz", "--overwrite")
    assert (masks / "sub-001.nii.gz").read_bytes() == b"a mask made by hand"
    assert not (masks / "sub-002.nii.gz").exists()
    assert predict.main([*common, "--out", str(masks), "--overwrite"]) == 0
    assert nib.load(masks / "sub-001.nii.gz").shape == nib.load(nnunet / "labelsTr" / "sub-001.nii.gz").shape


def test_train_refuses_an_existing_run_and_overwrite_removes_only_run_files(cohort: Path, tmp_path: Path,
                                                                            capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    args = ["--data", str(cohort), "--iterations", "2", "--test-fraction", "0.5", "--out", str(out), *TINY]
    assert train.main(args) == 0
    (out / "notes.md").write_text("my notes")
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()}
    capsys.readouterr()
    assert train.main(args) == 2
    one_error_line(capsys, "already holds a run", "--resume", "--overwrite")
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()} == before
    assert train.main([*args, "--iterations", "1", "--overwrite"]) == 0
    assert (out / "notes.md").read_text() == "my notes"
    assert json.loads((out / "metrics.json").read_text())["iterations"] == 1


def test_resume_compares_every_option_that_changes_the_result(cohort: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    args = ["--data", str(cohort), "--iterations", "4", "--test-fraction", "0.5", "--out", str(out), *TINY]
    assert train.main([*args, "--stop-at", "2", "--checkpoint-every", "1"]) == 0
    capsys.readouterr()
    changed = [["--seed", "1"], ["--lr", "0.01"], ["--loss-weights", "literal"], ["--crop", "16", "16", "32"],
               ["--lesion-crop-fraction", "0.1"], ["--batch-size", "4"]]
    for change in changed:
        assert train.main([*args, "--resume", *change]) == 2, change
        one_error_line(capsys, "--resume: the command differs", f"--{change[0][2:]}")
    assert train.main([*args, "--resume", "--iterations", "1"]) == 2
    one_error_line(capsys, "--iterations 1 is below the 2 iterations")
    assert train.main([*args, "--resume", "--lr-schedule", "poly"]) == 2
    one_error_line(capsys, "--lr-schedule: recorded 'constant', now 'poly'")
    assert train.main([*args, "--resume", "--method", "ncl-010"]) == 2
    one_error_line(capsys, "--method: recorded 'rsa-010', now 'ncl-010'")
    # Options that cannot change the result may differ.
    assert train.main([*args, "--resume", "--checkpoint-every", "3"]) == 0
    assert read(out / "checkpoint.pt").state.iteration == 4


def test_resume_keeps_the_iterations_a_poly_schedule_depends_on(cohort: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture) -> None:
    args = ["--data", str(cohort), "--test-fraction", "0.5", "--out", str(tmp_path / "run"), *TINY,
            "--lr-schedule", "poly"]
    assert train.main([*args, "--iterations", "3", "--stop-at", "1", "--checkpoint-every", "1"]) == 0
    capsys.readouterr()
    assert train.main([*args, "--iterations", "5", "--resume"]) == 2
    one_error_line(capsys, "--iterations 5 differs from the run's 3", "poly learning-rate schedule")
    assert train.main([*args, "--iterations", "3", "--resume"]) == 0


def test_splits_with_overlapping_or_unknown_ids_are_refused(cohort: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture) -> None:
    for split, fragment in (({"train": ["sub-001", "sub-002"], "test": ["sub-002"]}, "in both 'train' and 'test'"),
                            ({"train": ["sub-001"], "test": ["sub-099"]}, "ids ['sub-099'] are not in the data")):
        path = tmp_path / "split.json"
        path.write_text(json.dumps(split))
        assert train.main(["--data", str(cohort), "--split", str(path), "--iterations", "1",
                           "--out", str(tmp_path / "run"), *TINY]) == 2
        one_error_line(capsys, fragment)


# ---------------------------------------------------------------------------------------- errors up front


@pytest.mark.parametrize(("extra", "fragment"), [
    (["--crop", "20", "32", "32"], "must be multiples of 16 16 16"),
    (["--crop", "512", "512", "512", "--batch-size", "64"], "needs at least"),
    (["--overlap", "1"], "argument --overlap: must be in [0, 1)"),
    (["--device", "cuda:7"] if not torch.cuda.is_available() else ["--device", "tpu"], "--device"),
    (["--data", "/nonexistent/scans"], "--data /nonexistent/scans does not exist"),
    (["--iteratons", "3"], "unrecognized arguments: --iteratons"),
    (["--resume", "--overwrite"], "contradict each other"),
    (["--pattern", "flair"], "--pattern takes ROLE=GLOB"),
    (["--crop", "0", "32", "32"], "--crop needs three sizes >= 1"),
    (["--modalities", "pd"], "modalities ['pd'] have no built-in rule"),
    (["--modalities", "t1,t1"], "distinct names"),
    (["--lr", "-1"], "--lr must be a finite number in (0, inf)"),
    (["--lr", "nan"], "argument --lr: nan: give a finite number"),
    (["--weight-decay", "-1"], "--weight-decay must be a finite number in [0, inf)"),
    (["--attention-weight-decay", "inf"], "argument --attention-weight-decay: inf: give a finite number"),
    (["--attention-scale", "nan"], "--attention-scale must be a finite number"),
    (["--device", "meta"], "--device meta: the scripts run on cpu, cuda or mps"),
    (["--val-every", "-1"], "--val-every must be >= 0"),
    (["--stop-at", "0"], "--stop-at must be >= 1"),
    (["--attention-scale", "-2"], "--attention-scale must be a finite number in (0, inf)"),
    (["--filters", "4,x"], "--filters '4,x'"),
    (["--loss", "dice"], "argument --loss: invalid choice: 'dice'"),
    (["--ema", "1"], "--ema must be a finite number in [0, 1)"),
    (["--ema", "-0.5"], "--ema must be a finite number in [0, 1)"),
])
def test_user_mistakes_are_one_error_line_before_any_work(cohort: Path, tmp_path: Path, extra: list[str],
                                                          fragment: str, capsys: pytest.CaptureFixture) -> None:
    args = ["--data", str(cohort), "--iterations", "1", "--out", str(tmp_path / "run"), *TINY, *extra]
    assert exit_code(train.main, args) == 2
    one_error_line(capsys, fragment)
    assert not (tmp_path / "run").exists()


def test_empty_training_masks_are_refused(cohort: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = tmp_path / "empty"
    for source in sorted(cohort.glob("sub-00[12]")):
        shutil.copytree(source, data / source.name)
        mask = nib.load(source / "mask.nii.gz")
        nib.save(nib.Nifti1Image(np.zeros(mask.shape, np.uint8), mask.affine), data / source.name / "mask.nii.gz")
    assert train.main(["--data", str(data), "--iterations", "1", "--test-fraction", "0", "--out",
                       str(tmp_path / "run"), *TINY]) == 2
    one_error_line(capsys, "every training lesion mask is empty")


def test_damaged_or_foreign_checkpoints_name_the_path(foreground_run: Path, cohort: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    truncated = tmp_path / "model.pt"
    truncated.write_bytes((foreground_run / "model.pt").read_bytes()[:5000])
    foreign = tmp_path / "weights.pt"
    torch.save({"state_dict": {}}, foreign)
    for path, fragment in ((truncated, "cannot be read (truncated"), (foreign, "is not a checkpoint written by")):
        assert predict.main(["--checkpoint", str(path), "--data", str(cohort), "--out", str(tmp_path / "p")]) == 2
        one_error_line(capsys, str(path), fragment)


def test_make_cohort_cli_error_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert exit_code(make_cohort_cli.main, ["--out", str(tmp_path), "--layout", "bids"]) == 2
    one_error_line(capsys, "invalid choice: 'bids'")


# ------------------------------------------------------------------------- nothing lost, nothing silently wrong


def files_of(folder: Path) -> dict[str, int]:
    """Every file under ``folder`` (relative path) with its modification time."""
    return {p.relative_to(folder).as_posix(): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def test_overwrite_checks_data_and_split_before_it_removes_the_finished_run(cohort: Path, tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    args = ["--data", str(cohort), "--iterations", "1", "--test-fraction", "0.5", "--out", str(out), *TINY]
    assert train.main(args) == 0
    before = files_of(out)
    assert {"model.pt", "checkpoint.pt", "metrics.json"} <= before.keys()
    capsys.readouterr()
    for mistake, fragment in ((["--pattern", "flair=*nothing-matches*"], "no file for ['flair']"),
                              (["--split", str(tmp_path / "nosuch.json")], "nosuch.json does not exist")):
        assert train.main([*args, "--overwrite", *mistake]) == 2
        one_error_line(capsys, fragment)
        assert files_of(out) == before, mistake  # the finished run is still all there


def lock_of(pid: int) -> str:
    return json.dumps({"pid": pid, "host": socket.gethostname(), "started": "2026-01-02 03:04:05"})


def test_a_run_folder_in_use_is_refused_naming_its_process_and_a_stale_lock_is_taken_over(
        foreground_run: Path, cohort: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "run"
    args = ["--data", str(cohort), "--iterations", "1", "--test-fraction", "0.5", "--out", str(out), *TINY]
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # another training, running
    try:
        out.mkdir()
        (out / LOCK_NAME).write_text(lock_of(other.pid))
        for main, command in ((train.main, [*args, "--overwrite"]), (predict.main, [
                "--checkpoint", str(foreground_run / "model.pt"), "--data", str(cohort), "--out", str(out)])):
            assert main(command) == 2
            one_error_line(capsys, f"--out {out} is in use by process {other.pid} on {socket.gethostname()}, "
                           "started 2026-01-02 03:04:05")
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # nothing written, the lock left alone
    finally:
        other.kill()
        other.wait()
    # The process is gone: its lock is stale, taken over with a note, and released at the end.
    assert train.main(args) == 0
    assert "note: taking over the stale lock" in capsys.readouterr().err
    assert (out / "model.pt").is_file() and not (out / LOCK_NAME).exists()
    # Released on error and on Ctrl-C too.
    assert train.main([*args, "--split", str(tmp_path / "nosuch.json"), "--overwrite"]) == 2
    assert not (out / LOCK_NAME).exists()

    def interrupt(run, iteration):
        raise KeyboardInterrupt
    monkeypatch.setattr(training_loop, "train_step", interrupt)
    assert train.main([*args, "--overwrite"]) == 130
    assert not (out / LOCK_NAME).exists()


def test_the_lock_is_held_while_a_command_runs(tmp_path: Path) -> None:
    out = tmp_path / "a" / "b"
    with locked(out):
        holder = json.loads((out / LOCK_NAME).read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        with pytest.raises(UsageError, match=f"is in use by process {os.getpid()}"):
            with locked(out):
                pass
        assert (out / LOCK_NAME).is_file()  # the refused second command did not remove the first one's lock
    assert not (tmp_path / "a").exists()  # the folders it created, still empty, went with the lock


PARSERS = {"train": train.build_parser, "evaluate": evaluate.build_parser, "predict": predict.build_parser,
           "experiment": experiment.build_parser, "make_cohort": make_cohort_cli.build_parser}


@pytest.mark.parametrize("script", sorted(PARSERS))
def test_every_numeric_option_refuses_nan_and_infinity(script: str, capsys: pytest.CaptureFixture) -> None:
    parser = PARSERS[script]()
    options = [a for a in parser._actions if a.option_strings and a.nargs != 0]
    # A number given without a type= would be a string that skips these checks.
    assert not [a.dest for a in options if a.type is None and isinstance(a.default, (int, float))]
    numeric = [a for a in options if a.type not in (None, str) and not a.choices]
    assert numeric
    for action in numeric:
        flag = action.option_strings[0]
        several = isinstance(action.nargs, int)  # --crop D H W: "-inf" there would read as an option
        for value in ("nan", "inf", "1e999") if several else ("nan", "inf", "-inf", "1e999"):
            argv = [flag, *[value] * action.nargs] if several else [f"{flag}={value}"]
            with pytest.raises(SystemExit) as exit_:
                parser.parse_args(argv)
            assert exit_.value.code == 2, argv
            one_error_line(capsys, f"argument {flag}", value)
    # --min-lesion-size nan once removed every lesion (Dice 0) with exit status 0.
    if script in ("evaluate", "predict"):
        with pytest.raises(SystemExit):
            parser.parse_args(["--min-lesion-size", "nan"])
        one_error_line(capsys, "argument --min-lesion-size: nan: give a finite number")


def test_a_diverging_training_stops_at_the_first_non_finite_loss(cohort: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    assert train.main(["--data", str(cohort), "--iterations", "6", "--checkpoint-every", "1", "--test-fraction", "0.5",
                       "--out", str(out), *TINY, "--lr", "1e6"]) == 2
    err = one_error_line(capsys, "training diverged: the loss is nan at iteration ", "and no model.pt",
                         "lower --lr (now 1e+06)")
    stopped = int(err.split("at iteration ")[1].split()[0])
    assert f"the last good checkpoint is {out / 'checkpoint.pt'} (iteration {stopped - 1})" in err
    assert not (out / "model.pt").exists() and not (out / "metrics.json").exists()
    saved = read_checkpoint(out / "checkpoint.pt")
    assert saved.state is not None and saved.state.iteration == stopped - 1
    for weights in (saved.weights, saved.state.network):
        assert all(torch.isfinite(weight).all() for weight in weights.values() if weight.is_floating_point())


def test_predict_overwrite_replaces_the_whole_earlier_prediction(foreground_run: Path, cohort: Path,
                                                                 tmp_path: Path) -> None:
    out = tmp_path / "masks"
    common = ["--checkpoint", str(foreground_run / "model.pt"), "--data", str(cohort), "--out", str(out)]
    assert predict.main([*common, "--probabilities", "--label-lesions"]) == 0
    assert (out / "sub-001_prob.nii.gz").is_file() and (out / "sub-001_lesions.nii.gz").is_file()
    (out / "notes.md").write_text("mine")
    assert predict.main([*common, "--overwrite"]) == 0
    ids = [p.name for p in sorted(cohort.glob("sub-*"))]
    assert {p.name for p in out.iterdir()} == {"notes.md", "report.csv", *(f"{i}{end}" for i in ids
                                                                            for end in (".nii.gz", "_lesions.csv"))}
    (out / "sub-001.nii.gz").unlink()
    (out / "sub-001_lesions.csv").unlink()
    (out / "sub-001_lesions.nii.gz").write_bytes(b"x")  # any file of an earlier prediction is refused without it
    assert predict.main(common) == 2


def test_predict_ignores_lesion_masks_it_does_not_need(foreground_run: Path, cohort: Path, tmp_path: Path) -> None:
    data = copy_subjects(cohort, tmp_path / "data", ("t1", "t2", "flair"))
    for name in ("mask1.nii.gz", "mask2.nii.gz"):  # two candidate lesion masks: train and evaluate must ask
        shutil.copy(cohort / "sub-001" / "mask.nii.gz", data / "sub-001" / name)
    mask = nib.load(cohort / "sub-002" / "mask.nii.gz")
    nib.save(nib.Nifti1Image(np.full(mask.shape, 7, np.uint8), mask.affine), data / "sub-002" / "mask.nii.gz")
    assert predict.main(["--checkpoint", str(foreground_run / "model.pt"), "--data", str(data), "--out",
                         str(tmp_path / "p")]) == 0
    assert (tmp_path / "p" / "sub-001.nii.gz").is_file() and (tmp_path / "p" / "sub-002.nii.gz").is_file()


def test_evaluate_reads_only_the_split_test_ids_and_warns_about_training_subjects(
        foreground_run: Path, cohort: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    trained_on = read_checkpoint(foreground_run / "model.pt").record.split
    common = ["--checkpoint", str(foreground_run / "model.pt"), "--data", str(cohort)]
    for k, train_ids in enumerate(([], ["sub-099"])):  # an empty or foreign 'train' list: evaluation reads only 'test'
        split = tmp_path / f"split-{k}.json"
        split.write_text(json.dumps({"train": train_ids, "test": trained_on["test"]}))
        assert evaluate.main([*common, "--split", str(split), "--out", str(tmp_path / f"e{k}")]) == 0
        assert json.loads((tmp_path / f"e{k}" / "metrics.json").read_text())["cases"] == len(trained_on["test"])
    capsys.readouterr()
    assert evaluate.main([*common, "--out", str(tmp_path / "all"), "--include-training-subjects"]) == 0
    (note,) = json.loads((tmp_path / "all" / "metrics.json").read_text())["warnings"]
    assert f"{len(trained_on['train'])} of the 4 subjects scored were used to train the model" in note
    assert ", ".join(trained_on["train"]) in note
    assert f"warning: {note}" in capsys.readouterr().err


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has an MPS device")
def test_a_device_this_machine_lacks_is_one_error_line(foreground_run: Path, cohort: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    model = ["--checkpoint", str(foreground_run / "model.pt"), "--data", str(cohort), "--out", str(tmp_path / "o")]
    runs = ((train.main, ["--data", str(cohort), "--iterations", "1", "--out", str(tmp_path / "o"), *TINY]),
            (predict.main, model), (evaluate.main, model))
    for main, args in runs:
        assert main([*args, "--device", "mps"]) == 2
        one_error_line(capsys, "--device mps: this machine or torch", "has no Apple MPS device")
    assert not (tmp_path / "o").exists()


def output_commands(foreground_run: Path, cohort: Path, out: Path) -> list[tuple]:
    """Each script that writes, with a command that would write into ``out``."""
    model = ["--checkpoint", str(foreground_run / "model.pt"), "--data", str(cohort), "--out", str(out)]
    return [(train.main, ["--data", str(cohort), "--iterations", "1", "--out", str(out), *TINY]),
            (evaluate.main, [*model, "--include-training-subjects"]), (predict.main, model),
            (experiment.main, ["--data", str(cohort), "--methods", "unet", "--splits", "1", "--out", str(out), "--",
                               "--iterations", "1", *TINY]),
            (make_cohort_cli.main, ["--out", str(out), "--small", "--subjects", "1", "--anatomy", "phantom"])]


def test_an_output_that_is_or_lies_in_a_file_is_refused_before_any_work(foreground_run: Path, cohort: Path,
                                                                       tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("a user's file")
    for main, args in output_commands(foreground_run, cohort, blocker / "out"):
        assert main(args) == 2, main.__module__
        one_error_line(capsys, f"{blocker} is a file, not a folder")
    for main, args in output_commands(foreground_run, cohort, blocker)[:3]:  # predict once wrote "[Errno 17]" per subject
        assert main(args) == 2, main.__module__
        one_error_line(capsys, f"--out {blocker} is a file, not a folder")
    assert blocker.read_text() == "a user's file"


@pytest.mark.skipif(shutil.which("chattr") is None, reason="needs chattr (e2fsprogs)")
def test_an_output_folder_that_cannot_be_written_is_refused_before_any_work(foreground_run: Path, cohort: Path,
                                                                           tmp_path: Path,
                                                                           capsys: pytest.CaptureFixture) -> None:
    # As root chmod does not stop writes; an immutable folder does (where the file system allows chattr).
    out = tmp_path / "read-only"
    out.mkdir()
    if subprocess.run(["chattr", "+i", str(out)], capture_output=True).returncode:
        pytest.skip("chattr +i is not permitted here")
    try:
        with pytest.raises(OSError):
            (out / "probe").write_text("x")
        for main, args in output_commands(foreground_run, cohort, out):
            assert main(args) == 2, main.__module__
            one_error_line(capsys, f"--out {out} cannot be written", "fix its permissions")
    finally:
        subprocess.run(["chattr", "-i", str(out)], check=True)


# ------------------------------------------------------------------------------------------------ layout


def _imports(tree: ast.AST) -> set[str]:
    """Every module name a file imports (``from .x import y`` as ``.x``)."""
    found = {"." * node.level + (node.module or "") for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    return found | {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}


def test_scripts_are_thin_and_never_import_each_other() -> None:
    scripts = {"train", "evaluate", "predict", "experiment", "make_cohort"}
    assert {path.stem for path in EXAMPLE.glob("*.py")} == scripts
    for path in EXAMPLE.glob("*.py"):  # each script is a main over its module of the package
        assert _imports(ast.parse(path.read_text())) == {"sys", f"mslesion.{path.stem}"}, path.name
    package = EXAMPLE / "mslesion"
    for path in package.rglob("*.py"):
        tree = ast.parse(path.read_text())
        imported = _imports(tree)
        # inside the package only relative imports of its own modules; a command module is never imported
        assert not {name.lstrip(".").split(".")[-1] for name in imported if name.startswith(".")} & scripts, path
        assert not any(name.startswith("mslesion") or name in scripts for name in imported), (path, imported)
        defined = [node for node in tree.body if isinstance(node, ast.Assign)
                   and any(getattr(t, "id", None) == "IGNORE_LABEL" for t in node.targets)]
        assert not defined or path.relative_to(package).as_posix() == "data/reading.py", path
        for node in ast.walk(tree):  # every function reads as named steps: none over 50 lines of code
            if isinstance(node, ast.FunctionDef):
                body = node.body[1:] if ast.get_docstring(node) and len(node.body) > 1 else node.body
                lines = node.end_lineno - body[0].lineno + 1
                assert lines <= 50, f"{path.name}: {node.name} has {lines} lines of code"