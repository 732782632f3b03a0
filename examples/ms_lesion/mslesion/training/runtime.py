"""Where and how a script runs: the device, torch's threads, the allocator, autocast and peak memory.

Every script that runs the network calls ``select_device`` and ``configure_runtime`` once at start-up;
``train.py`` records the chosen device name in its configuration.
"""

from __future__ import annotations

import ctypes
import os
import sys

import torch

from ..run import UsageError

AMP_CHOICES: tuple[str, ...] = ("auto", "bf16", "fp16", "none")


def select_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """``"auto"`` -> this process's CUDA device when CUDA is present, else the CPU; else ``torch.device(name)``.

    Raises:
        UsageError: an unknown device name, a kind other than cpu, cuda and mps, or a device this machine
            does not have (CUDA, a CUDA index beyond its devices, Apple's MPS).
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r} is not a device name; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: this torch ({torch.__version__}) sees no CUDA device; use --device cpu")
        if device.index is None:
            device = torch.device("cuda", local_rank)
        if device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: only {torch.cuda.device_count()} CUDA devices")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise UsageError(f"--device {name}: this machine or torch ({torch.__version__}) has no Apple MPS device; "
                             "use --device cpu")
        if device.index not in (None, 0):
            raise UsageError(f"--device {name}: there is one MPS device, mps (or mps:0)")
    elif device.type != "cpu":
        raise UsageError(f"--device {name}: the scripts run on cpu, cuda or mps, not {device.type}")
    return device


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask where the platform has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def tune_allocator() -> bool:
    """Make glibc serve large blocks from the heap instead of a fresh ``mmap`` per tensor.

    With the defaults every large tensor is a new mapping that is page-faulted again at every step;
    this is what ``MALLOC_MMAP_MAX_=0`` does, applied from inside the process. A no-op (False) where
    the C library has no ``mallopt`` or the user set ``MALLOC_MMAP_MAX_`` already.
    """
    if "MALLOC_MMAP_MAX_" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    m_mmap_max = -4  # glibc's malloc.h
    return bool(mallopt(m_mmap_max, 0))


def default_threads(processes: int = 1) -> int:
    """``$OMP_NUM_THREADS`` when set, else the usable cores shared by ``processes``.

    Raises:
        UsageError: ``OMP_NUM_THREADS`` is not a positive number.
    """
    chosen = os.environ.get("OMP_NUM_THREADS", "").strip()
    if not chosen:
        return max(1, usable_cores() // processes)
    try:
        threads = int(chosen)
    except ValueError:
        raise UsageError(f"OMP_NUM_THREADS={chosen!r} is not a number of threads") from None
    if threads < 1:
        raise UsageError(f"OMP_NUM_THREADS={chosen!r} must be >= 1")
    return threads


def configure_runtime(threads: int | None = None, malloc_tuning: bool = True, processes: int = 1) -> int:
    """Set torch's threads (``default_threads`` when None) and the allocator; warn when other processes
    compete for the cores.

    Returns:
        The number of torch threads.
    """
    if threads is None:
        threads = default_threads(processes)
    if threads < 1:
        raise UsageError(f"--threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)
    if malloc_tuning:
        tune_allocator()
    cores = usable_cores()
    if hasattr(os, "getloadavg"):
        load = os.getloadavg()[0]
        if load > cores - threads * processes + 0.75:
            print(f"warning: the load average is {load:.1f} on {cores} cores: other processes compete for the "
                  f"{threads * processes} threads of this run, which can slow it several times; wait, or use "
                  "fewer --threads", file=sys.stderr)
    return threads


def amp_dtype(choice: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``--amp`` on ``device`` (None on the CPU or with ``none``)."""
    if choice not in AMP_CHOICES:
        raise ValueError(f"amp must be one of {AMP_CHOICES}, got {choice!r}")
    if device.type != "cuda" or choice == "none":
        return None
    if choice == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if choice == "bf16" else torch.float16


def peak_memory_mb(device: torch.device) -> tuple[float, str]:
    """Peak memory of this process: CUDA allocator peak on a GPU, else the peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda-allocated"
    try:
        import resource  # Unix only
    except ImportError:
        return float("nan"), "unavailable"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "cpu-max-rss"
