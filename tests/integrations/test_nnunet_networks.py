"""sliceattn.nnunet networks on small dynamic_network_architectures U-Nets (no dataset, no planning)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

pytest.importorskip("dynamic_network_architectures", reason="nnU-Net v2 not installed: pip install 'sliceattn[nnunet]'")

from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet  # noqa: E402

from sliceattn import RecurrentSliceAttention3d, cost  # noqa: E402
from sliceattn.nnunet import (  # noqa: E402
    AttentionPlainConvUNet,
    AttentionResidualEncoderUNet,
    load_plain_weights,
    warm_start_state_dict,
)

SHAPE = (2, 1, 16, 16, 16)
COMMON = {
    "input_channels": 1,
    "n_stages": 3,
    "features_per_stage": [4, 8, 16],
    "conv_op": nn.Conv3d,
    "kernel_sizes": 3,
    "strides": [1, 2, 2],
    "num_classes": 2,
    "n_conv_per_stage_decoder": 1,
    "conv_bias": True,
    "norm_op": nn.InstanceNorm3d,
    "norm_op_kwargs": {"eps": 1e-5, "affine": True},
    "nonlin": nn.LeakyReLU,
    "nonlin_kwargs": {"inplace": True},
}
PAIRS = {
    "plain": (PlainConvUNet, AttentionPlainConvUNet, {"n_conv_per_stage": 1}),
    "resenc": (ResidualEncoderUNet, AttentionResidualEncoderUNet, {"n_blocks_per_stage": 1}),
}


def _initialised(cls: type, **kwargs) -> nn.Module:
    """Built and initialised as nnU-Net's get_network_from_plans does."""
    network = cls(**kwargs)
    network.apply(network.initialize)
    return network


def _pair(kind: str, **attention) -> tuple[nn.Module, nn.Module]:
    """The plain network and its attention counterpart with the plain conv weights."""
    plain_cls, attention_cls, specific = PAIRS[kind]
    plain = _initialised(plain_cls, **COMMON, **specific)
    return plain, load_plain_weights(_initialised(attention_cls, **COMMON, **specific, **attention), plain.state_dict())


@pytest.mark.parametrize("kind", sorted(PAIRS))
@pytest.mark.parametrize(
    "attention",
    [
        {"attention": "rsa"},
        {"attention": "rsa", "attention_stages": [0, 1, 2], "attention_kwargs": {"order": [2, 3, 4], "qk_channels": 2}},
        {"attention": "nonlocal", "attention_stages": [-2, -1]},
        # InitWeights_He would re-draw this block's zero output conv: the network must not let it
        {"attention": "nonlocal", "attention_kwargs": {"norm": False}},
    ],
)
def test_identity_at_init_after_nnunet_initialisation(kind: str, attention: dict) -> None:
    plain, network = _pair(kind, **attention)
    x = torch.randn(SHAPE)
    with torch.no_grad():
        assert torch.equal(network.eval()(x), plain.eval()(x))


def test_blocks_sit_after_their_stage_and_feed_the_next() -> None:
    plain, network = _pair("plain", attention_stages=[0])
    calls = []
    network.attention[0].register_forward_hook(lambda module, args, out: calls.append(args[0].shape))
    with torch.no_grad():
        network.attention[0].alpha.fill_(0.5)
        x = torch.randn(SHAPE)
        assert not torch.allclose(network(x), plain(x))
    assert calls == [(2, 4, 16, 16, 16)]
    assert [type(m) for m in network.attention] == [RecurrentSliceAttention3d, nn.Identity, nn.Identity]


def test_deep_supervision_and_backward_reach_the_block() -> None:
    _, network = _pair("resenc", attention_stages=[-1], deep_supervision=True)
    outputs = network(torch.randn(SHAPE))
    assert [tuple(o.shape) for o in outputs] == [(2, 2, 16, 16, 16), (2, 2, 8, 8, 8)]
    sum(o.square().mean() for o in outputs).backward()
    assert network.attention[-1].alpha.grad.abs().sum() > 0


def test_block_keeps_its_init_in_a_deep_copy() -> None:
    network = AttentionPlainConvUNet(**COMMON, n_conv_per_stage=1, attention="nonlocal", attention_kwargs={"norm": False})
    clone = copy.deepcopy(network)
    clone.apply(clone.initialize)
    assert torch.count_nonzero(clone.attention[-1].W.weight) == 0
    first_conv = next(m for m in clone.encoder.modules() if isinstance(m, nn.Conv3d))
    assert torch.count_nonzero(first_conv.bias) == 0  # nnU-Net's init did run (PyTorch's draws biases)


