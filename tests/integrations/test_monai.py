"""sliceattn.monai: RSA in MONAI's UNet, DynUNet and BasicUNet; the recipes of docs/integrations.md run."""

from __future__ import annotations

import importlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

monai = pytest.importorskip("monai", reason="MONAI not installed: pip install 'sliceattn[monai]'")

from monai.bundle import ConfigParser  # noqa: E402
from monai.inferers import sliding_window_inference  # noqa: E402
from monai.networks.nets import UNet, BasicUNet, DynUNet  # noqa: E402

import sliceattn.monai  # noqa: E402
from sliceattn import NonLocal3d, RecurrentSliceAttention3d  # noqa: E402
from sliceattn.monai import RSABasicUNet, RSADynUNet, RSAUNet  # noqa: E402

DOC = Path(__file__).resolve().parents[2] / "docs" / "integrations.md"
SHAPE = (2, 1, 32, 32, 32)
NETWORKS = {
    "unet": (UNet, RSAUNet, {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "channels": (4, 8, 16), "strides": (2, 2), "num_res_units": 1}),
    "dynunet": (DynUNet, RSADynUNet, {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "kernel_size": [3, 3, 3], "strides": [1, 2, 2], "upsample_kernel_size": [2, 2], "filters": [4, 8, 16]}),
    "basicunet": (BasicUNet, RSABasicUNet, {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "features": (4, 4, 8, 8, 16, 4)}),
}
KWARGS = {cls: kwargs for _, cls, kwargs in NETWORKS.values()}


def _blocks(network: nn.Module) -> list[nn.Module]:
    return list({id(m): m for m in network.modules() if isinstance(m, (RecurrentSliceAttention3d, NonLocal3d))}.values())


def _with_plain_weights(plain: nn.Module, network: nn.Module) -> nn.Module:
    """Copy the plain network's tensors into ``network`` in registration order, skipping the block's."""
    inside = {id(t) for block in _blocks(network) for t in block.state_dict(keep_vars=True).values()}
    keys = [k for k, t in network.state_dict(keep_vars=True).items() if id(t) not in inside]
    values = list(plain.state_dict().values())
    assert len(keys) == len(values)
    network.load_state_dict(dict(zip(keys, values)), strict=False)
    return network


@pytest.fixture(params=sorted(NETWORKS))
def pair(request: pytest.FixtureRequest) -> tuple[nn.Module, nn.Module]:
    plain_cls, attention_cls, kwargs = NETWORKS[request.param]
    return plain_cls(**kwargs), attention_cls(**kwargs)


def test_one_block_at_the_bottom_and_identity_at_init(pair: tuple[nn.Module, nn.Module]) -> None:
    plain, network = pair
    (block,) = _blocks(network)
    assert block.channels == 16
    _with_plain_weights(plain, network)
    x = torch.randn(SHAPE)
    with torch.no_grad():
        assert torch.equal(network.eval()(x), plain.eval()(x))
        block.alpha.fill_(0.5)
        assert not torch.allclose(network(x), plain(x))


def test_train_steps_sliding_window_and_state_dict_round_trip(pair: tuple[nn.Module, nn.Module]) -> None:
    _, network = pair
    (block,) = _blocks(network)
    optimizer = torch.optim.Adam(network.parameters(), lr=1e-2)
    loss_function = monai.losses.DiceCELoss(to_onehot_y=True, softmax=True)
    x = torch.randn(SHAPE)
    labels = (x > 1).long()
    for _ in range(3):
        optimizer.zero_grad()
        logits = network(x)
        logits = logits[:, 0] if logits.ndim == 6 else logits  # DynUNet deep-supervision stack
        loss = loss_function(logits, labels)
        loss.backward()
        optimizer.step()
    assert torch.isfinite(loss) and block.alpha.abs().sum() > 0  # the gates trained
    network.eval()
    volume = torch.randn(1, 1, 40, 48, 36)
    with torch.no_grad():
        output = sliding_window_inference(volume, roi_size=(32, 32, 32), sw_batch_size=2, predictor=network, overlap=0.25)
        assert output.shape == (1, 2, 40, 48, 36) and torch.isfinite(output).all()
        restored = type(network)(**KWARGS[type(network)])
        restored.load_state_dict(network.state_dict())
        assert torch.equal(restored.eval()(volume[..., :32, :32, :32]), network(volume[..., :32, :32, :32]))


