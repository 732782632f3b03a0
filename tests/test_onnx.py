"""ONNX export: the three blocks go through ``torch.onnx.export`` and run in onnxruntime.

The promise (docs/api.md, "Compile and export"): with torch's default exporter (``dynamo=True``,
which needs onnxscript) the exported graph keeps the batch and the three spatial sizes symbolic,
and onnxruntime reproduces torch within 1e-4 at shapes other than the export shape. The gates are
set non-zero so that the attention path, not only the residual, is compared.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("onnx", reason="ONNX export tests need the onnx extra: pip install 'sliceattn[onnx]'")
ort = pytest.importorskip("onnxruntime", reason="ONNX export tests need the onnx extra: pip install 'sliceattn[onnx]'")
pytest.importorskip(
    "onnxscript", reason="torch.onnx.export's default exporter needs onnxscript: pip install 'sliceattn[onnx]'"
)

import onnx  # noqa: E402

from sliceattn import NonLocal3d, RecurrentSliceAttention3d, SliceAttention3d  # noqa: E402

#: torch 2.13's exporter warns about its own use of a deprecated pytree API
pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")

CHANNELS = 6
#: sizes >= 2 at export time: torch.export specialises a dimension of size 0 or 1 to that constant
EXPORT_SHAPE = (2, CHANNELS, 4, 6, 5)
#: other batch and spatial sizes, including 1 and odd sizes
RUN_SHAPES = [(3, CHANNELS, 7, 3, 9), (1, CHANNELS, 5, 8, 2)]
TOLERANCE = 1e-4


def export(module: nn.Module, path: Path) -> None:
    """Export ``module`` in eval mode with batch and spatial sizes dynamic (input ``x``, output ``y``)."""
    batch, depth, height, width = (torch.export.Dim(name) for name in ("batch", "depth", "height", "width"))
    torch.onnx.export(
        module.eval(),
        (torch.randn(EXPORT_SHAPE),),
        path,
        input_names=["x"],
        output_names=["y"],
        dynamic_shapes=({0: batch, 2: depth, 3: height, 4: width},),
        verbose=False,
    )


def symbolic_dims(path: Path) -> list[bool]:
    """For each dim of the graph's input: whether it is symbolic (a name) rather than a fixed size."""
    (graph_input,) = onnx.load(str(path)).graph.input
    return [bool(dim.dim_param) for dim in graph_input.type.tensor_type.shape.dim]


def max_error(module: nn.Module, path: Path, shape: tuple[int, ...]) -> float:
    """Largest absolute difference between onnxruntime and torch on a random input of ``shape``."""
    x = torch.randn(shape)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(["y"], {"x": x.numpy()})
    with torch.no_grad():
        expected = module(x)
    assert got.shape == tuple(expected.shape)
    # the attention path must matter, or the comparison only checks the identity
    assert (expected - x).abs().max() > 0.1
    return float((torch.from_numpy(got) - expected).abs().max())


def gated(module: nn.Module) -> nn.Module:
    """``module`` with its gates away from the identity: every ``alpha`` 0.5, NonLocal3d's BatchNorm affine non-zero."""
    with torch.no_grad():
        for sub in module.modules():
            if isinstance(sub, (SliceAttention3d, RecurrentSliceAttention3d)):
                sub.alpha.fill_(0.5)
            if isinstance(sub, NonLocal3d) and isinstance(sub.W, nn.Sequential):
                norm = sub.W[1]
                norm.weight.fill_(0.7)
                norm.bias.fill_(0.1)
                norm.running_mean.uniform_(-0.1, 0.1)
                norm.running_var.uniform_(0.5, 1.5)
    return module


BLOCKS = {
    "sa-coronal": lambda: SliceAttention3d(CHANNELS, "coronal"),
    "sa-axial-auto-reference": lambda: SliceAttention3d(CHANNELS, "axial", scale="auto", impl="reference"),
    "rsa": lambda: RecurrentSliceAttention3d(CHANNELS),
    "rsa-auto-qk-once": lambda: RecurrentSliceAttention3d(CHANNELS, scale="auto", qk_channels=2, project_once=True),
    "nonlocal": lambda: NonLocal3d(CHANNELS),
    "nonlocal-sub": lambda: NonLocal3d(CHANNELS, sub_sample=True),
}


@pytest.mark.parametrize("name", list(BLOCKS))
def test_block_exports_with_dynamic_shapes(name: str, tmp_path: Path) -> None:
    module = gated(BLOCKS[name]())
    path = tmp_path / f"{name}.onnx"
    export(module, path)
    assert symbolic_dims(path) == [True, False, True, True, True]  # channels fixed by the weights
    for shape in [EXPORT_SHAPE, *RUN_SHAPES]:
        assert max_error(module, path, shape) < TOLERANCE, shape
