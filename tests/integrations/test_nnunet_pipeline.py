"""sliceattn.nnunet against the real nnU-Net v2: plan, add-config, build, train, predict, warm start.

One module-scoped run on a tiny synthetic dataset (4 cases of 32^3, a bright blob labelled 1):
``nnUNetv2_plan_and_preprocess`` and ``nnUNetv2_predict`` run as the stock commands; training
runs through ``nnUNetTrainer``'s Python API for 3 iterations (the command runs nnU-Net's 1000
epochs, and naming a shorter trainer makes nnU-Net import its Primus trainers, which need a
torchvision whose compiled ops load against the CPU-only torch of CI).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

nnunetv2 = pytest.importorskip("nnunetv2", reason="nnU-Net v2 not installed: pip install 'sliceattn[nnunet]'")
nibabel = pytest.importorskip("nibabel", reason="nibabel not installed")

from nnunetv2.run.load_pretrained_weights import load_pretrained_weights  # noqa: E402
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer  # noqa: E402
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans  # noqa: E402
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager  # noqa: E402

from sliceattn import RecurrentSliceAttention3d  # noqa: E402
from sliceattn.nnunet import AttentionPlainConvUNet, load_plain_weights  # noqa: E402
from sliceattn.nnunet.__main__ import main as nnunet_cli  # noqa: E402

DATASET = "Dataset501_Blobs"
CASES = 4
SIZE = 32


def _write_dataset(raw: Path) -> None:
    """4 cases: noise plus a bright ball of random centre and radius, labelled 1."""
    folder = raw / DATASET
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    rng = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(*[np.arange(SIZE)] * 3, indexing="ij"))
    affine = np.diag([1.0, 1.0, 2.0, 1.0])  # anisotropic like MS MRI
    for case in range(CASES):
        centre = rng.integers(10, SIZE - 10, size=3)[:, None, None, None]
        label = (((grid - centre) ** 2).sum(0) <= rng.integers(4, 7) ** 2).astype(np.uint8)
        image = rng.normal(0, 1, (SIZE,) * 3) + 3.0 * label
        nibabel.save(nibabel.Nifti1Image(image.astype(np.float32), affine), folder / "imagesTr" / f"blob_{case:03d}_0000.nii.gz")
        nibabel.save(nibabel.Nifti1Image(label, affine), folder / "labelsTr" / f"blob_{case:03d}.nii.gz")
    dataset = {
        "channel_names": {"0": "FLAIR"},
        "labels": {"background": 0, "lesion": 1},
        "numTraining": CASES,
        "file_ending": ".nii.gz",
    }
    (folder / "dataset.json").write_text(json.dumps(dataset, indent=2))


def _command(name: str, *args: str) -> None:
    """Run an nnU-Net console script of this environment; fail with its output's tail."""
    script = shutil.which(name, path=os.path.dirname(sys.executable))
    assert script is not None, f"{name} not installed next to {sys.executable}"
    done = subprocess.run([script, *args], capture_output=True, text=True, env=os.environ)
    if done.returncode != 0:
        pytest.fail(f"{name} exited {done.returncode}:\n{(done.stdout + done.stderr)[-3000:]}")