def test_nonlocal_block_and_kwargs_reach_the_block() -> None:
    network = RSADynUNet(**KWARGS[RSADynUNet], attention="nonlocal", attention_kwargs={"norm": False})
    (block,) = _blocks(network)
    assert isinstance(block, NonLocal3d)
    assert torch.count_nonzero(block.W.weight) == 0  # DynUNet's own init did not re-draw it
    network = RSAUNet(**KWARGS[RSAUNet], attention_kwargs={"order": [2, 3, 4], "qk_channels": 4})
    (block,) = _blocks(network)
    assert block.dims == (2, 3, 4) and block.projection.qk_channels == 4


@pytest.mark.parametrize("cls", [RSAUNet, RSADynUNet, RSABasicUNet])
def test_bad_arguments(cls: type) -> None:
    kwargs = KWARGS[cls]
    with pytest.raises(ValueError, match="spatial_dims must be 3, got 2"):
        cls(**{**kwargs, "spatial_dims": 2})
    with pytest.raises(ValueError, match=r"attention kind must be one of \['nonlocal', 'rsa'\], got 'gate'"):
        cls(**kwargs, attention="gate")
    with pytest.raises(ValueError, match=r"attention kind 'rsa' \(RecurrentSliceAttention3d\) takes no option 'heads'"):
        cls(**kwargs, attention_kwargs={"heads": 8})
    with pytest.raises(TypeError, match="attention_kwargs must be a mapping"):
        cls(**kwargs, attention_kwargs=[("order", (2, 3, 4))])


def test_missing_monai_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "monai.networks.nets", None)
    monkeypatch.delitem(sys.modules, "sliceattn.monai.networks")  # imported again, now without MONAI
    with pytest.raises(ImportError, match=r"^sliceattn.monai.RSAUNet needs monai.networks.nets \(.*\): pip install 'sliceattn\[monai\]'$"):
        getattr(sliceattn.monai, "RSAUNet")
    with pytest.raises(ImportError, match=r"^sliceattn.monai's networks needs monai.networks.nets .*pip install 'sliceattn\[monai\]'$"):
        importlib.import_module("sliceattn.monai.networks")
    with pytest.raises(AttributeError, match="has no attribute 'RSANet'"):
        getattr(sliceattn.monai, "RSANet")


def test_sliceattn_and_its_monai_package_import_without_monai() -> None:
    script = (
        "import sys; sys.modules['monai'] = None\n"
        "import sliceattn, sliceattn.monai\n"
        "assert 'sliceattn.monai.networks' not in sys.modules\n"
        "try:\n    sliceattn.monai.RSADynUNet\nexcept ImportError as error:\n    print(error)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout.startswith("sliceattn.monai.RSADynUNet needs monai.networks.nets")
    assert result.stdout.rstrip().endswith("pip install 'sliceattn[monai]'")


def test_classes_are_plain_module_level_classes() -> None:
    # defined in sliceattn.monai.networks (what type checkers, IDEs and pickle see), one class per name
    import sliceattn.monai.networks as networks

    for name in sliceattn.monai.__all__:
        cls = getattr(sliceattn.monai, name)
        assert cls is getattr(networks, name)
        assert (cls.__module__, cls.__qualname__) == ("sliceattn.monai.networks", name)


def _doc_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", DOC.read_text(), flags=re.S)


@pytest.mark.parametrize("index", range(len(_doc_blocks("python"))))
def test_docs_python_recipe_runs(index: int) -> None:
    exec(compile(_doc_blocks("python")[index], f"{DOC.name}[python {index}]", "exec"), {"__name__": "__doc_recipe__"})


def test_docs_bundle_snippet_builds_the_network() -> None:
    (snippet,) = _doc_blocks("json")
    config = json.loads(snippet)
    config["device"] = "$torch.device('cpu')"
    config["imports"] = ["$import torch"]
    parser = ConfigParser(config)
    network = parser.get_parsed_content("network")
    assert isinstance(network, RSAUNet)
    (block,) = _blocks(network)
    assert block.dims == (3, 2, 4) and block.channels == 128
    assert network(torch.randn(1, 3, 16, 16, 16)).shape == (1, 2, 16, 16, 16)


def test_docs_link_nnunet_guide() -> None:
    assert "(nnunet.md)" in DOC.read_text()
    assert (DOC.parent / "nnunet.md").is_file()
