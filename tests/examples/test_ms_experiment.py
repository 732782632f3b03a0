"""experiment.py: its arguments checked before any training, its splits tied to their parameters, its
report (experiment_report.py: paired statistics against unet, cost, run health) and its figure."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from mslesion import experiment
from mslesion.evaluation import report as experiment_report
from mslesion.checkpoint import RunRecord, write_model
from mslesion.config import TrainingConfig
from mslesion.data.reading import DataOptions
from mslesion.run import UsageError, fold_splits, random_split, write_json
from sliceattn import cost
from cli_checks import one_error_line

IDS = [f"sub-00{i}" for i in range(1, 5)]
TINY = ["--preset", "demo", "--filters", "tiny", "--crop", "16", "32", "32", "--batch-size", "2",
        "--lesion-crop-fraction", "0.5", "--iterations", "2"]




# ---------------------------------------------------------------------------------------------- arguments


@pytest.mark.parametrize(("flags", "fragment"), [
    (["--splits", "0"], "--splits: must be a whole number >= 1, got '0'"),
    (["--splits", "two"], "--splits: must be a whole number >= 1"),
    (["--train-fraction", "1.0"], "--train-fraction: must be a number in (0, 1)"),
    (["--train-fraction", "0"], "--train-fraction: must be a number in (0, 1)"),
    (["--train-fraction", "nan"], "--train-fraction: must be a number in (0, 1)"),
    (["--cohort-preset", "bogus"], "argument --cohort-preset: invalid choice: 'bogus' (choose from demo, mni, paper, small)"),
    (["--subjects", "0"], "argument --subjects: must be a whole number >= 1, got '0'"),
])
def test_bad_split_arguments_are_refused_at_parse_time(flags: list[str], fragment: str, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_:
        experiment.main(["--data", str(tmp_path), "--out", str(tmp_path / "exp"), *flags])
    assert exit_.value.code == 2
    one_error_line(capsys, fragment)
    assert not (tmp_path / "exp").exists()


@pytest.mark.parametrize(("flags", "fragment"), [
    (["--subjects", "3"], "--subjects 3 applies to the generated synthetic cohort, not to --data"),
    (["--cohort-preset", "demo"], "--cohort-preset demo applies to the generated synthetic cohort, not to --data"),
])
def test_cohort_options_with_data_are_refused_instead_of_ignored(flags: list[str], fragment: str, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    # --subjects 3 with --data once ran on every subject of the folder.
    assert experiment.main(["--data", str(tmp_path), "--out", str(tmp_path / "exp"), *flags]) == 2
    one_error_line(capsys, fragment)
    assert not (tmp_path / "exp").exists()


def test_a_method_listed_twice_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert experiment.main(["--data", str(tmp_path), "--methods", "unet", "rsa-010", "unet", "--out",
                            str(tmp_path / "exp")]) == 2
    one_error_line(capsys, "--methods lists unet more than once")
    assert not (tmp_path / "exp").exists()


def test_a_train_fraction_that_leaves_no_test_subject_is_refused_before_training(
        cohort: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # 4 subjects: 0.9 keeps round(0.4) = 0 for testing.
    assert experiment.main(["--data", str(cohort), "--train-fraction", "0.9", "--out", str(tmp_path / "exp")]) == 2
    one_error_line(capsys, "--train-fraction 0.9 leaves no test subject of the 4", "at most 0.75")
    assert not (tmp_path / "exp").exists()


# -------------------------------------------------------------------------------------------------- splits


def test_splits_record_their_parameters_and_a_changed_fraction_or_subject_set_is_refused(tmp_path: Path) -> None:
    first = experiment.make_splits(IDS, 2, 0.5, tmp_path)
    record = json.loads((tmp_path / "splits" / "parameters.json").read_text())
    assert record["train_fraction"] == 0.5 and record["subjects"] == IDS
    with pytest.raises(UsageError, match=r"--train-fraction: recorded 0.5, now 0.75"):
        experiment.make_splits(IDS, 2, 0.75, tmp_path)
    with pytest.raises(UsageError, match=r"subjects no longer in the data: sub-004; subjects new in the data: sub-009"):
        experiment.make_splits([*IDS[:3], "sub-009"], 2, 0.5, tmp_path)
    # More splits extend the same experiment: the first ones are kept as they are.
    texts = [p.read_text() for p in first]
    more = experiment.make_splits(IDS, 3, 0.5, tmp_path)
    assert [p.read_text() for p in more[:2]] == texts and len(more) == 3


def test_split_files_without_a_record_are_kept_only_when_these_parameters_made_them(tmp_path: Path) -> None:
    write_json(tmp_path / "splits" / "split-0.json", random_split(IDS, 0.5, seed=0))
    experiment.make_splits(IDS, 1, 0.5, tmp_path)  # the same parameters: accepted, and recorded now
    assert (tmp_path / "splits" / "parameters.json").is_file()
    other = tmp_path / "other"
    write_json(other / "splits" / "split-0.json", random_split(IDS, 0.25, seed=0))
    with pytest.raises(UsageError, match="split-0.json was not made by this command"):
        experiment.make_splits(IDS, 1, 0.5, other)


def test_a_changed_command_is_refused_before_training(cohort: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "exp"
    experiment.make_splits(IDS, 1, 0.5, out)
    assert experiment.main(["--data", str(cohort), "--splits", "1", "--train-fraction", "0.75", "--out", str(out),
                            "--", *TINY]) == 2
    one_error_line(capsys, "--train-fraction: recorded 0.5, now 0.75", "choose another --out")
    assert not (out / "runs").exists()


# ---------------------------------------------------------------------------------------------- run health


def fake_run(folder: Path, predicted: list[int], **metrics: Any) -> dict[str, Any]:
    folder.mkdir(parents=True)
    rows = "".join(f"sub-00{i},{v},10\n" for i, v in enumerate(predicted))
    (folder / "cases.csv").write_text("id,predicted_voxels,reference_voxels\n" + rows)
    return {"test": [f"sub-00{i}" for i in range(len(predicted))], **metrics}


def test_dead_attention_and_all_background_runs_are_named(tmp_path: Path) -> None:
    metrics = fake_run(tmp_path / "a", [0, 0], attention_alive=False,
                       attention={"bottom_attention": {"alpha_coronal": 0.0, "alpha_axial": 1e-9,
                                                       "max_weight_axial": 0.0312, "effect": 4e-5}})
    problems = experiment_report.run_problems(tmp_path / "a", metrics)
    assert problems[0] == ("attention dead (bottom_attention: alpha_coronal 0, alpha_axial 1e-09, max_weight_axial "
                           "0.031, effect 4e-05)")
    assert problems[1].startswith("no lesion voxel predicted in its 2 test subjects")
    healthy = fake_run(tmp_path / "b", [0, 5], attention_alive=True, attention={})
    assert experiment_report.run_problems(tmp_path / "b", healthy) == []
    # Older runs record neither: nothing is claimed about them.
    assert experiment_report.run_problems(tmp_path / "missing", {"test": ["sub-001"]}) == []


# ------------------------------------------------------------------------------------------------- report


def run(split: int, dice: float, problems: list[str] | None = None, alive: bool | None = None) -> dict[str, Any]:
    summary = {key: dice for key, _ in experiment_report.COLUMNS}
    return {"split": f"split-{split}", "summary": summary, "train_seconds": 10.0 + split, "peak_memory_mb": 100.0,
            "peak_memory_kind": "cpu-max-rss", "problems": problems or [], "attention_alive": alive}


DIFFERENCES = [0.01, 0.03, -0.02, 0.04]  # test_ms_stats.py computes their statistics by hand


def test_report_has_the_paired_rows_cost_and_flagged_runs(tmp_path: Path) -> None:
    base = [0.5, 0.6, 0.7, 0.8]
    results = {"unet": [run(k, d) for k, d in enumerate(base)],
               "rsa-010": [run(k, b + d, alive=True) for k, (b, d) in enumerate(zip(base, DIFFERENCES))]}
    results["rsa-010"][3] = run(3, base[3] + DIFFERENCES[3], ["attention dead"], alive=False)
    costs = {"unet": {"parameters": 1000, "forward_flops": 2e9, "crop": [16, 32, 32]},
             "rsa-010": {"parameters": 1100, "forward_flops": 2.2e9, "crop": [16, 32, 32]}}
    text = experiment_report.report(results, costs)
    rows = [line for line in text.splitlines() if line.startswith("| rsa-010 | 4 |")]
    # mean 1.5 points; t interval 1.5 ± 3.182 * 2.646 / 2 = [-2.71, +5.71]; 4 pairs cannot reach 0.05.
    assert rows == ["| rsa-010 | 4 | " + " | ".join(["+1.50 [-2.71, +5.71] | n/a: 4 pairs, p ≥ 0.125"] * 3) + " |"]
    # The same comparison without split-3 (its rsa-010 run is flagged): mean of 0.01, 0.03, -0.02.
    assert any(line.startswith("| rsa-010 | 3 | +0.67 [") for line in text.splitlines())
    assert "| rsa-010 | 1,100 | 2.2 | +10.0% | 11.50 ± 1.29 |" in text
    assert "rsa-010 3/4" in text and "- rsa-010 split-3: attention dead" in text
    assert "1 of 8 runs flagged" in text


def test_report_without_the_baseline_says_what_it_needs() -> None:
    text = experiment_report.report({"rsa-010": [run(0, 0.5)]}, {})
    assert "Needs unet and another method on the same splits" in text


def test_flops_count_the_attention_blocks_custom_autograd_functions(tmp_path: Path) -> None:
    # The network cost of rsa-010 exceeds unet's by exactly the analytic cost of its bottom RSA block.
    costs = {}
    for method in ("unet", "rsa-010"):
        path = tmp_path / method / "model.pt"
        path.parent.mkdir()
        training = TrainingConfig(data="d", data_options=DataOptions(), preset="demo", iterations=1, batch_size=1,
                                  crop=(16, 32, 32), filters=(4, 8, 16, 32, 64), lesion_crop_fraction=0.0,
                                  val_every=0, lr_schedule="constant", out="o", device="cpu", method=method)
        write_model(path, RunRecord(training, 0.01, {"train": [], "test": []}, {}, {}), {})
        costs[method] = experiment_report.network_cost(path)
    bottom = cost.unet_shapes((16, 32, 32), filters=(4, 8, 16, 32, 64))[-1]
    assert costs["rsa-010"]["forward_flops"] - costs["unet"]["forward_flops"] == cost.rsa_cost(bottom).forward > 0
    assert costs["rsa-010"]["parameters"] > costs["unet"]["parameters"] > 0


# ---------------------------------------------------------------------------------------------- end to end


def test_tiny_experiment_writes_the_paired_table_and_the_figure(cohort: Path, tmp_path: Path) -> None:
    out = tmp_path / "exp"
    assert experiment.main(["--data", str(cohort), "--methods", "unet", "rsa-010", "--splits", "1",
                            "--train-fraction", "0.5", "--out", str(out), "--", *TINY]) == 0
    text = (out / "table.md").read_text()
    assert "## Paired differences against unet" in text and "| rsa-010 | 1 | " in text
    assert "## Cost" in text and "## Run health" in text
    assert (out / "paired_differences.png").stat().st_size > 0
    results = json.loads((out / "results.json").read_text())
    assert results["paired"]["sample_dice"]["rsa-010"]["splits"] == ["split-0"]
    assert results["results"]["unet"][0]["split"] == "split-0"


# ---------------------------------------------------------------------------------------------- cross-validation


@pytest.mark.parametrize("folds", [2, 3, 4])
def test_folds_are_disjoint_cover_the_subjects_and_train_on_the_rest(folds: int) -> None:
    splits = fold_splits(IDS, folds)
    tested = [i for split in splits for i in split["test"]]
    assert sorted(tested) == IDS  # every subject tested exactly once
    for split in splits:
        assert split["test"] and sorted(split["train"] + split["test"]) == IDS
    assert {len(s["test"]) for s in splits} <= {len(IDS) // folds, -(-len(IDS) // folds)}  # near-equal folds


def test_train_always_subjects_are_never_tested() -> None:
    splits = fold_splits(IDS, 3, always_train=["sub-004"])
    assert all("sub-004" in s["train"] and "sub-004" not in s["test"] for s in splits)
    assert sorted(i for s in splits for i in s["test"]) == IDS[:3]
    with pytest.raises(UsageError, match="--folds 4: need 2 to 3 folds"):
        fold_splits(IDS, 4, always_train=["sub-004"])


@pytest.mark.parametrize("value", ["1", "two", "nan"])
def test_a_bad_fold_count_is_refused_at_parse_time(value: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_:
        experiment.main(["--data", str(tmp_path), "--out", str(tmp_path / "exp"), "--folds", value])
    assert exit_.value.code == 2
    one_error_line(capsys, f"--folds: must be 'loo' or a whole number >= 2, got '{value}'")


def test_every_split_trains_with_each_seed() -> None:
    splits = [Path("fold-0.json"), Path("fold-1.json")]
    assert experiment.plan_runs(splits, 1) == [("fold-0", splits[0], 0), ("fold-1", splits[1], 1)]
    assert [(name, seed) for name, _, seed in experiment.plan_runs(splits, 2)] == [
        ("fold-0-seed-0", 0), ("fold-0-seed-1", 1), ("fold-1-seed-0", 0), ("fold-1-seed-1", 1)]


@pytest.mark.parametrize("args, fragment", [
    (["--folds", "loo", "--splits", "3"], "--splits with --folds"),
    (["--folds", "2", "--train-fraction", "0.5"], "--train-fraction with --folds"),
    (["--train-always", "sub-001"], "--train-always needs --folds"),
    (["--folds", "loo", "--train-always", "sub-009"], "--train-always: sub-009 not in the data"),
    (["--folds", "5"], "--folds 5: need 2 to 4 folds"),
])
def test_cross_validation_mistakes_are_one_line(cohort: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                                args: list[str], fragment: str) -> None:
    out = tmp_path / "exp"
    assert experiment.main(["--data", str(cohort), "--out", str(out), *args, "--", *TINY]) == 2
    one_error_line(capsys, fragment)
    assert not (out / "runs").exists()  # refused before any training


def test_leave_one_out_scores_every_fold(cohort: Path, tmp_path: Path) -> None:
    out = tmp_path / "cv"
    command = ["--data", str(cohort), "--methods", "unet", "rsa-010", "--folds", "loo", "--train-always", "sub-003",
               "sub-004", "--out", str(out), "--", *TINY]
    assert experiment.main(command) == 0
    results = json.loads((out / "results.json").read_text())
    names = [r["split"] for r in results["results"]["unet"]]
    assert names == ["fold-0", "fold-1"]
    tested = {tuple(r["test"]) for r in results["results"]["rsa-010"]}
    assert tested == {("sub-001",), ("sub-002",)}  # the two rotating subjects, one per fold
    assert results["paired"]["sample_dice"]["rsa-010"]["splits"] == names  # paired by fold
    seeds = [json.loads((out / "runs" / "unet" / n / "metrics.json").read_text())["training"]["seed"] for n in names]
    assert seeds == [0, 1]
    text = (out / "table.md").read_text()
    assert "## Every run" in text and "| fold-1 | sub-00" in text and "| **worst** |" in text
    assert experiment.main(command) == 0  # the same command again reuses every run; another fold count is refused
    assert experiment.main([*command[:6], "3", *command[7:]]) == 2
