"""Tests of the synthetic MS cohort (examples/ms_lesion/synthetic.py and make_cohort.py)."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage

from mslesion import make_cohort as cli
from mslesion.data.sampling import mean_lesion_fraction
from mslesion.data.reading import load_dataset
from mslesion.synthetic.cohort import CATEGORIES, COHORT_PRESETS as PRESETS, MIMICS, MODALITIES, draw_appearance, generate_case, make_cohort

SMALL = PRESETS["small"]


@pytest.fixture(scope="module")
def phantom_cases():
    return [generate_case(i, preset="small", seed=0, anatomy="phantom") for i in range(6)]


def test_small_case_shape_speed_and_lesions(phantom_cases):
    generate_case(0, preset="small", anatomy="phantom")  # anatomy cached
    start = time.perf_counter()
    case = generate_case(7, preset="small", anatomy="phantom")
    assert time.perf_counter() - start < 1.0
    for case in phantom_cases:
        assert case.label.shape == (20, 56, 48) and case.spacing == SMALL.spacing
        assert set(case.images) == {"t1", "t2", "flair"}
        assert all(v.dtype == np.int16 and v.shape == case.label.shape for v in case.images.values())
        # Every case has visible lesions, however small the grid.
        assert case.label.sum() >= SMALL.min_lesion_voxels


def test_deterministic_per_seed_and_subject():
    a = generate_case(2, preset="small", seed=5, anatomy="phantom")
    b = generate_case(2, preset="small", seed=5, anatomy="phantom")
    for name in a.images:
        np.testing.assert_array_equal(a.images[name], b.images[name])
    np.testing.assert_array_equal(a.label, b.label)
    c = generate_case(2, preset="small", seed=6, anatomy="phantom")
    d = generate_case(3, preset="small", seed=5, anatomy="phantom")
    assert not np.array_equal(a.images["flair"], c.images["flair"])
    assert not np.array_equal(a.images["flair"], d.images["flair"])


def tissue_medians(case) -> dict[str, dict[str, float]]:
    """Median intensity per modality of voxels that are (nearly) pure wm, gm, csf or lesion."""
    out = {}
    for tissue in ("wm", "gm", "csf", "lesion"):
        pure = case.tissue[tissue] > (0.85 if tissue != "gm" else 0.7)
        out[tissue] = {m: float(np.median(v[pure])) for m, v in case.images.items()}
    return out


def check_cohort_statistics(cases, fraction_bounds) -> None:
    fractions = [c.label.mean() for c in cases]
    assert fraction_bounds[0] < np.mean(fractions) < fraction_bounds[1]
    for case in cases:
        lesion = case.label > 0
        # Lesions lie in the brain, in parenchyma (not in CSF or outside).
        assert case.brain_mask[lesion].mean() > 0.98
        assert np.median((case.tissue["wm"] + case.tissue["gm"])[lesion]) > 0.6
        medians = tissue_medians(case)
        wm, gm, csf, les = (medians[t] for t in ("wm", "gm", "csf", "lesion"))
        assert csf["t1"] < gm["t1"] < wm["t1"]          # T1: CSF dark, WM bright
        assert wm["t2"] < gm["t2"] < csf["t2"]          # T2: CSF bright
        assert csf["flair"] < wm["flair"] < gm["flair"]  # FLAIR: CSF suppressed, GM 1.23 x WM
        assert les["t1"] < wm["t1"] and les["t2"] > wm["t2"] and les["flair"] > wm["flair"]
    visible = [item for case in cases for item in case.lesions if item.voxels > 0]
    share = {c: np.mean([item.category == c for item in visible]) for c in CATEGORIES}
    assert 0.3 < share["periventricular"] < 0.75  # about half, by design
    assert share["deep"] + share["juxtacortical"] > 0.15
    # Periventricular lesions touch CSF (within 2 voxels); deep white-matter lesions mostly do not.
    touching: dict[str, list[bool]] = {"periventricular": [], "deep": []}
    for case in cases:
        csf = ndimage.binary_dilation(case.tissue["csf"] > 0.5, iterations=2)
        for index, item in enumerate(case.lesions):
            if item.category in touching and item.voxels:
                touching[item.category].append(_touches(case, index, csf))
    assert np.mean(touching["periventricular"]) > 0.6
    assert np.mean(touching["deep"]) < 0.35


def test_phantom_statistics(phantom_cases):
    # The small preset doubles lesion volumes: mean fraction about 1e-3 over 43 subjects (docs/ms_lesion.md).
    check_cohort_statistics(phantom_cases, (3e-4, 4e-3))


def test_mni152_statistics():
    pytest.importorskip("nilearn")
    check_cohort_statistics([generate_case(i, preset="small", seed=1, anatomy="mni152") for i in range(5)], (3e-4, 4e-3))


def _touches(case, index, region) -> bool:
    """Whether the label voxels nearest to lesion ``index``'s centre overlap ``region``."""
    item = case.lesions[index]
    zyx = (item.centre[::-1] - case.affine[:3, 3][::-1]) / np.array(case.spacing)
    voxels = np.argwhere(case.label > 0)
    close = voxels[np.linalg.norm((voxels - zyx) * case.spacing, axis=1) <= item.radii.max() + 3]
    return bool(region[tuple(close.T)].any()) if close.size else False