class _Run:
    """Paths and products of the module's one nnU-Net run."""

    def __init__(self, root: Path) -> None:
        self.raw, self.preprocessed, self.results = root / "raw", root / "preprocessed", root / "results"
        self.plans_file = self.preprocessed / DATASET / "nnUNetPlans.json"
        self.prediction = root / "prediction"

    def plans(self) -> dict:
        return json.loads(self.plans_file.read_text())

    def dataset_json(self) -> dict:
        return json.loads((self.preprocessed / DATASET / "dataset.json").read_text())

    def network(self, configuration: str, **kwargs) -> torch.nn.Module:
        """The configuration's network, built by nnU-Net from the plans file."""
        manager = PlansManager(self.plans())
        config = manager.get_configuration(configuration)
        return get_network_from_plans(
            config.network_arch_class_name, config.network_arch_init_kwargs,
            config.network_arch_init_kwargs_req_import, 1, 2, **kwargs,
        )

    def patch(self, configuration: str = "3d_fullres") -> list[int]:
        return PlansManager(self.plans()).get_configuration(configuration).patch_size


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("nnunet")
    run = _Run(root)
    _write_dataset(run.raw)
    env = {
        "nnUNet_raw": str(run.raw), "nnUNet_preprocessed": str(run.preprocessed), "nnUNet_results": str(run.results),
        "nnUNet_n_proc_DA": "1", "nnUNet_compile": "false", "OMP_NUM_THREADS": "1",
    }
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        _command("nnUNetv2_plan_and_preprocess", "-d", "501", "-c", "3d_fullres", "-np", "1")
        patch.setenv("nnUNet_n_proc_DA", "0")  # training: augment in this process (planning needs >= 1)
        assert nnunet_cli(["add-config", str(run.plans_file), "--name", "3d_fullres_rsa", "--base", "3d_fullres"]) == 0
        trainer = nnUNetTrainer(run.plans() | {"continue_training": False}, "3d_fullres_rsa", "all", run.dataset_json(), device=torch.device("cpu"))
        trainer.num_epochs, trainer.num_iterations_per_epoch, trainer.num_val_iterations_per_epoch = 1, 3, 1
        trainer.run_training()  # (nnUNetv2_train then validates; the predict command below covers inference)
        run.trainer_output = Path(trainer.output_folder)
        case_dir = root / "one_case"
        case_dir.mkdir()
        shutil.copy(run.raw / DATASET / "imagesTr" / "blob_000_0000.nii.gz", case_dir)
        _command(
            "nnUNetv2_predict", "-i", str(case_dir), "-o", str(run.prediction), "-d", "501", "-c", "3d_fullres_rsa",
            "-f", "all", "-device", "cpu", "--disable_tta", "-npp", "1", "-nps", "1",
        )
        yield run


def test_add_config_writes_a_configuration_nnunet_reads(run: _Run) -> None:
    plans = run.plans()
    config = plans["configurations"]["3d_fullres_rsa"]
    assert config["inherits_from"] == "3d_fullres"
    assert config["architecture"]["network_class_name"] == "sliceattn.nnunet.AttentionPlainConvUNet"
    base = PlansManager(plans).get_configuration("3d_fullres")
    rsa = PlansManager(plans).get_configuration("3d_fullres_rsa")
    assert rsa.data_identifier == base.data_identifier  # reuses the preprocessed data
    assert rsa.patch_size == base.patch_size and rsa.batch_size == base.batch_size
    kwargs = rsa.network_arch_init_kwargs
    assert kwargs["attention"] == "rsa" and kwargs["attention_stages"] == [-1]
    assert {k: v for k, v in kwargs.items() if not k.startswith("attention")} == base.network_arch_init_kwargs


def test_network_from_plans_forward_backward(run: _Run) -> None:
    network = run.network("3d_fullres_rsa", deep_supervision=True)
    assert isinstance(network, AttentionPlainConvUNet)
    blocks = [m for m in network.attention if isinstance(m, RecurrentSliceAttention3d)]
    assert len(blocks) == 1 and network.attention[-1] is blocks[0]
    x = torch.randn(2, 1, *run.patch())
    outputs = network(x)
    assert outputs[0].shape == (2, 2, *run.patch())
    sum(o.float().square().mean() for o in outputs).backward()
    assert blocks[0].alpha.grad is not None and blocks[0].alpha.grad.abs().sum() > 0


def test_identity_at_init_against_the_base_configuration(run: _Run) -> None:
    base = run.network("3d_fullres").eval()
    rsa = load_plain_weights(run.network("3d_fullres_rsa"), base.state_dict()).eval()
    x = torch.randn(1, 1, *run.patch())
    with torch.no_grad():
        assert torch.equal(rsa(x), base(x))
        rsa.attention[-1].alpha.fill_(0.5)  # the block is live: a non-zero gate changes the output
        assert not torch.allclose(rsa(x), base(x))


