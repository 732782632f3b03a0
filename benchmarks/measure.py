"""Measuring counters of the benchmarks: FLOPs, peak memory and bytes saved for backward.

They check the analytic model of ``sliceattn.cost`` (``tests/test_cost.py``) and fill the
benchmarks' ``extra_info``. They live here, not in the installed package: the CPU peak replays
the autograd profiler's memory events through ``prof.kineto_results``, a private profiler
interface that may change with any torch release.

- :func:`measure_flops`: ``FlopCounterMode`` totals;
- :func:`peak_memory`: on CPU the allocation events of the autograd profiler with
  ``profile_memory=True``, replayed in time order (dispatch-mode tensor trackers change what they
  measure); on CUDA ``torch.cuda.max_memory_allocated``;
- :func:`saved_bytes`: tensors packed for backward, seen through ``saved_tensors_hooks``, one
  count per storage.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Union

import torch
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode


@dataclass(frozen=True)
class Measured:
    """Measured cost of one block call.

    Attributes:
        forward_flops, backward_flops: ``FlopCounterMode`` totals.
        train_peak: peak bytes allocated above the starting level during a forward with autograd
            recording (what the forward of a training step adds, output included).
        inference_peak: the same under ``torch.inference_mode()``.
        saved: bytes saved for backward by the forward (distinct storages, parameters excluded).
    """

    forward_flops: int
    backward_flops: int
    train_peak: int
    inference_peak: int
    saved: int


def measure_flops(fn: Callable[[], object]) -> int:
    """FLOPs counted by ``FlopCounterMode`` while ``fn()`` runs (matmuls and convolutions)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def _memory_events(prof: torch.autograd.profiler.profile, device: torch.device) -> list[tuple[int, int]]:
    """``(time_ns, bytes)`` of every allocation (+) and free (-) on ``device``'s type, in time order."""
    kind = torch.autograd.DeviceType.CUDA if device.type == "cuda" else torch.autograd.DeviceType.CPU
    events = [
        (event.start_ns(), event.nbytes())
        for event in prof.kineto_results.events()
        if event.name() == "[memory]" and event.device_type() == kind
    ]
    return sorted(events)


def peak_memory(fn: Callable[[], object], device: Union[str, torch.device] = "cpu") -> int:
    """Peak bytes allocated above the starting level while ``fn()`` runs, on ``device``'s type.

    On CPU the allocation and free events of the autograd profiler (``profile_memory=True``)
    are replayed in time order; they agree with the process's peak RSS. On CUDA it is
    ``torch.cuda.max_memory_allocated`` minus the level before the call. What ``fn`` returns
    stays alive until the end, so it counts.
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        result = fn()
        torch.cuda.synchronize(device)
        del result
        return int(torch.cuda.max_memory_allocated(device) - start)
    with torch.autograd.profiler.profile(profile_memory=True) as prof:
        result = fn()
    del result
    level = peak = 0
    for _, nbytes in _memory_events(prof, device):
        level += nbytes
        peak = max(peak, level)
    return peak


def saved_bytes(fn: Callable[[], object], exclude: Iterable[Tensor] = ()) -> int:
    """Bytes of the tensors that ``fn()`` saves for backward, each storage counted once.

    Args:
        fn: runs a forward with autograd recording (its result is kept alive while counting).
        exclude: tensors whose storages are not counted (typically the module's parameters,
            which exist whatever the implementation).

    Under ``torch.utils.checkpoint`` (non-reentrant) only the checkpointed region's inputs
    are counted: that is what it keeps.
    """
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    storages: dict[int, int] = {}

    def pack(tensor: Tensor) -> Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in skip:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        result = fn()
    del result
    return sum(storages.values())


def measure_block(module: torch.nn.Module, x: Tensor) -> Measured:
    """FLOPs (forward, backward), peaks (training forward, inference) and saved bytes of ``module(x)``.

    ``x`` is ``(B, C, D, H, W)``; it is used as given (set ``requires_grad`` to measure a block
    inside a network). Backward is driven by ``out.sum()``.
    """
    params = list(module.parameters())
    with FlopCounterMode(display=False) as counter:
        out = module(x)
    forward = int(counter.get_total_flops())
    with FlopCounterMode(display=False) as counter:
        out.sum().backward()
    backward = int(counter.get_total_flops())
    del out
    module.zero_grad(set_to_none=True)
    x.grad = None
    train = peak_memory(lambda: module(x), x.device)
    with torch.inference_mode():
        inference = peak_memory(lambda: module(x), x.device)
    saved = saved_bytes(lambda: module(x), exclude=params)
    return Measured(forward, backward, train, inference, saved)


def cuda_time(fn: Callable[[], object], rounds: int, device: Union[str, torch.device] = "cuda") -> float:
    """Minimum seconds of ``fn()`` over ``rounds`` calls, timed by CUDA events on ``device``'s stream.

    One untimed call first (kernel selection, allocator warm-up). Events time the GPU work
    between them, not the Python that enqueues it, as long as ``fn`` does not synchronise.
    """
    device = torch.device(device)
    fn()
    torch.cuda.synchronize(device)
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return min(times)


def peak_bandwidth(device: Union[str, torch.device] = "cuda") -> float:
    """The device's peak memory bandwidth in bytes/s: ``SLICEATTN_PEAK_GBPS`` if set, else from its properties.

    Double data rate: ``2 * memory clock * bus width``, the figure vendors quote (3.35 TB/s for
    an H100 SXM).
    """
    override = os.environ.get("SLICEATTN_PEAK_GBPS")
    if override:
        return float(override) * 1e9
    props = torch.cuda.get_device_properties(torch.device(device))
    return 2 * props.memory_clock_rate * 1e3 * props.memory_bus_width / 8
