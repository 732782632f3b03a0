"""Run the example's network in onnxruntime: export it once, then call it like the torch network.

    from mslesion.inference.onnx_engine import onnx_network
    network = onnx_network(model, tile)                    # model: a UNet3d in eval mode
    probability, mask = segment(network, image, tile)      # the same call as with the torch model

The export uses ``torch.onnx.export``'s default exporter (``dynamo=True``, which needs onnxscript;
``pip install 'sliceattn[onnx]'``) with the batch and the spatial sizes symbolic (multiples of the
network's ``divisor``), so one file serves every tile batch, mirrored tiles included. onnxruntime
runs on the CPU in float32: no CUDA, no autocast. On this project's 2-core machine it predicted a
whole scan faster than torch (docs/benchmarks_example.md).
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime
import torch
from torch import Tensor, nn

INPUT, OUTPUT = "image", "logits"


def export_network(model: nn.Module, tile: Sequence[int], path: str | Path, *, batch_size: int = 2) -> Path:
    """Write ``model`` (``(B, M, d, h, w)`` -> logits ``(B, C, d, h, w)``) to an ONNX file.

    Args:
        model: the network, put in eval mode here; its ``in_channels`` are read from the first
            convolution's weight, its ``divisor`` (the product of the strides per axis, 1 if it
            has none) sets the multiples the spatial sizes may take.
        tile: the ``(d, h, w)`` tile used to trace it; an axis whose tile is a single multiple of
            the divisor stays fixed at that size (torch.export specialises sizes of 1).
        path: the ``.onnx`` file to write.
        batch_size: tiles in the traced batch (at least 2, or the batch dimension stays fixed).

    Returns:
        ``path``.
    """
    tile = tuple(int(t) for t in tile)
    divisor = tuple(getattr(model, "divisor", (1, 1, 1)))
    if len(tile) != 3 or any(t < 1 or t % d for t, d in zip(tile, divisor)):
        raise ValueError(f"tile must be three positive multiples of the network's divisor {divisor}, got {tile!r}")
    if batch_size < 2:
        raise ValueError(f"batch_size must be at least 2 (a traced size of 1 becomes a constant), got {batch_size}")
    model.eval()
    in_channels = next(p for p in model.parameters() if p.dim() == 5).shape[1]
    example = torch.zeros(batch_size, in_channels, *tile)
    dims: dict[int, object] = {0: torch.export.Dim("batch")}
    for axis, (size, factor, name) in enumerate(zip(tile, divisor, ("depth", "height", "width"))):
        if size // factor >= 2:
            dims[axis + 2] = factor * torch.export.Dim(name) if factor > 1 else torch.export.Dim(name)
    torch.onnx.export(model, (example,), path, input_names=[INPUT], output_names=[OUTPUT],
                      dynamic_shapes=(dims,), verbose=False)
    return Path(path)


class OnnxNetwork:
    """An onnxruntime session called like the network: ``(B, M, d, h, w)`` tensor -> logits tensor (CPU, float32).

    Args:
        path: an ONNX file written by :func:`export_network`.
        threads: onnxruntime's intra-op threads (default: torch's ``get_num_threads()``, so both
            engines use the same cores).
    """

    def __init__(self, path: str | Path, *, threads: int | None = None) -> None:
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads if threads is not None else torch.get_num_threads()
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def __call__(self, batch: Tensor) -> Tensor:
        (logits,) = self.session.run([OUTPUT], {INPUT: np.ascontiguousarray(batch.detach().cpu().numpy(), np.float32)})
        return torch.from_numpy(logits)

    def eval(self) -> OnnxNetwork:
        """Nothing to switch (the graph is exported in eval mode); returns self, as ``nn.Module.eval`` does."""
        return self


def onnx_network(model: nn.Module, tile: Sequence[int], *, path: str | Path | None = None,
                 threads: int | None = None) -> OnnxNetwork:
    """Export ``model`` (to ``path``, or a temporary file removed once loaded) and load it in onnxruntime.

    Args:
        model: the network (a ``UNet3d`` from ``model.unet``), exported in eval mode.
        tile: the sliding-window tile ``(d, h, w)``.
        path: where to keep the ONNX file; None: a temporary file.
        threads: see :class:`OnnxNetwork`.
    """
    if path is not None:
        return OnnxNetwork(export_network(model, tile, path), threads=threads)
    with tempfile.TemporaryDirectory() as folder:
        return OnnxNetwork(export_network(model, tile, Path(folder) / "network.onnx"), threads=threads)
