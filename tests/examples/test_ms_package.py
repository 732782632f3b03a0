"""The example folder as a user gets it: copied elsewhere, beside modules of the user's own."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "ms_lesion"
# the user's own modules, with the generic names the package keeps inside itself
USER_MODULES = {"config.py": "OWNER = 'the user'\n", "data.py": "raise ImportError('the user data.py was imported')\n"}
TINY = ["--preset", "demo", "--filters", "tiny", "--crop", "16", "32", "32", "--batch-size", "2", "--no-progress",
        "--val-every", "0", "--iterations", "2", "--test-fraction", "0.5"]


@pytest.fixture()
def project(tmp_path: Path) -> Path:
    """``my_project/`` holding ``config.py`` and ``data.py`` of the user's, and ``cp -r examples/ms_lesion`` in it."""
    root = tmp_path / "my_project"
    shutil.copytree(EXAMPLE, root / "ms_lesion", ignore=shutil.ignore_patterns("__pycache__", "runs"))
    for folder in (root, root / "ms_lesion"):  # beside the project and beside the scripts
        for name, text in USER_MODULES.items():
            (folder / name).write_text(text)
    return root


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(cwd), "OMP_NUM_THREADS": "1"}  # the user's modules come first
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_the_copied_folder_trains_beside_the_users_config_and_data(project: Path, cohort: Path) -> None:
    run = project / "runs" / "tiny"
    child = _run(["ms_lesion/train.py", "--data", str(cohort), "--out", str(run), *TINY], project)
    assert child.returncode == 0, child.stderr[-3000:]
    assert (run / "model.pt").is_file() and json.loads((run / "metrics.json").read_text())["summary"]["cases"] == 2
    # the package came from the copy, not from the repository
    notebook = ("import config, mslesion, mslesion.train; assert config.OWNER == 'the user'; "
                "print(mslesion.__file__)")
    child = _run(["-c", f"import sys; sys.path.insert(1, 'ms_lesion'); {notebook}"], project)
    assert child.returncode == 0, child.stderr[-3000:]
    assert Path(child.stdout.strip()).resolve() == (project / "ms_lesion" / "mslesion" / "__init__.py").resolve()


def test_python_dash_m_runs_a_command(project: Path) -> None:
    child = _run(["-m", "mslesion.predict", "--help"], project / "ms_lesion")
    assert child.returncode == 0, child.stderr[-3000:]
    assert "--checkpoint" in child.stdout
