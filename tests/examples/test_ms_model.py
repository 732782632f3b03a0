"""The example's U-Net: blocks from the library's factory, and one crop-divisibility rule."""

import pytest
import torch

from mslesion.model.unet import UNet3d, build_model, crop_divisor, model_config, parse_method, training_memory_bytes
from sliceattn import NonLocal3d


@pytest.mark.parametrize(("method", "expected"), [
    ("unet", (None, "000")), ("rsa-101", ("rsa", "101")), ("ncl-010", ("nonlocal", "010")), ("ncl-111", ("nonlocal", "111")),
])
def test_method_names_map_to_the_factory_kinds(method: str, expected: tuple) -> None:
    assert parse_method(method) == expected


def test_the_network_takes_only_the_factory_spelling() -> None:
    assert isinstance(UNet3d(channels="tiny", attention="nonlocal", placement="010").bottom_attention, NonLocal3d)
    with pytest.raises(ValueError, match=r"attention must be None or one of \['nonlocal', 'rsa'\], got 'ncl'"):
        UNet3d(channels="tiny", attention="ncl", placement="010")


def test_block_options_are_checked_by_the_factory() -> None:
    with pytest.raises(ValueError, match="attention kind 'nonlocal' \\(NonLocal3d\\) takes no option 'order'"):
        build_model("ncl-010", filters="tiny", attention_options={"order": [2, 3, 4]})
    with pytest.raises(ValueError, match="alpha_init must be a finite number, got nan"):
        build_model("rsa-010", filters="tiny", attention_options={"alpha_init": float("nan")})


@pytest.mark.parametrize(("filters", "strides", "divisor"), [
    ("paper", None, (16, 16, 16)),
    ("tiny", None, (16, 16, 16)),
    ([4, 8, 16], None, (4, 4, 4)),
    ([4, 8, 16], [(1, 2, 2), 2], (2, 4, 4)),
    ([4, 8, 16, 32], [(1, 2, 2), (1, 2, 2), 2], (2, 8, 8)),
])
def test_crop_divisor_is_the_networks_without_building_it(filters, strides, divisor: tuple) -> None:
    config = model_config("rsa-010", filters=filters, strides=strides)
    assert crop_divisor(config) == divisor
    model = build_model(**config)
    assert model.divisor == divisor
    assert model(torch.randn(1, 3, *divisor)).shape == (1, 2, *divisor)  # the smallest crop that fits


def test_bad_strides_are_refused() -> None:
    for strides in ([2, 2], [(1, 2), 2, 2, 2], [0, 2, 2, 2]):
        with pytest.raises(ValueError, match="strides must"):
            crop_divisor(model_config("unet", filters="tiny", strides=strides))


def test_memory_estimate_follows_the_strides() -> None:
    # in-plane pooling only keeps twice the voxels per level: the estimate must see it
    isotropic = model_config("ncl-010", filters="tiny")
    in_plane = model_config("ncl-010", filters="tiny", strides=[(1, 2, 2)] * 4)
    crop = (16, 64, 64)
    assert training_memory_bytes(in_plane, crop, 1) > training_memory_bytes(isotropic, crop, 1)
    bottom = 16 * 64 * 64 // (1 * 16 * 16)
    assert training_memory_bytes(in_plane, crop, 1) >= 4 * 3 * bottom**2  # the non-local N x N map at the bottom
