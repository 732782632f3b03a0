"""``build_attention``: one factory, one spelling of each kind, options checked by name."""

from __future__ import annotations

import inspect

import pytest
import torch

from sliceattn import ATTENTION_BLOCKS, NonLocal3d, RecurrentSliceAttention3d, build_attention
from sliceattn.factory import attention_option_names


@pytest.mark.parametrize(("kind", "cls"), [("rsa", RecurrentSliceAttention3d), ("nonlocal", NonLocal3d)])
def test_each_kind_builds_its_block_at_identity(kind: str, cls: type) -> None:
    block = build_attention(kind, 4, dtype=torch.float64).eval()
    assert type(block) is cls and block.channels == 4
    x = torch.randn(2, 4, 3, 4, 5, dtype=torch.float64)
    torch.testing.assert_close(block(x), x, rtol=0, atol=0)


def test_options_reach_the_block() -> None:
    block = build_attention("rsa", 8, order=(2, 3, 4), qk_channels=2, save_attention=True, device="meta")
    assert block.dims == (2, 3, 4) and block.projection.qk_channels == 2 and block.save_attention
    assert block.alpha.device.type == "meta"
    assert build_attention("nonlocal", 8, inter_channels=3, sub_sample=True).inter_channels == 3


def test_option_names_are_the_blocks_keyword_arguments() -> None:
    assert set(ATTENTION_BLOCKS) == {"rsa", "nonlocal"}
    for kind, cls in ATTENTION_BLOCKS.items():
        keywords = {p.name for p in inspect.signature(cls).parameters.values() if p.kind is p.KEYWORD_ONLY}
        assert set(attention_option_names(kind)) == keywords and {"device", "dtype"} <= keywords


@pytest.mark.parametrize(
    ("kind", "options", "error", "fragment"),
    [
        ("ncl", {}, ValueError, "attention kind must be one of ['nonlocal', 'rsa'], got 'ncl'"),
        ("RSA", {}, ValueError, "got 'RSA'"),
        (None, {}, TypeError, "attention kind must be a str, got NoneType"),
        ("rsa", {"heads": 8}, ValueError, "attention kind 'rsa' (RecurrentSliceAttention3d) takes no option 'heads'; its options are ["),
        ("rsa", {"heads": 8, "sub_sample": True}, ValueError, "takes no option 'heads', 'sub_sample'"),
        ("nonlocal", {"order": (2, 3, 4)}, ValueError, "attention kind 'nonlocal' (NonLocal3d) takes no option 'order'"),
        ("rsa", {"channels": 8}, ValueError, "takes no option 'channels'"),
        ("rsa", {"alpha_init": float("nan")}, ValueError, "alpha_init must be a finite number, got nan"),
        ("rsa", {"qk_channels": 0}, ValueError, "qk_channels must be >= 1"),
        ("nonlocal", {"save_attention": "yes"}, TypeError, "save_attention must be a bool"),
    ],
)
def test_bad_kind_or_options_raise_naming_them(kind: object, options: dict, error: type, fragment: str) -> None:
    with pytest.raises(error) as info:
        build_attention(kind, 4, **options)  # type: ignore[arg-type]
    assert fragment in str(info.value), str(info.value)
