"""Without the ``examples`` extra the example's tests skip with the reason instead of failing to collect."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# runs pytest in a child process in which tqdm (one module of the extra) cannot be found
WITHOUT_TQDM = """
import importlib.util, sys
import pytest
find_spec = importlib.util.find_spec
importlib.util.find_spec = lambda name, *args: None if name == "tqdm" else find_spec(name, *args)
sys.modules["tqdm"] = None
sys.exit(pytest.main(sys.argv[1:]))
"""


def test_example_tests_skip_when_an_extra_is_missing(tmp_path: Path) -> None:
    script = tmp_path / "without_tqdm.py"
    script.write_text(WITHOUT_TQDM)
    result = subprocess.run(
        [sys.executable, str(script), "tests/examples", "tests/test_pointwise.py", "-q", "-rs", "-p", "no:cacheprovider", "--benchmark-only"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "examples extra: missing tqdm" in result.stdout
    assert "error" not in result.stdout.lower()  # no collection error
