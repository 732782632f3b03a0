"""Make the copy-able example folder importable the way its scripts import each other.

The example needs the ``examples`` extra (``pip install -e '.[examples]'``); without it every
test module here is reported as skipped, with the missing modules named, instead of failing
at collection.
"""

import importlib.util
import sys
from pathlib import Path

import pytest

EXAMPLE_DIR = Path(__file__).resolve().parents[2] / "examples" / "ms_lesion"
for folder in (EXAMPLE_DIR, Path(__file__).resolve().parent):  # the example's modules, and cli_checks.py
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

#: import names of the ``examples`` extra in pyproject.toml
EXAMPLE_EXTRAS = ("nibabel", "nilearn", "scipy", "tqdm", "matplotlib", "batchgeneratorsv2")


def missing_extras() -> list[str]:
    """The modules of the ``examples`` extra that cannot be imported here."""
    return [name for name in EXAMPLE_EXTRAS if importlib.util.find_spec(name) is None]


class _SkippedModule(pytest.Module):
    """A test module that is not imported: collecting it reports a skip with the reason."""

    def collect(self):  # type: ignore[override]
        pytest.skip(f"the MS-lesion example needs the examples extra: missing {', '.join(missing_extras())} "
                    "(pip install -e '.[examples]')")


def pytest_pycollect_makemodule(module_path: Path, parent: pytest.Collector):
    if missing_extras():
        return _SkippedModule.from_parent(parent, path=module_path)
    return None


@pytest.fixture(scope="session")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-subject synthetic cohort at the ``small`` preset, shared by the example's tests (read-only)."""
    from mslesion.synthetic.cohort import make_cohort

    return make_cohort(tmp_path_factory.mktemp("cohort"), subjects=4, preset="small", seed=0, montage=False)
