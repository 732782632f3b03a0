"""NonLocal3d: the embedded-Gaussian non-local block used as the baseline."""

from __future__ import annotations

import pytest
import torch

from sliceattn import NonLocal3d


def randomize_(module: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for param in module.parameters():
            param.normal_(0.0, 0.3)
    return module


def nonlocal_definition(block: NonLocal3d, x: torch.Tensor) -> torch.Tensor:
    """Wang et al. eq. (1)-(2) with an explicit N x N map (einsum, no reshapes of the map)."""
    theta = block.theta(x).flatten(2)
    phi = block.pool(block.phi(x)).flatten(2)
    g = block.pool(block.g(x)).flatten(2)
    weights = torch.softmax(torch.einsum("bci,bcj->bij", theta, phi), dim=-1)
    y = torch.einsum("bij,bcj->bci", weights, g).reshape(x.shape[0], -1, *x.shape[2:])
    return block.W(y) + x


@pytest.mark.parametrize("sub_sample", [False, True])
@pytest.mark.parametrize("norm", [False, True])
def test_identity_at_init_and_definition(sub_sample: bool, norm: bool) -> None:
    x = torch.randn(2, 6, 3, 4, 6, dtype=torch.float64)
    block = NonLocal3d(6, sub_sample=sub_sample, norm=norm, dtype=torch.float64).eval()
    assert torch.equal(block(x), x)
    randomize_(block)
    torch.testing.assert_close(block(x), nonlocal_definition(block, x))
    assert block.inter_channels == 3


def test_sub_sample_shrinks_the_map() -> None:
    block = NonLocal3d(4, sub_sample=True)
    phi = block.pool(block.phi(torch.randn(1, 4, 3, 8, 6)))
    assert phi.shape[2:] == (3, 4, 3)


def test_gradcheck() -> None:
    block = randomize_(NonLocal3d(2, inter_channels=2, norm=False, sub_sample=True, dtype=torch.float64))
    x = torch.randn(1, 2, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(block, (x,))


def test_autocast_bfloat16_is_finite() -> None:
    block = randomize_(NonLocal3d(8)).eval()
    x = torch.randn(1, 8, 4, 8, 8).relu() * 8
    with torch.no_grad():
        reference = block(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = block(x)
    assert torch.isfinite(out).all()
    assert float((out.float() - reference).norm() / (reference - x).norm()) < 5e-2


def test_compile_fullgraph(device: torch.device) -> None:
    block = randomize_(NonLocal3d(4, sub_sample=True, device=device)).eval()
    x = torch.randn(2, 4, 3, 4, 4, device=device)
    torch.testing.assert_close(torch.compile(block, fullgraph=True)(x), block(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("build", "x", "error", "fragment"),
    [
        (lambda: NonLocal3d(0), None, ValueError, "channels must be >= 1"),
        (lambda: NonLocal3d(4, inter_channels=0), None, ValueError, "inter_channels must be >= 1"),
        (lambda: NonLocal3d(4), torch.randn(1, 4, 3, 3), ValueError, "must be 5-D"),
        (lambda: NonLocal3d(4), torch.randn(1, 5, 3, 3, 3), ValueError, "channels=4"),
        (lambda: NonLocal3d(4), torch.ones(1, 4, 3, 3, 3, dtype=torch.long), TypeError, "floating dtype"),
        (lambda: NonLocal3d(4, sub_sample=True), torch.randn(1, 4, 3, 1, 3), ValueError, "H, W >= 2"),
    ],
)
def test_errors(build, x, error: type, fragment: str) -> None:
    with pytest.raises(error, match=fragment):
        build()(x)
