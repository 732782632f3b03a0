"""benchmarks/gpu.sh: what it would run, and its refusal without a CUDA device."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu.sh"
pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="gpu.sh is a bash script")


def run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=120)


def test_dry_run_prints_the_cuda_benchmarks_and_the_report(tmp_path: Path) -> None:
    result = run(str(tmp_path / "cuda"), "--dry-run")
    assert result.returncode == 0, result.stderr
    bench, report = result.stdout.splitlines()
    assert "-m pytest benchmarks/test_bench_cuda.py --benchmark-only" in bench and f"{tmp_path}/cuda.json" in bench
    assert f"benchmarks/report.py {tmp_path}/cuda.json --out {tmp_path}/cuda" in report
    assert not (tmp_path / "cuda.json").exists()


def test_unknown_option_is_refused() -> None:
    result = run("--fast")
    assert result.returncode == 2 and "error: unknown option --fast" in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_refuses_without_cuda_before_any_work(tmp_path: Path) -> None:
    result = run(str(tmp_path / "cuda"))
    assert result.returncode == 2
    assert "error: benchmarks/gpu.sh needs a CUDA device" in result.stderr
    assert not any(tmp_path.iterdir())