def test_make_cohort_writes_loads_caches_and_montage(tmp_path, capsys):
    out = tmp_path / "cohort"
    assert cli.main(["--out", str(out), "--small", "--subjects", "2", "--anatomy", "phantom", "--seed", "3"]) == 0
    printed = capsys.readouterr().out
    assert f"cohort: {out}" in printed and f"montage: {out / 'montage.png'}" in printed
    assert (out / "montage.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    record = json.loads((out / "cohort.json").read_text())
    assert record["params"] == {"version": 1, "preset": "small", "seed": 3, "anatomy": "phantom", "subjects": 2,
                                "layout": "subject-folders", "randomise": False}
    assert "appearance" not in record["stats"]["sub-001"]
    assert set(record["stats"]) == {"sub-001", "sub-002"}

    # The loader reads it like real data; the written files match the in-memory generator.
    cases = load_dataset(out)
    assert [c.id for c in cases] == ["sub-001", "sub-002"]
    expected = generate_case(0, preset="small", seed=3, anatomy="phantom")
    np.testing.assert_array_equal(cases[0].label, expected.label)
    assert cases[0].spacing == SMALL.spacing and cases[0].image.shape == (3, 20, 56, 48)
    assert mean_lesion_fraction(cases) == pytest.approx(np.mean([s["lesion_fraction"] for s in record["stats"].values()]))

    # Cached: same parameters, nothing rewritten.
    stamp = (out / "sub-001" / "flair.nii.gz").stat().st_mtime_ns
    make_cohort(out, subjects=2, preset="small", seed=3, anatomy="phantom")
    assert (out / "sub-001" / "flair.nii.gz").stat().st_mtime_ns == stamp
    # Different parameters: the old cohort is replaced (no leftover subject), a user's file is kept.
    (out / "sub-002" / "notes.txt").write_text("mine")
    make_cohort(out, subjects=1, preset="small", seed=4, anatomy="phantom", montage=False)
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["sub-001", "sub-002"]
    assert [p.name for p in (out / "sub-002").iterdir()] == ["notes.txt"]
    assert json.loads((out / "cohort.json").read_text())["params"]["seed"] == 4


def test_a_write_that_fails_midway_leaves_no_half_cohort_file(tmp_path, monkeypatch):
    # Every file goes through save_atomically: a kill while writing leaves the old file or none, never a part.
    from pathlib import Path

    from matplotlib.figure import Figure
    from mslesion.synthetic import cohort

    def half_then_killed(path: Path) -> None:
        Path(path).write_bytes(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(cohort.nib, "save", lambda image, path: half_then_killed(path))
    with pytest.raises(KeyboardInterrupt):
        make_cohort(tmp_path / "nifti", subjects=1, preset="small", seed=0, montage=False)
    assert not [p for p in (tmp_path / "nifti").rglob("*") if p.is_file()]
    monkeypatch.undo()
    monkeypatch.setattr(Figure, "savefig", lambda figure, path, **options: half_then_killed(path))
    with pytest.raises(KeyboardInterrupt):
        make_cohort(tmp_path / "montage", subjects=1, preset="small", seed=0, montage=True)
    assert (tmp_path / "montage" / "sub-001" / "flair.nii.gz").is_file()
    assert not (tmp_path / "montage" / "montage.png").exists() and not (tmp_path / "montage" / "cohort.json").exists()


def test_make_cohort_refuses_a_folder_it_did_not_write(tmp_path, capsys):
    (tmp_path / "scans" / "patient01").mkdir(parents=True)
    (tmp_path / "scans" / "patient01" / "flair.nii.gz").write_bytes(b"a user's scan")
    assert cli.main(["--out", str(tmp_path / "scans"), "--small", "--subjects", "1", "--anatomy", "phantom"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "holds no cohort.json written by make_cohort" in err
    assert len(err.strip().splitlines()) == 1
    assert (tmp_path / "scans" / "patient01" / "flair.nii.gz").read_bytes() == b"a user's scan"
    assert sorted(p.name for p in (tmp_path / "scans").iterdir()) == ["patient01"]


def test_make_cohort_nnunet_layout_is_read_back_as_nnunet(tmp_path):
    out = make_cohort(tmp_path / "Dataset501_SynthMS", subjects=2, preset="small", seed=0, anatomy="phantom",
                      montage=False, layout="nnunet")
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "FLAIR", "1": "T1", "2": "T2"} and meta["numTraining"] == 2
    assert sorted(p.name for p in (out / "imagesTr").iterdir())[:3] == [
        "sub-001_0000.nii.gz", "sub-001_0001.nii.gz", "sub-001_0002.nii.gz"]
    cases = load_dataset(out)  # auto layout: nnU-Net
    expected = load_dataset(make_cohort(tmp_path / "folders", subjects=2, preset="small", seed=0, anatomy="phantom",
                                        montage=False), normalisation="foreground")
    np.testing.assert_array_equal(cases[1].label, expected[1].label)
    np.testing.assert_allclose(cases[1].image, expected[1].image)


def test_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="preset must be one of"):
        generate_case(0, preset="huge")
    with pytest.raises(ValueError, match="anatomy must be one of"):
        make_cohort(tmp_path, subjects=1, preset="small", anatomy="colin27")
    with pytest.raises(ValueError, match="layout must be one of"):
        make_cohort(tmp_path, subjects=1, preset="small", layout="bids")
    with pytest.raises(ValueError, match="subjects must be a positive int, got 0"):
        make_cohort(tmp_path, subjects=0)
    with pytest.raises(SystemExit):
        cli.parse_args(["--out", str(tmp_path), "--subjects", "0"])


@pytest.fixture(scope="module")
def randomised_cases():
    return [generate_case(i, preset="small", seed=0, anatomy="phantom", randomise=True) for i in range(6)]


def test_presets_randomise_where_documented():
    assert {name for name, preset in PRESETS.items() if preset.randomise} == {"demo", "mni"}
    assert generate_case(0, preset="small", anatomy="phantom").appearance is None


def test_randomised_appearance_is_seeded_and_keeps_the_anatomy(randomised_cases):
    again = generate_case(1, preset="small", seed=0, anatomy="phantom", randomise=True)
    for name in MODALITIES:
        np.testing.assert_array_equal(again.images[name], randomised_cases[1].images[name])
    np.testing.assert_array_equal(again.label, randomised_cases[1].label)
    assert again.appearance == randomised_cases[1].appearance
    other_seed = generate_case(1, preset="small", seed=1, anatomy="phantom", randomise=True)
    assert other_seed.appearance != again.appearance
    # The appearance has its own stream: the anatomy (brain mask of an unstripped preset) is the fixed one's.
    fixed = generate_case(1, preset="small", seed=0, anatomy="phantom", randomise=False)
    np.testing.assert_array_equal(fixed.brain_mask, again.brain_mask)
    assert not np.array_equal(fixed.images["flair"], again.images["flair"])


def test_randomised_contrasts_differ_between_subjects_and_modalities(randomised_cases):
    # Grey matter / white matter on each image, measured: spread across subjects, unlike the fixed cohort.
    ratios = np.array([[tissue_medians(c)["gm"][m] / tissue_medians(c)["wm"][m] for m in MODALITIES]
                       for c in randomised_cases])
    assert (ratios.max(0) - ratios.min(0) > 0.1).all(), ratios
    gains = np.array([c.appearance.gain for c in randomised_cases])
    assert len({round(float(g), 6) for g in gains.ravel()}) == gains.size  # per subject and per modality
    # What stays true of MS imaging whatever the draw: CSF dark on T1 and FLAIR, bright on T2; lesions bright on
    # FLAIR and T2, dark on T1.
    for case in randomised_cases:
        medians = tissue_medians(case)
        wm, csf, les = medians["wm"], medians["csf"], medians["lesion"]
        assert csf["t1"] < wm["t1"] and csf["flair"] < wm["flair"] and csf["t2"] > wm["t2"]
        assert les["flair"] > wm["flair"] and les["t2"] > wm["t2"] and les["t1"] < wm["t1"]


def test_hard_negatives_are_bright_and_never_labelled(randomised_cases):
    bright = 0
    for case in randomised_cases:
        assert set(np.unique(case.label)) <= {0, 1} and case.label.dtype == np.uint8
        assert case.label.shape == case.brain_mask.shape == case.images["flair"].shape
        assert not case.label[case.brain_mask == 0].any()
        mimic = (case.tissue["mimic"] >= 0.5) & (case.tissue["lesion"] < 0.5)
        assert not case.label[mimic].any()
        visible = {kind for kind in MIMICS for item in case.mimics if item.category == kind and item.voxels}
        assert visible <= set(MIMICS)
        wm = (case.tissue["wm"] > 0.85) & ~mimic & (case.label == 0)
        bright += int((case.images["flair"][mimic] > np.median(case.images["flair"][wm])).sum())
    assert bright > 20  # mimics show up, brighter than white matter, across the cohort


def test_randomised_lesions_keep_their_placement(randomised_cases):
    visible = [item for case in randomised_cases for item in case.lesions if item.voxels > 0]
    share = np.mean([item.category == "periventricular" for item in visible])
    assert 0.3 < share < 0.85  # confluent lesions add periventricular ovoids
    assert all(case.label.sum() >= SMALL.min_lesion_voxels for case in randomised_cases)


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_drawn_appearances_stay_ms_like(seed):
    look = draw_appearance(np.random.default_rng(seed))
    t1, t2, flair = (dict(zip(look.contrast, values)) for values in zip(*look.contrast.values()))
    assert t1["csf"] < t1["gm"] < t1["wm"] == 1.0
    assert t2["wm"] < t2["gm"] < t2["csf"]
    assert flair["csf"] < flair["wm"] < flair["gm"]
    assert look.lesion_ratio["flair"][0] > 1 and look.lesion_ratio["flair"][2] > 1  # lesions: FLAIR-bright
    assert look.lesion_ratio["t1"][0] < 1 < look.lesion_ratio["t2"][0]
    assert 99.0 <= look.winsor <= 100.0 and look.ghost_axis in (1, 2)
    assert set(look.mimics) == set(MIMICS) and min(look.mimics.values()) >= 0


def test_make_cohort_records_randomise_and_the_appearance(tmp_path, capsys):
    out = tmp_path / "cohort"
    assert cli.main(["--out", str(out), "--small", "--subjects", "1", "--anatomy", "phantom", "--randomise",
                     "--no-montage"]) == 0
    assert "randomised appearance" in capsys.readouterr().out
    record = json.loads((out / "cohort.json").read_text())
    assert record["params"]["randomise"] is True
    stats = record["stats"]["sub-001"]
    expected = generate_case(0, preset="small", seed=0, anatomy="phantom", randomise=True)
    assert stats["appearance"]["gain"] == list(expected.appearance.gain)
    assert set(stats["mimics_visible"]) == set(MIMICS)
    np.testing.assert_array_equal(load_dataset(out)[0].label, expected.label)
    # Switching the randomisation off is a different cohort: it replaces this one.
    make_cohort(out, subjects=1, preset="small", seed=0, anatomy="phantom", montage=False, randomise=False)
    assert json.loads((out / "cohort.json").read_text())["params"]["randomise"] is False
    with pytest.raises(TypeError, match="randomise must be a bool or None, got 'yes'"):
        make_cohort(out, subjects=1, preset="small", randomise="yes")


def test_make_cohort_refuses_an_out_that_is_a_file(tmp_path, capsys):
    target = tmp_path / "cohort.nii.gz"
    target.write_bytes(b"a user's file")
    for out in (target, target / "inside"):
        assert cli.main(["--out", str(out), "--small", "--subjects", "1", "--anatomy", "phantom"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and f"{target} is a file, not a folder" in err
        assert len(err.strip().splitlines()) == 1
    assert target.read_bytes() == b"a user's file"


@pytest.mark.slow
def test_mni_preset_randomised_case_is_stripped_and_aligned():
    case = generate_case(0, preset="mni", seed=0)
    assert case.appearance is not None and case.label.shape == (182, 218, 182)
    assert not case.label[case.brain_mask == 0].any()
    for image in case.images.values():
        assert not image[case.brain_mask == 0].any()


@pytest.mark.slow
def test_paper_preset_case():
    case = generate_case(0, preset="paper", seed=0)
    depth, height, width = case.label.shape
    assert 44 <= depth <= 60 and height == 320 and 230 <= width <= 260
    assert case.spacing == (3.0, 0.7, 0.7)
    assert 5e-5 < case.label.mean() < 3e-3
