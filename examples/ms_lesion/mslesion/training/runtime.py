"""Where and how a script runs: the device, torch's threads, the allocator, autocast and peak memory.

Every script that runs the network calls ``select_device`` and ``configure_runtime`` once at start-up;
``train.py`` records the chosen device name in its configuration.
"""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path

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


# Measured on this project's AVX2 machine (AMD EPYC, torch 2.13): without oneDNN's bf16 kernels a bf16
# Conv3d takes torch's reference path, 130x slower than float32 (10.4 s against 0.08 s, 2 x 16 x 32^3).
NO_NATIVE_BF16 = ("this CPU has no native bf16 (AVX-512 BF16 or AMX), so torch runs bf16 convolutions on a reference "
                  "kernel, up to 100x slower than float32")
_warned: set[str] = set()


def native_cpu_bf16() -> str | None:
    """The instructions by which this CPU executes bf16 natively, or None.

    Native means bf16 dot products in hardware (AMX on Intel Sapphire Rapids and later, AVX-512 BF16 on
    those and on AMD Zen 4 and later) and a torch whose oneDNN runs bf16 convolutions. torch's own
    queries answer where they exist; else the Linux ``/proc/cpuinfo`` flags. ARM CPUs with bf16 are not
    detected (not measured here): ``--amp bf16`` still runs them in bf16.

    Returns:
        ``"AMX"``, ``"AVX-512 BF16"`` or None.
    """
    if not onednn_bf16():
        return None
    queries = (("AMX", "_is_amx_tile_supported", "amx_bf16"), ("AVX-512 BF16", "_is_avx512_bf16_supported", "avx512_bf16"))
    flags: set[str] | None = None
    for name, query, flag in queries:
        if hasattr(torch.cpu, query):
            if getattr(torch.cpu, query)():
                return name
            continue
        if flags is None:
            flags = cpu_flags()
        if flag in flags:
            return name
    return None


def onednn_bf16() -> bool:
    """Whether torch's oneDNN runs bf16 convolutions on this CPU (True where torch cannot say)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch without the query: the CPU's flags decide alone
        return True


def cpu_flags() -> set[str]:
    """The CPU's feature flags from ``/proc/cpuinfo`` (empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return {flag for line in text.splitlines() if line.startswith(("flags", "Features"))
            for flag in line.split(":", 1)[1].split()}


def resolve_amp(choice: str, device: torch.device) -> str:
    """The autocast ``--amp choice`` means on ``device``: ``"bf16"``, ``"fp16"`` or ``"none"`` (float32).

    ``auto``: on CUDA bf16 where the GPU supports it, else fp16; on the CPU bf16 where it is native
    (``native_cpu_bf16``), else float32. An explicit ``bf16`` on a CPU without native bf16 is honoured
    with one warning (once per process): it is very slow there.

    Raises:
        UsageError: ``fp16`` on the CPU.
    """
    if choice not in AMP_CHOICES:
        raise ValueError(f"amp must be one of {AMP_CHOICES}, got {choice!r}")
    if device.type == "cuda":
        if choice == "auto":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return choice
    if choice == "fp16":
        raise UsageError(f"--amp fp16 is for CUDA; on the CPU ({device}) use --amp bf16 (fast where the CPU executes "
                         "bf16 natively) or none (float32)")
    native = native_cpu_bf16()
    if choice == "auto":
        return "bf16" if native else "none"
    if choice == "bf16" and not native and "bf16" not in _warned:
        _warned.add("bf16")
        print(f"warning: --amp bf16: {NO_NATIVE_BF16}; --amp auto uses float32 here", file=sys.stderr)
    return choice


def amp_dtype(choice: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``--amp choice`` on ``device`` (``resolve_amp``), None for float32."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[resolve_amp(choice, device)]


def describe_amp(choice: str, device: torch.device) -> str:
    """One line saying which autocast a resolved ``choice`` is and why, for the scripts' output."""
    if choice == "none":
        why = "; this CPU has no native bf16" if device.type == "cpu" and native_cpu_bf16() is None else ""
        return f"autocast: none (float32{why})"
    native = native_cpu_bf16() if device.type == "cpu" else None
    where = f"native {native}" if native else (f"{device}, not native: slow" if device.type == "cpu" else str(device))
    return f"autocast: {choice} ({where}; the loss, the softmax and the attention logits stay float32)"


def recorded_amp(amp: str, device: str) -> str:
    """The autocast a run recorded as ``--amp amp`` on ``device`` used.

    Runs record the resolved choice; a run recorded before that (``"auto"``) used float32 on the CPU
    (autocast was CUDA-only then) and bf16 or fp16 on CUDA.
    """
    if amp != "auto":
        return amp
    if not device.startswith("cuda"):
        return "none"
    return "fp16" if torch.cuda.is_available() and not torch.cuda.is_bf16_supported() else "bf16"


def inference_amp(requested: str | None, trained_amp: str, trained_device: str, device: torch.device) -> str:
    """The autocast of ``evaluate.py``/``predict.py``, printed: ``--amp`` when given, else the one the run used for
    its own evaluation (``recorded_amp``), unless this device cannot run that one fast: then float32, with a
    warning saying why.

    Args:
        requested: ``--amp``, or None.
        trained_amp, trained_device: the ``amp`` and ``device`` the run recorded.
        device: where the model runs now.

    Returns:
        The resolved choice (``resolve_amp``).
    """
    if requested is not None:
        choice = resolve_amp(requested, device)
    else:
        used = recorded_amp(trained_amp, trained_device)
        choice = used
        if device.type == "cpu" and (used == "fp16" or (used == "bf16" and native_cpu_bf16() is None)):
            why = "is refused on the CPU" if used == "fp16" else f"would be slow here ({NO_NATIVE_BF16}; --amp bf16 forces it)"
            print(f"warning: the run evaluated itself with {used} autocast, which {why}: using float32, so the scores "
                  "may differ slightly from the run's metrics.json", file=sys.stderr)
            choice = "none"
        choice = resolve_amp(choice, device)
    print(describe_amp(choice, device))
    return choice


def peak_memory_mb(device: torch.device) -> tuple[float, str]:
    """Peak memory of this process: CUDA allocator peak on a GPU, else the peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda-allocated"
    try:
        import resource  # Unix only
    except ImportError:
        return float("nan"), "unavailable"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "cpu-max-rss"
