"""``python -m sliceattn.nnunet add-config``: plans edits and user mistakes (JSON only, no nnU-Net needed)."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from sliceattn.nnunet import add_attention_configuration, resolve_configuration
from sliceattn.nnunet.plans import PlansError, resolve_stages
from sliceattn.nnunet.__main__ import main


def _architecture(conv: str, n_stages: int, network: str = "PlainConvUNet") -> dict:
    kwargs = {
        "n_stages": n_stages,
        "features_per_stage": [32 * 2**i for i in range(n_stages)],
        "conv_op": f"torch.nn.modules.conv.{conv}",
        "kernel_sizes": [[3, 3, 3]] * n_stages,
        "strides": [[1, 1, 1]] + [[2, 2, 2]] * (n_stages - 1),
        "n_conv_per_stage": [2] * n_stages,
        "n_conv_per_stage_decoder": [2] * (n_stages - 1),
        "conv_bias": True,
        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
        "norm_op_kwargs": {"eps": 1e-05, "affine": True},
        "dropout_op": None,
        "dropout_op_kwargs": None,
        "nonlin": "torch.nn.LeakyReLU",
        "nonlin_kwargs": {"inplace": True},
    }
    return {
        "network_class_name": f"dynamic_network_architectures.architectures.unet.{network}",
        "arch_kwargs": kwargs,
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
    }


PLANS = {
    "dataset_name": "Dataset501_Blobs",
    "plans_name": "nnUNetPlans",
    "configurations": {
        "2d": {"data_identifier": "nnUNetPlans_2d", "patch_size": [64, 64], "architecture": _architecture("Conv2d", 4)},
        "3d_fullres": {"data_identifier": "nnUNetPlans_3d_fullres", "patch_size": [32, 64, 64], "architecture": _architecture("Conv3d", 5)},
        "3d_lowres": {"data_identifier": "nnUNetPlans_3d_lowres", "patch_size": [32, 32, 32], "architecture": _architecture("Conv3d", 4)},
        "3d_cascade_fullres": {"inherits_from": "3d_lowres", "data_identifier": "nnUNetPlans_3d_cascade"},
        "3d_resenc": {"data_identifier": "x", "architecture": _architecture("Conv3d", 4, "ResidualEncoderUNet")},
        "3d_other": {"data_identifier": "y", "architecture": _architecture("Conv3d", 4, "ResidualUNet")},
    },
}


@pytest.fixture
def plans_file(tmp_path: Path) -> Path:
    path = tmp_path / "nnUNetPlans.json"
    path.write_text(json.dumps(PLANS, indent=4))
    return path


def test_add_config_writes_the_whole_architecture(plans_file: Path) -> None:
    command = ["add-config", str(plans_file), "--name", "3d_fullres_rsa", "--base", "3d_fullres", "--stages", "-1", "-2"]
    assert main(command) == 0
    plans = json.loads(plans_file.read_text())
    new = plans["configurations"].pop("3d_fullres_rsa")
    assert plans == PLANS  # nothing else changed
    assert new["inherits_from"] == "3d_fullres"
    assert new["architecture"]["network_class_name"] == "sliceattn.nnunet.AttentionPlainConvUNet"
    kwargs = new["architecture"]["arch_kwargs"]
    assert kwargs.pop("attention") == "rsa" and kwargs.pop("attention_stages") == [-1, -2]
    assert kwargs.pop("attention_kwargs") == {}
    assert kwargs == PLANS["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
    assert new["architecture"]["_kw_requires_import"] == ["conv_op", "norm_op", "dropout_op", "nonlin"]


def test_add_config_nonlocal_with_kwargs_and_resenc(plans_file: Path) -> None:
    command = ["add-config", str(plans_file), "--name", "res_ncl", "--base", "3d_resenc", "--attention", "nonlocal",
               "--attention-kwargs", '{"sub_sample": true}']
    assert main(command) == 0
    new = json.loads(plans_file.read_text())["configurations"]["res_ncl"]["architecture"]
    assert new["network_class_name"] == "sliceattn.nnunet.AttentionResidualEncoderUNet"
    assert new["arch_kwargs"]["attention"] == "nonlocal"
    assert new["arch_kwargs"]["attention_kwargs"] == {"sub_sample": True}


def test_inherited_base_resolves_its_architecture() -> None:
    plans = add_attention_configuration(PLANS, "cascade_rsa", "3d_cascade_fullres")
    architecture = plans["configurations"]["cascade_rsa"]["architecture"]
    assert architecture["arch_kwargs"]["n_stages"] == 4  # the 3d_lowres network it inherits
    resolved = resolve_configuration(plans, "cascade_rsa")
    assert resolved["data_identifier"] == "nnUNetPlans_3d_cascade" and resolved["patch_size"] == [32, 32, 32]
    assert PLANS["configurations"]["3d_cascade_fullres"] == {"inherits_from": "3d_lowres", "data_identifier": "nnUNetPlans_3d_cascade"}


def test_existing_name_needs_force(plans_file: Path, capsys: pytest.CaptureFixture) -> None:
    before = plans_file.read_bytes()
    assert main(["add-config", str(plans_file), "--name", "3d_resenc", "--base", "3d_fullres"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "already exists in the plans file; pass --force" in err
    assert plans_file.read_bytes() == before
    assert main(["add-config", str(plans_file), "--name", "3d_resenc", "--base", "3d_fullres", "--force"]) == 0
    replaced = json.loads(plans_file.read_text())["configurations"]["3d_resenc"]
    assert replaced["inherits_from"] == "3d_fullres"


@pytest.mark.parametrize("force", [[], ["--force"]])
def test_a_configuration_others_inherit_from_is_never_replaced(plans_file: Path, capsys: pytest.CaptureFixture, force: list) -> None:
    # replacing 3d_lowres would silently change 3d_cascade_fullres, which inherits its network
    before = plans_file.read_bytes()
    assert main(["add-config", str(plans_file), "--name", "3d_lowres", "--base", "3d_fullres", *force]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert ("3d_cascade_fullres inherits from 3d_lowres" in err) == bool(force), err
    assert plans_file.read_bytes() == before


def test_every_heir_is_named() -> None:
    plans = copy.deepcopy(PLANS)
    plans["configurations"]["3d_lowres_big"] = {"inherits_from": "3d_lowres", "data_identifier": "z"}
    with pytest.raises(PlansError, match=r"'3d_lowres' cannot be replaced: 3d_cascade_fullres, 3d_lowres_big inherit from 3d_lowres"):
        add_attention_configuration(plans, "3d_lowres", "3d_fullres", force=True)


@pytest.mark.parametrize(
    ("arguments", "fragment"),
    [
        (["--base", "2d"], "not 3-D"),
        (["--base", "3d_nope"], "'3d_nope' is not in the plans file"),
        (["--base", "3d_other"], "attention can be added to"),
        (["--stages", "5"], "attention_stages must hold encoder stage indices in [-5, 4]"),
        (["--stages", "-1", "4"], "distinct stages"),
        (["--attention-kwargs", "{order: 1}"], "--attention-kwargs must be a JSON object"),
        (["--attention-kwargs", "[1]"], "--attention-kwargs must be a JSON object"),
        (["--attention-kwargs", '{"order": [2, 2, 3]}'], "order must name distinct axes"),
        (["--attention-kwargs", '{"heads": 4}'], "takes no option 'heads'; its options are ["),
        (["--name", "3d_fullres"], "name other than the base's"),
    ],
)
def test_user_mistakes_are_one_error_line(plans_file: Path, capsys: pytest.CaptureFixture, arguments: list, fragment: str) -> None:
    before = plans_file.read_bytes()
    name = [] if "--name" in arguments else ["--name", "new"]
    assert main(["add-config", str(plans_file), *name, *arguments]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and fragment in err, err
    assert plans_file.read_bytes() == before


@pytest.mark.parametrize(("content", "fragment"), [(None, "does not exist"), ("{not json", "not readable JSON"), ("[]", "not a JSON object"), ("{}", "no 'configurations'")])
def test_bad_plans_file(tmp_path: Path, capsys: pytest.CaptureFixture, content, fragment: str) -> None:
    path = tmp_path / "plans.json"
    if content is not None:
        path.write_text(content)
    assert main(["add-config", str(path), "--name", "x"]) == 2
    assert fragment in capsys.readouterr().err


@pytest.mark.parametrize("stages", [np.int64(-1), [np.int64(-1)], (np.int32(2), -2), np.int8(-1)], ids=repr)
def test_numpy_integer_stages_are_accepted_everywhere(stages: object) -> None:
    plans = add_attention_configuration(PLANS, "3d_fullres_rsa", "3d_fullres", stages=stages)
    recorded = plans["configurations"]["3d_fullres_rsa"]["architecture"]["arch_kwargs"]["attention_stages"]
    expected = [int(stage) for stage in (stages if isinstance(stages, (list, tuple)) else [stages])]
    assert recorded == expected and all(type(stage) is int for stage in recorded)
    json.dumps(plans)  # the plans file stays JSON
    assert resolve_stages(stages, 5) == tuple(sorted(stage % 5 for stage in expected))


@pytest.mark.parametrize("stages", [True, np.float64(-1.0), -1.0, [True], [np.float32(1.0)], "-1"], ids=repr)
def test_bool_and_float_stages_are_refused(stages: object) -> None:
    with pytest.raises(PlansError, match="attention_stages must"):
        add_attention_configuration(PLANS, "3d_fullres_rsa", "3d_fullres", stages=stages)
    with pytest.raises((TypeError, ValueError), match="attention_stages must"):
        resolve_stages(stages, 5)


def test_library_call_does_not_modify_its_input() -> None:
    plans = copy.deepcopy(PLANS)
    add_attention_configuration(plans, "x", "3d_fullres", attention_kwargs={"order": [3, 4, 2]})
    assert plans == PLANS


def test_networks_without_the_extra_name_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import sliceattn.nnunet

    monkeypatch.setitem(sys.modules, "dynamic_network_architectures.architectures.unet", None)
    monkeypatch.delitem(sys.modules, "sliceattn.nnunet.networks", raising=False)
    with pytest.raises(ImportError, match=r"pip install 'sliceattn\[nnunet\]'"):
        sliceattn.nnunet.AttentionPlainConvUNet
    with pytest.raises(AttributeError, match="has no attribute 'AttentionUNet'"):
        sliceattn.nnunet.AttentionUNet
