"""What people read from the example: lesion tables and maps in world coordinates, probabilities, the
component filter, mirroring TTA, the foreground crop, and the training presets and runtime settings."""

from __future__ import annotations

import csv
import dataclasses
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from mslesion import cli, predict
from mslesion.training import runtime
from mslesion import train
from mslesion.training import loop as training
from mslesion.config import PRESETS, TrainingConfig
from mslesion.data.reading import DataOptions
from mslesion.inference.sliding_window import segment, sliding_window_probabilities
from mslesion.inference.lesions import label_lesions, lesion_table, remove_small_lesions, voxel_volume_mm3
from mslesion.evaluation.metrics import CONNECTIVITY_26
from mslesion.model.unet import FILTER_PRESETS
from scipy import ndimage


class FlairThreshold(nn.Module):
    """A stand-in network: lesion where the FLAIR channel is above 1.5 (z-score), smoothly."""

    def __init__(self, channel: int = 2) -> None:
        super().__init__()
        self.channel = channel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lesion = 4.0 * (x[:, self.channel] - 1.5)
        return torch.stack([torch.zeros_like(lesion), lesion], dim=1)


def write_subject(folder: Path, affine: np.ndarray) -> None:
    """A (x, y, z) = (24, 20, 12) subject, zero outside a box, with three bright FLAIR blobs of 1, 8 and 27 voxels."""
    rng = np.random.default_rng(0)
    brain = np.zeros((24, 20, 12), bool)
    brain[2:22, 2:18, 1:11] = True
    flair = np.where(brain, 100 + rng.normal(0, 1, brain.shape), 0)
    for corner, size in (((4, 4, 3), 1), ((10, 10, 5), 2), ((16, 5, 6), 3)):
        flair[tuple(slice(c, c + size) for c in corner)] = 400
    folder.mkdir(parents=True)
    for name, data in (("t1", np.where(brain, 90 + rng.normal(0, 1, brain.shape), 0)),
                       ("t2", np.where(brain, 80 + rng.normal(0, 1, brain.shape), 0)), ("flair", flair)):
        nib.save(nib.Nifti1Image(data.astype(np.float32), affine), folder / f"{name}.nii.gz")


AFFINE = np.array([[-1.0, 0, 0, 30], [0, 1.5, 0, -20], [0, 0, 3.0, -10], [0, 0, 0, 1]])  # LAS, anisotropic


def run_predict_case(tmp_path: Path, **options) -> tuple[dict, Path]:
    write_subject(tmp_path / "data" / "s1", AFFINE)
    data = DataOptions(normalisation="foreground")
    (paths,) = data.find(tmp_path / "data", require_mask=False)
    out = tmp_path / "out"
    # predict's own parser, so that every option predict_case reads has its real default
    args = predict.build_parser().parse_args(["--checkpoint", "model.pt", "--data", str(tmp_path / "data"), "--out",
                                              str(out), "--probabilities", "--label-lesions", "--min-lesion-size", "0"])
    vars(args).update(options)
    row = predict.predict_case(FlairThreshold(), paths, out, (16, 16, 16), data, args, torch.device("cpu"))
    return row, out


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_lesion_table_and_maps_agree_with_the_mask_in_world_coordinates(tmp_path: Path) -> None:
    row, out = run_predict_case(tmp_path)
    mask = nib.load(out / "s1.nii.gz")
    labels = nib.load(out / "s1_lesions.nii.gz")
    probability = nib.load(out / "s1_prob.nii.gz")
    source = nib.load(tmp_path / "data" / "s1" / "flair.nii.gz")
    for image in (mask, labels, probability):  # the source grid, not the model's
        assert image.shape == source.shape and np.allclose(image.affine, source.affine)
    assert mask.get_data_dtype() == np.uint8 and labels.get_data_dtype() == np.uint16
    assert probability.get_data_dtype() == np.float32
    m, lab, p = (np.asanyarray(i.dataobj) for i in (mask, labels, probability))
    np.testing.assert_array_equal(p > 0.5, m == 1)  # thresholded probabilities are the mask
    np.testing.assert_array_equal(lab > 0, m == 1)
    rows = read_rows(out / "s1_lesions.csv")
    assert [int(r["label"]) for r in rows] == [1, 2, 3] and row["lesions"] == 3
    voxel_ml = 1.5 * 3.0 / 1000
    assert [float(r["volume_ml"]) for r in rows] == pytest.approx([27 * voxel_ml, 8 * voxel_ml, 1 * voxel_ml])
    for r in rows:  # each centroid is the world position of its component's voxel centroid
        ijk = np.argwhere(lab == int(r["label"])).mean(0)
        world = AFFINE @ np.append(ijk, 1.0)
        assert [float(r[f"centroid_{a}_mm"]) for a in "xyz"] == pytest.approx(world[:3], abs=0.01)
        assert float(r["max_probability"]) == pytest.approx(p[lab == int(r["label"])].max(), abs=1e-4)
    assert row["volume_ml"] == pytest.approx(36 * voxel_ml) and row["largest_ml"] == pytest.approx(27 * voxel_ml)
    assert row["mean_probability"] == pytest.approx(p[m == 1].mean(), abs=1e-4)


