"""The example's U-Net with RSA or non-local attention through ONNX (``onnx_engine.py``).

Exported once at a 32^3 tile, the onnxruntime network must reproduce torch within 1e-4 at other
batch and spatial sizes, and ``inference.segment`` must give the same probabilities with either.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnx", reason="ONNX tests need the onnx extra: pip install 'sliceattn[onnx]'")
pytest.importorskip("onnxruntime", reason="ONNX tests need the onnx extra: pip install 'sliceattn[onnx]'")
pytest.importorskip("onnxscript", reason="torch.onnx.export's default exporter needs onnxscript: pip install 'sliceattn[onnx]'")

from mslesion.inference.sliding_window import segment  # noqa: E402
from mslesion.model.unet import build_model, model_config  # noqa: E402
from mslesion.inference.onnx_engine import OnnxNetwork, export_network, onnx_network  # noqa: E402

from sliceattn import NonLocal3d, RecurrentSliceAttention3d  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")
TILE = (32, 32, 32)
TOLERANCE = 1e-4


def attentive_unet(method: str) -> torch.nn.Module:
    """The ``tiny`` U-Net of ``method`` with its attention switched on (gates 0.5, non-local norm non-zero)."""
    model = build_model(**model_config(method, filters="tiny", attention_options={"scale": "auto"} if method.startswith("rsa") else None))
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, RecurrentSliceAttention3d):
                module.alpha.fill_(0.5)
            if isinstance(module, NonLocal3d):
                module.W[1].weight.fill_(0.7)
                module.W[1].bias.fill_(0.1)
    return model.eval()


@pytest.mark.parametrize("method", ["rsa-101", "ncl-010"])
def test_unet_matches_torch_at_other_shapes(method: str, tmp_path: Path) -> None:
    model = attentive_unet(method)
    network = OnnxNetwork(export_network(model, TILE, tmp_path / "unet.onnx"), threads=1)
    for shape in [(2, 3, *TILE), (1, 3, 16, 48, 32), (3, 3, 32, 16, 64)]:
        batch = torch.randn(shape)
        with torch.no_grad():
            expected = model(batch)
        got = network(batch)
        assert got.shape == expected.shape
        assert (got - expected).abs().max() < TOLERANCE, shape
    # the attention matters here: the same network without it differs by far more than the tolerance
    plain = attentive_unet(method)
    for module in plain.modules():
        if isinstance(module, RecurrentSliceAttention3d):
            module.alpha.data.zero_()
        if isinstance(module, NonLocal3d):
            module.W[1].weight.data.zero_()
            module.W[1].bias.data.zero_()
    with torch.no_grad():
        assert (plain(batch) - expected).abs().max() > 100 * TOLERANCE


def test_segment_with_onnx_network_matches_torch() -> None:
    model = attentive_unet("rsa-010")
    image = np.random.default_rng(0).normal(size=(3, 40, 36, 50)).astype(np.float32)
    probability, mask = segment(model, image, TILE, overlap=0.5)
    onnx_probability, onnx_mask = segment(onnx_network(model, TILE, threads=1), image, TILE, overlap=0.5, mirror=False)
    assert np.abs(onnx_probability - probability).max() < TOLERANCE
    # a voxel may flip only where torch's probability is within the tolerance of 0.5
    flipped = onnx_mask != mask
    assert np.all(np.abs(probability[flipped] - 0.5) < TOLERANCE)


@pytest.mark.parametrize(
    ("tile", "batch_size", "message"),
    [((32, 32, 30), 2, "multiples of the network's divisor"), ((32, 32), 2, "three positive"), (TILE, 1, "at least 2")],
)
def test_export_refuses_bad_arguments(tile: tuple[int, ...], batch_size: int, message: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=message):
        export_network(attentive_unet("rsa-010"), tile, tmp_path / "x.onnx", batch_size=batch_size)


def test_predict_engine_onnx_writes_what_torch_writes(cohort: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    import nibabel as nib

    from mslesion import predict
    from mslesion import train

    run = tmp_path / "run"
    assert train.main(["--data", str(cohort), "--iterations", "2", "--test-fraction", "0.5", "--out", str(run),
                       "--preset", "demo", "--crop", "16", "32", "32", "--no-progress", "--val-every", "0"]) == 0
    common = ["--checkpoint", str(run / "model.pt"), "--data", str(cohort), "--probabilities"]
    for engine in ("torch", "onnx"):
        assert predict.main([*common, "--out", str(tmp_path / engine), "--engine", engine]) == 0
    for case in ("sub-001", "sub-004"):
        probabilities = [np.asanyarray(nib.load(tmp_path / e / f"{case}_prob.nii.gz").dataobj) for e in ("torch", "onnx")]
        np.testing.assert_allclose(*probabilities, atol=1e-3)
    from mslesion.run import UsageError

    with pytest.raises(UsageError, match="--engine onnx runs on the CPU, not cuda:0"):  # the check a GPU run meets
        predict.onnx_model(torch.nn.Identity(), (16, 32, 32), torch.device("cuda:0"))