@pytest.mark.parametrize("options", [{}, {"qk_channels": 4, "project_once": True}, {"checkpoint": True}])
def test_feature_map_size_adds_what_the_block_saves(options: dict) -> None:
    plain = PlainConvUNet(**COMMON, n_conv_per_stage=1)
    network = AttentionPlainConvUNet(**COMMON, n_conv_per_stage=1, attention_stages=[1, 2], attention_kwargs=options)
    size = (32, 24, 16)
    extra = network.compute_conv_feature_map_size(size) - plain.compute_conv_feature_map_size(size)
    expected = sum(
        cost.rsa_saved_bytes((1, channels, *[s // stride for s in size]), **options) // 4
        for channels, stride in ((8, 2), (16, 4))
    )
    assert extra == expected > 0


def test_nonlocal_feature_map_size_counts_the_map() -> None:
    plain = PlainConvUNet(**COMMON, n_conv_per_stage=1)
    network = AttentionPlainConvUNet(**COMMON, n_conv_per_stage=1, attention="nonlocal")
    extra = network.compute_conv_feature_map_size((16, 16, 16)) - plain.compute_conv_feature_map_size((16, 16, 16))
    assert extra >= (4 * 4 * 4) ** 2  # the N x N map at the 4^3 bottom


@pytest.mark.parametrize(
    ("kwargs", "error", "fragment"),
    [
        ({"conv_op": nn.Conv2d, "kernel_sizes": 3}, ValueError, "needs conv_op=torch.nn.Conv3d"),
        ({"attention": "transformer"}, ValueError, "attention kind must be one of ['nonlocal', 'rsa']"),
        ({"attention_stages": [3]}, ValueError, "attention_stages must hold encoder stage indices in [-3, 2]"),
        ({"attention_stages": [2, -1]}, ValueError, "distinct stages"),
        ({"attention_stages": []}, TypeError, "non-empty sequence"),
        ({"attention_stages": "-1"}, TypeError, "non-empty sequence"),
        ({"attention_kwargs": {"heads": 2}}, ValueError, "attention kind 'rsa' (RecurrentSliceAttention3d) takes no option 'heads'"),
        ({"attention_kwargs": [("order", (2, 3, 4))]}, TypeError, "attention_kwargs must be a mapping"),
    ],
)
def test_bad_arguments(kwargs: dict, error: type, fragment: str) -> None:
    with pytest.raises(error) as info:
        AttentionPlainConvUNet(**{**COMMON, "n_conv_per_stage": 1, **kwargs})
    assert fragment in str(info.value)


def test_warm_start_strips_wrapper_prefixes_and_checks_keys() -> None:
    plain, network = _pair("plain")
    wrapped = {f"module._orig_mod.{k}": v for k, v in plain.state_dict().items()}
    state = warm_start_state_dict(torch.compile(network), {"network_weights": wrapped})
    assert all(torch.equal(state[k], v) for k, v in plain.state_dict().items())
    assert torch.equal(state["attention.2.alpha"], torch.zeros(3))
    partial = dict(plain.state_dict())
    partial.pop("decoder.seg_layers.0.weight")
    with pytest.raises(KeyError, match=r"missing keys \['decoder.seg_layers.0.weight'\]"):
        load_plain_weights(network, partial)
    with pytest.raises(KeyError, match=r"unexpected keys \['extra'\]"):
        load_plain_weights(network, {**plain.state_dict(), "extra": torch.zeros(1)})
    other = PlainConvUNet(**{**COMMON, "num_classes": 3}, n_conv_per_stage=1).state_dict()
    with pytest.raises(ValueError, match=r"decoder.seg_layers.0.bias' has shape \(3,\), the network expects \(2,\)"):
        load_plain_weights(network, other)
    with pytest.raises(TypeError, match="not a tensor"):
        load_plain_weights(network, {"epoch": 3})


def _live(network: nn.Module) -> nn.Module:
    """Non-zero gates: the block changes the output, so a broken path would show."""
    with torch.no_grad():
        for block in network.attention:
            if isinstance(block, RecurrentSliceAttention3d):
                block.alpha.fill_(0.3)
    return network


def test_float16_autocast_and_grad_scaler_train_step() -> None:
    """nnU-Net trains under float16 autocast with a GradScaler (CUDA); the CPU autocast runs the same casts."""
    _, network = _pair("plain", deep_supervision=False)
    network = _live(network.train())
    x = torch.randn(SHAPE)
    reference = network(x).detach()
    optimizer = torch.optim.SGD(network.parameters(), lr=1e-2, momentum=0.99, nesterov=True)
    scaler = torch.amp.GradScaler("cpu")
    with torch.autocast("cpu", dtype=torch.float16):
        logits = network(x)
        loss = nn.functional.cross_entropy(logits, (x[:, 0] > 0).long())
    assert logits.dtype == torch.float16
    torch.testing.assert_close(logits.float(), reference, rtol=0.05, atol=0.05)
    alpha = network.attention[-1].alpha
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    assert torch.isfinite(alpha.grad).all() and alpha.grad.abs().sum() > 0
    before = alpha.detach().clone()
    scaler.step(optimizer)
    scaler.update()
    assert not torch.equal(alpha, before)


@pytest.mark.parametrize("attention", ["rsa", "nonlocal"])
def test_torch_compile_matches_eager(attention: str) -> None:
    """nnU-Net compiles the network (``torch.compile``) when it trains on CUDA."""
    _, network = _pair("plain", attention=attention)
    network = _live(network.eval())
    compiled = torch.compile(network)
    x = torch.randn(SHAPE)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), network(x), rtol=1e-4, atol=1e-4)