def test_min_lesion_size_removes_components_by_world_volume(tmp_path: Path) -> None:
    # One voxel is 4.5 mm^3: the 1-voxel lesion goes below 5 mm^3, the 8-voxel one (36 mm^3) stays until 37.
    row, out = run_predict_case(tmp_path, min_lesion_size=5.0)
    assert row["lesions"] == 2
    assert [float(r["volume_ml"]) for r in read_rows(out / "s1_lesions.csv")] == pytest.approx([0.1215, 0.036])
    mask = np.zeros((5, 5, 5), np.uint8)
    mask[0, 0, 0] = mask[2:4, 2:4, 2:4] = 1
    assert remove_small_lesions(mask, np.diag([2.0, 2.0, 2.0, 1.0]), 8.0).sum() == 8  # 8 mm^3 kept (>=)
    assert remove_small_lesions(mask, np.diag([2.0, 2.0, 2.0, 1.0]), 65.0).sum() == 0
    with pytest.raises(ValueError, match="min_mm3 must be >= 0"):
        remove_small_lesions(mask, np.eye(4), -1)


def test_label_lesions_26_connectivity_and_size_order() -> None:
    mask = np.zeros((6, 6, 6), np.uint8)
    mask[0, 0, 0] = mask[1, 1, 1] = 1  # diagonal neighbours: one lesion
    mask[4:6, 4:6, 4:6] = 1
    labels, count = label_lesions(mask)
    assert count == 2 and labels.dtype == np.uint16
    assert (labels == 1).sum() == 8 and (labels == 2).sum() == 2
    assert count == ndimage.label(mask, structure=CONNECTIVITY_26)[1]
    assert lesion_table(labels, 0, np.zeros(mask.shape), np.eye(4)) == []
    assert voxel_volume_mm3(AFFINE) == pytest.approx(4.5)


def test_mirroring_tta_and_the_foreground_crop() -> None:
    image = np.zeros((3, 20, 24, 28), np.float32)
    image[:, 3:17, 4:20, 5:22] = np.random.default_rng(0).normal(size=(3, 14, 16, 17))
    # A voxel-wise model is mirror-equivariant: TTA changes nothing; the crop changes nothing inside the box.
    plain = sliding_window_probabilities(FlairThreshold(), image, (16, 16, 16))
    probability, mask = segment(FlairThreshold(), image, (16, 16, 16), mirror=True)
    inside = (slice(3, 17), slice(4, 20), slice(5, 22))
    np.testing.assert_allclose(probability[inside], plain[1][inside].numpy(), atol=1e-6)
    assert not probability[0].any() and not mask[:3].any()  # outside the non-zero box: background
    np.testing.assert_array_equal(mask, probability > 0.5)
    # A model that looks at a neighbour is not: TTA averages the mirrored views.
    shifted = nn.Conv3d(3, 2, 3, padding=1, bias=False)
    with torch.no_grad():
        shifted.weight.zero_()
        shifted.weight[1, 2, 0, 1, 1] = 4.0
    a, _ = segment(shifted, image, (16, 16, 16))
    b, _ = segment(shifted, image, (16, 16, 16), mirror=True)
    assert np.abs(a - b).max() > 0.05


