"""Benchmarks run only on request: ``pytest --benchmark-only`` (or ``--benchmark-enable``).

The default ``pytest`` run deselects every benchmark under this folder (``--benchmark-skip``
cannot sit in ``addopts``: pytest-benchmark refuses it together with ``--benchmark-only``).
``SLICEATTN_BENCH_THREADS=n`` sets torch's thread count (on a shared machine one thread per
process keeps timings stable: a preempted OpenMP thread stalls every barrier of the others).
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent.resolve()
ALLOCATOR_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "LD_PRELOAD")


def pytest_configure(config: pytest.Config) -> None:
    threads = os.environ.get("SLICEATTN_BENCH_THREADS")
    if threads and benchmarks_requested(config):
        torch.set_num_threads(int(threads))


def benchmarks_requested(config: pytest.Config) -> bool:
    return bool(config.getoption("benchmark_only", False) or config.getoption("benchmark_enable", False))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if benchmarks_requested(config):
        return
    selected, deselected = [], []
    for item in items:
        (deselected if HERE in Path(str(item.path)).resolve().parents else selected).append(item)
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = selected


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict) -> None:
    """The facts a CPU timing needs: CPU, threads, torch, allocator setting, benchmark mode."""
    machine_info["cpu_model"] = cpu_model()
    machine_info["cpu_count"] = os.cpu_count()
    machine_info["torch"] = torch.__version__
    machine_info["torch_threads"] = torch.get_num_threads()
    machine_info["allocator"] = {name: os.environ.get(name, "") for name in ALLOCATOR_VARIABLES}
    machine_info["bench_mode"] = os.environ.get("SLICEATTN_BENCH", "quick")
    machine_info["bench_rounds"] = os.environ.get("SLICEATTN_BENCH_ROUNDS", "default")
    # other processes on the machine (1-minute load average when the run started)
    machine_info["load_average"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    if torch.cuda.is_available():
        machine_info["cuda_device"] = torch.cuda.get_device_name()