def test_planner_memory_estimate_counts_the_block(run: _Run) -> None:
    patch = run.patch()
    base = run.network("3d_fullres", allow_init=False).compute_conv_feature_map_size(patch)
    rsa = run.network("3d_fullres_rsa", allow_init=False).compute_conv_feature_map_size(patch)
    kwargs = PlansManager(run.plans()).get_configuration("3d_fullres").network_arch_init_kwargs
    bottom = [p // int(np.prod([s[i] for s in kwargs["strides"]])) for i, p in enumerate(patch)]
    # faithful RSA keeps 12 C*N values for backward plus its L x L maps
    extra = rsa - base
    assert 12 * kwargs["features_per_stage"][-1] * int(np.prod(bottom)) <= extra < 13 * kwargs["features_per_stage"][-1] * int(np.prod(bottom)) + 100


def test_training_through_nnunet_trainer_updates_the_block(run: _Run) -> None:
    checkpoint = torch.load(run.trainer_output / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    keys = [k for k in checkpoint["network_weights"] if k.startswith("attention.")]
    assert keys and all(torch.isfinite(checkpoint["network_weights"][k]).all() for k in keys)
    alpha = next(checkpoint["network_weights"][k] for k in keys if k.endswith(".alpha"))
    assert alpha.abs().sum() > 0  # three SGD steps moved the gates off 0
    log = next(run.trainer_output.glob("training_log_*.txt")).read_text()
    assert "Epoch 0" in log and "train_loss" in log


def test_predict_command_writes_a_segmentation(run: _Run) -> None:
    written = nibabel.load(run.prediction / "blob_000.nii.gz")
    source = nibabel.load(run.raw / DATASET / "imagesTr" / "blob_000_0000.nii.gz")
    assert written.shape == source.shape
    assert set(np.unique(np.asarray(written.dataobj))) <= {0, 1}


def test_warm_start_checkpoint_passes_nnunet_pretrained_weights(run: _Run, tmp_path: Path) -> None:
    base = run.network("3d_fullres", deep_supervision=True)
    plain = tmp_path / "plain.pth"
    torch.save({"network_weights": base.state_dict(), "init_args": {"dataset_json": run.dataset_json()}}, plain)
    out = tmp_path / "warm.pth"
    command = ["warm-start", str(plain), str(out), "--plans", str(run.plans_file), "--name", "3d_fullres_rsa"]
    assert nnunet_cli(command) == 0
    rsa = run.network("3d_fullres_rsa", deep_supervision=True)
    with pytest.raises(AssertionError, match="missing"):  # what nnU-Net does with the plain checkpoint
        load_pretrained_weights(rsa, str(plain))
    load_pretrained_weights(rsa, str(out))  # nnU-Net's own -pretrained_weights loader
    # it transfers everything but the segmentation heads (the target dataset may have other labels)
    heads = {k: v for k, v in base.state_dict().items() if ".seg_layers." in k}
    assert heads and not all(torch.equal(rsa.state_dict()[k], v) for k, v in heads.items())
    rsa.load_state_dict(heads, strict=False)
    x = torch.randn(1, 1, *run.patch())
    with torch.no_grad():
        assert torch.equal(rsa.eval()(x)[0], base.eval()(x)[0])


def test_warm_start_refuses_to_replace_output(run: _Run, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "warm.pth"
    out.write_bytes(b"keep me")
    command = ["warm-start", str(out), str(out), "--plans", str(run.plans_file), "--name", "3d_fullres_rsa"]
    assert nnunet_cli(command) == 2
    assert "exists; pass --force" in capsys.readouterr().err
    assert out.read_bytes() == b"keep me"


def test_warm_start_user_mistakes(run: _Run, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bare = tmp_path / "bare.pth"
    torch.save(run.network("3d_fullres").state_dict(), bare)  # no init_args: dataset.json unknown
    out = tmp_path / "out.pth"
    command = ["warm-start", str(bare), str(out), "--plans", str(run.plans_file), "--name", "3d_fullres_rsa"]
    assert nnunet_cli(command) == 2
    assert "records no dataset.json (not an nnU-Net checkpoint); pass --dataset-json" in capsys.readouterr().err
    dataset_json = run.preprocessed / DATASET / "dataset.json"
    rsa = tmp_path / "rsa.pth"  # an attention checkpoint is not a plain one
    torch.save(run.network("3d_fullres_rsa").state_dict(), rsa)
    assert nnunet_cli(["warm-start", str(rsa), *command[2:], "--dataset-json", str(dataset_json)]) == 2
    err = capsys.readouterr().err
    assert "does not fit configuration '3d_fullres_rsa'" in err and "unexpected keys ['attention." in err
    assert nnunet_cli([*command[:-1], "3d_nope", "--dataset-json", str(dataset_json)]) == 2
    assert "configuration '3d_nope' is not in the plans file" in capsys.readouterr().err
    assert not out.exists()