def test_attention_figure_reads_the_rsa_maps_around_the_largest_lesion(tmp_path: Path) -> None:
    from mslesion.data.reading import Case
    from mslesion.evaluation.figures import save_attention_figure
    from mslesion.inference.sliding_window import lesion_attention
    from mslesion.model.unet import build_model
    from sliceattn import RecurrentSliceAttention3d

    rng = np.random.default_rng(0)
    label = np.zeros((40, 48, 64), np.uint8)
    label[30:33, 10:14, 50:55] = 1  # the largest lesion, near a corner: the tile is shifted to stay inside
    label[5, 5, 5] = 1
    case = Case("c", rng.normal(size=(3, 40, 48, 64)).astype(np.float32), label, np.ones(label.shape, bool),
                (3.0, 1.0, 1.0), ("t1", "t2", "flair"))
    model = build_model("rsa-111", filters="tiny").eval()
    steps, box = lesion_attention(model, case, (16, 32, 32))
    block = next(m for m in model.modules() if isinstance(m, RecurrentSliceAttention3d))
    assert [s.axis for s in steps] == list(block.order) and not block.save_attention
    assert [s.dim for s in steps] == list(block.dims)
    assert box == (slice(23, 39), slice(0, 32), slice(32, 64))  # centred on d = 31, shifted inside in h and w
    for step in steps:
        assert step.weights.sum() == pytest.approx(1.0, abs=1e-5) and 0 <= step.lesion_slice < step.weights.size
    # encoder block of the second-bottom level: (16, 32, 32) / 8 -> (2, 4, 4) slices of 24, 8, 8 mm
    assert {s.axis: s.mm_per_slice for s in steps} == {"axial": 24.0, "coronal": 8.0, "sagittal": 8.0}
    path = save_attention_figure(tmp_path / "a.png", case.image[2][box], label[box], steps, title="c")
    assert path.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="needs a model with an RSA block"):
        lesion_attention(build_model("unet", filters="tiny"), case, (16, 32, 32))


def test_inference_keeps_the_callers_save_attention() -> None:
    # lesion_attention switches the maps on for its one forward pass, then restores what the caller had.
    from mslesion.data.reading import Case
    from mslesion.inference.sliding_window import lesion_attention
    from mslesion.model.unet import build_model

    label = np.zeros((16, 32, 32), np.uint8)
    label[8, 10:12, 10:12] = 1
    case = Case("c", np.random.default_rng(0).normal(size=(3, 16, 32, 32)).astype(np.float32), label,
                np.ones(label.shape, bool), (3.0, 1.0, 1.0), ("t1", "t2", "flair"))
    model = build_model("rsa-010", filters="tiny").eval()
    for keep in (True, False):
        model.bottom_attention.save_attention = keep
        lesion_attention(model, case, (16, 32, 32))
        segment(model, case.image, (16, 32, 32))
        assert model.bottom_attention.save_attention is keep
    model.bottom_attention.save_attention = True
    segment(model, case.image, (16, 32, 32))
    assert len(model.bottom_attention.attention_maps) == 3  # the caller's maps: the last tile's


# ------------------------------------------------------------------------------------------ presets, runtime


def configured(argv: list[str]) -> tuple[TrainingConfig, str]:
    return train.make_config(train.build_parser().parse_args(argv))


@pytest.mark.parametrize("preset", ["paper", "cpu", "demo"])
def test_presets_apply_and_explicit_flags_override(preset: str, tmp_path: Path) -> None:
    config, why = configured(["--data", str(tmp_path), "--preset", preset, "--device", "cpu"])
    assert why == "--preset" and config.preset == preset
    for key, value in PRESETS[preset].items():
        expected = FILTER_PRESETS[value] if key == "filters" else value
        assert getattr(config, key) == expected, key
    config, _ = configured(["--data", str(tmp_path), "--preset", preset, "--iterations", "7", "--crop", "16", "16",
                            "16", "--lr-schedule", "constant"])
    assert (config.iterations, config.crop, config.lr_schedule) == (7, (16, 16, 16), "constant")
    assert config.batch_size == PRESETS[preset]["batch_size"]


