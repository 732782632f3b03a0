"""benchmarks/report.py: partial runs, CUDA tables, where it writes and what it refuses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import report

SHAPE = [1, 512, 2, 4, 4]


def speed_record(block: str, baseline: str | None, mode: str, seconds: float) -> dict:
    fields = {
        "block": block, "baseline": baseline, "faithful": True, "mode": mode, "shape": SHAPE, "voxels": 32,
        "size": "64x64x32-bottom-b1", "flops_forward": 10, "flops_backward": 20, "flops_forward_measured": 10,
        "flops_backward_measured": 20, "map_bytes": 4 * (4 * 4 + 4 * 4 + 2 * 2), "threads": 1,
        "train_peak_bytes": 1000 if block == "rsa" else 1250, "inference_peak_bytes": 800,
        "saved_bytes": 4 * 512 * 32 * (12 if block == "rsa" else 15) + 4 * 36,
    }
    return {"extra_info": fields, "stats": {"min": seconds}}


def cuda_records() -> list[dict]:
    common = {"size": "64x64x32-bottom-b1", "shape": SHAPE, "cuda_device": "Test GPU"}
    blocks = [
        {"mode": "cuda-block", "block": block, "baseline": baseline, "cuda_train_time": t, "cuda_inference_time": t / 3,
         "cuda_train_peak_bytes": peak, "cuda_inference_peak_bytes": peak // 2, **common}
        for block, baseline, t, peak in (("rsa", "naive-rsa", 0.002, 3000), ("naive-rsa", None, 0.004, 4000))
    ]
    core = {"mode": "cuda-attention-core", "block": "slice-attention", "axis": "axial", "cuda_time": 1e-5,
            "bytes_moved": 4 * 4 * 512 * 32, "bandwidth": 1e12, "peak_bandwidth": 2e12, "peak_fraction": 0.5, **common}
    projections = [
        {"mode": "cuda-projection", "block": f"projection-{kind}", "kind": kind, "cuda_train_time": t,
         "cuda_train_peak_bytes": 100, **common}
        for kind, t in (("matmul", 0.001), ("conv3d", 0.002))
    ]
    return [{"extra_info": r, "stats": {"min": 0.01}} for r in [*blocks, core, *projections]]


def write_json(path: Path, benchmarks: list[dict]) -> Path:
    path.write_text(json.dumps({"machine_info": {"cpu_count": 2, "torch_threads": 1}, "commit_info": {}, "benchmarks": benchmarks}))
    return path


def test_partial_run_reports_what_is_there(tmp_path: Path) -> None:
    # a `-k train` subset: training records only, no claims, no numerics, no forward/inference modes
    bench = write_json(tmp_path / "bench.json", [speed_record("naive-rsa", None, "train", 0.010), speed_record("rsa", "naive-rsa", "train", 0.009)])
    report.main([str(bench), "--out", str(tmp_path / "out")])
    page = (tmp_path / "out" / "benchmarks.md").read_text()
    assert "| faithful RSA fwd+bwd time / naive | ≤ 1.05 | 0.90 | met |" in page
    assert "| training-forward peak / naive | ≤ 0.85 | 0.80 | met |" in page
    assert "Not in this run: no paper-claim records" in page
    assert "Not in this run: no CUDA records" in page
    assert "12·B·C·N float32 values for the faithful block, 15·B·C·N for the naive one" in page
    assert "issue" not in page.lower()
    assert "$" not in page  # every template field filled


def test_cuda_tables(tmp_path: Path) -> None:
    bench = write_json(tmp_path / "cuda.json", cuda_records())
    report.main([str(bench), "--out", str(tmp_path / "out")])
    page = (tmp_path / "out" / "benchmarks.md").read_text()
    assert "Device: Test GPU" in page
    assert "| 64x64x32-bottom-b1 | `rsa` | `naive-rsa` | 2.00 | 0.50 |" in page
    assert "| 64x64x32-bottom-b1 | axial | 0.010 | 256.0 KiB | 1,000 | 50% |" in page
    assert "| 64x64x32-bottom-b1 | 1.00 | 2.00 | 0.50 |" in page


def test_refuses_to_replace_files_unless_told(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bench = write_json(tmp_path / "bench.json", [speed_record("rsa", "naive-rsa", "train", 0.009)])
    out = tmp_path / "out"
    out.mkdir()
    (out / "benchmarks.md").write_text("a user's page")
    with pytest.raises(SystemExit) as exit_info:
        report.main([str(bench), "--out", str(out)])
    assert exit_info.value.code == 2
    assert "pass --overwrite to replace them" in capsys.readouterr().err
    assert (out / "benchmarks.md").read_text() == "a user's page"
    report.main([str(bench), "--out", str(out), "--overwrite"])
    assert (out / "benchmarks.md").read_text().startswith("# Benchmarks")


def test_default_output_is_a_new_folder_not_the_docs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bench = write_json(tmp_path / "bench.json", [speed_record("rsa", "naive-rsa", "train", 0.009)])
    monkeypatch.chdir(tmp_path)
    report.main([str(bench)])
    assert (tmp_path / "benchmark-report" / "benchmarks.md").exists()


@pytest.mark.parametrize("content", ["not json", json.dumps({"results": []})])
def test_bad_json_is_a_one_line_error(tmp_path: Path, content: str, capsys: pytest.CaptureFixture[str]) -> None:
    bench = tmp_path / "bench.json"
    bench.write_text(content)
    with pytest.raises(SystemExit) as exit_info:
        report.main([str(bench), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert "error:" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