def test_default_preset_follows_data_and_device(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert configured([])[0].preset == "demo"
    config, why = configured(["--data", str(tmp_path), "--device", "cpu"])
    assert config.preset == "cpu" and "--data on the CPU" in why and config.filters == FILTER_PRESETS["half"]
    assert cli.choose_preset(None, True, "cuda")[0] == "paper"
    with pytest.raises(SystemExit):
        train.build_parser().parse_args(["--help"])
    text = capsys.readouterr().out
    for name in PRESETS:
        assert f"\n  {name} " in text  # the preset table of --help


@pytest.mark.parametrize(("attention_decay", "survives"), [(0.0, True), (1e-5, False)])
def test_attention_blocks_are_not_decayed_to_nothing_while_they_are_the_identity(attention_decay: float,
                                                                                 survives: bool) -> None:
    # While alpha = 0 the projections get no gradient; Adam's L2 decay alone then moves them by ~lr per step.
    from mslesion.model.unet import build_model

    torch.manual_seed(0)
    network = build_model("rsa-010", filters="tiny")
    block = network.bottom_attention
    start = block.projection.weight.detach().abs().mean().item()
    optimizer = torch.optim.Adam(training.parameter_groups(network, 1e-5, attention_decay), lr=1e-3)
    image, label = torch.randn(1, 3, 16, 32, 32), torch.randint(0, 2, (1, 16, 32, 32))
    for _ in range(40):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(network(image), label).backward()
        optimizer.step()
    end = block.projection.weight.detach().abs().mean().item()
    decays = [group["weight_decay"] for group in optimizer.param_groups]
    assert decays == [1e-5, attention_decay] and len(optimizer.param_groups[1]["params"]) == 3
    assert (end > 0.9 * start) is survives, (start, end)


def test_poly_learning_rate_decays_to_zero_and_constant_stays(tmp_path: Path) -> None:
    config, _ = configured(["--data", str(tmp_path), "--lr", "1e-3", "--iterations", "100", "--lr-schedule", "poly"])
    assert config.learning_rate(1) == pytest.approx(1e-3)
    assert config.learning_rate(51) == pytest.approx(1e-3 * 0.5**0.9)
    assert 0 < config.learning_rate(100) < 2e-5
    constant = dataclasses.replace(config, lr_schedule="constant")
    assert constant.learning_rate(100) == 1e-3


def test_threads_default_to_the_affinity_mask_and_a_busy_machine_warns(monkeypatch: pytest.MonkeyPatch,
                                                                       capsys: pytest.CaptureFixture) -> None:
    before = torch.get_num_threads()
    try:
        monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        assert runtime.configure_runtime(None, False) == runtime.usable_cores() == torch.get_num_threads()
        assert capsys.readouterr().err == ""
        monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the user's choice is kept
        assert runtime.configure_runtime(None, False) == 1 == torch.get_num_threads()
        monkeypatch.setattr(os, "getloadavg", lambda: (runtime.usable_cores() + 3.0, 0.0, 0.0))
        assert runtime.configure_runtime(1, False) == 1 == torch.get_num_threads()
        assert "warning: the load average is" in capsys.readouterr().err
    finally:
        torch.set_num_threads(before)


@pytest.mark.skipif(not Path("/lib/x86_64-linux-gnu/libc.so.6").exists() and not Path("/lib64/libc.so.6").exists(),
                    reason="glibc only")
def test_allocator_tuning_applies_on_glibc_and_respects_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert runtime.tune_allocator() is True
    monkeypatch.setenv("MALLOC_MMAP_MAX_", "65536")
    assert runtime.tune_allocator() is False


@pytest.mark.slow
def test_mni_preset_is_the_1mm_grid_and_skull_stripped() -> None:
    from mslesion.synthetic.cohort import generate_case

    case = generate_case(0, preset="mni", seed=0)
    assert case.label.shape == (182, 218, 182) and case.spacing == (1.0, 1.0, 1.0)
    for image in case.images.values():
        assert not image[case.brain_mask == 0].any() and image[case.brain_mask > 0].mean() > 100
