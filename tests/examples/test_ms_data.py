"""Tests of examples/ms_lesion/data.py on small NIfTI volumes written here, in each supported layout."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from mslesion.data.sampling import mean_lesion_fraction, sample_crop
from mslesion.data.reading import Case, CasePaths, DataError, find_cases, load_case, load_dataset

# RAS volume (x, y, z) with 1 x 1 x 3 mm voxels: axial acquisition, model layout (z, y, x).
SHAPE = (12, 10, 6)
SPACING = (1.0, 1.0, 3.0)


def ras_affine(spacing=SPACING, origin=(-5.0, -4.0, -7.0)) -> np.ndarray:
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = origin
    return affine


def save(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data), affine), path)
    return path


def volumes(seed: int = 0) -> dict[str, np.ndarray]:
    """Distinct modalities (t1 around 100, t2 around 200, flair around 300), a brain and one lesion."""
    rng = np.random.default_rng(seed)
    brain = np.zeros(SHAPE, bool)
    brain[2:10, 2:8, 1:5] = True
    out = {
        name: np.where(brain, level + rng.normal(0, 10, SHAPE), 0).astype(np.float32)
        for name, level in (("t1", 100), ("t2", 200), ("flair", 300))
    }
    mask = np.zeros(SHAPE, np.uint8)
    mask[5, 4, 2] = mask[5, 5, 2] = 1
    out["mask"] = mask
    out["brain_mask"] = brain.astype(np.uint8)
    return out


def write_subject(folder: Path, names: dict[str, str], affine=None, data=None) -> dict[str, Path]:
    """Write ``role -> file name`` into ``folder``; returns role -> path."""
    data = data or volumes()
    affine = ras_affine() if affine is None else affine
    return {role: save(folder / name, data[role], affine) for role, name in names.items()}


STANDARD = {"t1": "t1.nii.gz", "t2": "t2.nii.gz", "flair": "flair.nii.gz", "mask": "mask.nii.gz"}


def case_paths(files: dict[str, Path]) -> CasePaths:
    return CasePaths("case", {m: files[m] for m in ("t1", "t2", "flair")}, files.get("mask"), files.get("brain_mask"))


# ------------------------------------------------------------------------------------------ finding files


def touch(folder: Path, *names: str) -> None:
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"x")


def test_subject_folder_default_patterns_cover_public_datasets(tmp_path):
    # Lesjak 2017 style, MSLesSeg style (timepoint T1 in every name), ISBI-2015 style (sub-folders, MPRAGE),
    # and distractors: T2*, T1 with gadolinium, proton density, a non-NIfTI file.
    touch(tmp_path / "patient01", "patient01_T1W.nii.gz", "patient01_T2W.nii.gz", "patient01_FLAIR.nii.gz",
          "patient01_consensus_gt.nii.gz", "patient01_brainmask.nii.gz", "notes.txt")
    touch(tmp_path / "P1", "P1_T1_T1.nii.gz", "P1_T1_T2.nii.gz", "P1_T1_FLAIR.nii.gz", "P1_T1_MASK.nii.gz")
    touch(tmp_path / "training01", "preprocessed/training01_01_mprage_pp.nii", "preprocessed/training01_01_t2_pp.nii",
          "preprocessed/training01_01_flair_pp.nii", "preprocessed/training01_01_pd_pp.nii",
          "masks/training01_01_mask1.nii", "T2star.nii.gz", "T1_gado.nii.gz", "skull_strip_brain_mask.nii.gz")
    cases = {c.id: c for c in find_cases(tmp_path)}
    assert sorted(cases) == ["P1", "patient01", "training01"]
    names = {cid: {role: p.name for role, p in c.images.items()} for cid, c in cases.items()}
    assert names["patient01"] == {"t1": "patient01_T1W.nii.gz", "t2": "patient01_T2W.nii.gz",
                                  "flair": "patient01_FLAIR.nii.gz"}
    assert names["P1"] == {"t1": "P1_T1_T1.nii.gz", "t2": "P1_T1_T2.nii.gz", "flair": "P1_T1_FLAIR.nii.gz"}
    assert names["training01"] == {"t1": "training01_01_mprage_pp.nii", "t2": "training01_01_t2_pp.nii",
                                   "flair": "training01_01_flair_pp.nii"}
    assert cases["patient01"].mask.name == "patient01_consensus_gt.nii.gz"
    assert cases["patient01"].brain_mask.name == "patient01_brainmask.nii.gz"
    assert cases["P1"].mask.name == "P1_T1_MASK.nii.gz" and cases["P1"].brain_mask is None
    assert cases["training01"].mask.name == "training01_01_mask1.nii"
    assert cases["training01"].brain_mask.name == "skull_strip_brain_mask.nii.gz"


def test_subject_folder_ambiguous_and_missing_files(tmp_path):
    touch(tmp_path / "s1", "t1.nii.gz", "t2.nii.gz", "flair.nii.gz", "raw/flair.nii.gz", "gt.nii.gz")
    with pytest.raises(DataError, match=r"2 files could be the flair image .*raw/flair.nii.gz.*--pattern 'flair=raw/"):
        find_cases(tmp_path)
    # A pattern with "/" matches the path inside the subject folder.
    (case,) = find_cases(tmp_path, patterns={"flair": "raw/*flair*"})
    assert case.images["flair"].parent.name == "raw"

    (tmp_path / "s1" / "raw" / "flair.nii.gz").unlink()
    touch(tmp_path / "s2", "t1.nii.gz", "flair.nii.gz", "gt.nii.gz")
    with pytest.raises(DataError, match=r"s2: no file for \['t2'\]"):
        find_cases(tmp_path)
    # Collecting errors instead: the good subject is kept, the bad one reported by id.
    errors: dict = {}
    assert [c.id for c in find_cases(tmp_path, errors=errors)] == ["s1"]
    assert list(errors) == ["s2"] and "no file for ['t2']" in str(errors["s2"])
    # Declaring t2 absent makes the channels follow.
    cases = find_cases(tmp_path, modalities=("flair", "t1"))
    assert [list(c.images) for c in cases] == [["flair", "t1"]] * 2


def test_missing_mask_is_an_error_unless_not_required(tmp_path):
    touch(tmp_path / "s1", "t1.nii.gz", "t2.nii.gz", "flair.nii.gz")
    with pytest.raises(DataError, match=r"s1: no file for \['mask'\]"):
        find_cases(tmp_path)
    (case,) = find_cases(tmp_path, require_mask=False)
    assert case.mask is None


def test_find_cases_argument_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        find_cases(tmp_path / "nowhere")
    with pytest.raises(DataError, match="no cases found"):
        find_cases(tmp_path)
    with pytest.raises(ValueError, match="layout must be one of"):
        find_cases(tmp_path, layout="bids")
    with pytest.raises(ValueError, match=r"modalities \['pd'\] have no built-in rule.*--pattern pd=GLOB"):
        find_cases(tmp_path, modalities=("t1", "pd"))
    with pytest.raises(ValueError, match="--pattern role 'lesions' is neither a modality"):
        find_cases(tmp_path, patterns={"lesions": "*x*"})


def write_nnunet(root: Path, channels: dict[str, str], key: str = "channel_names") -> None:
    data = volumes()
    (root / "dataset.json").parent.mkdir(parents=True, exist_ok=True)
    (root / "dataset.json").write_text(json.dumps({key: channels, "labels": {"background": 0, "lesion": 1},
                                                   "file_ending": ".nii.gz"}))
    for case in ("ms_002", "ms_001"):
        for index, name in channels.items():
            save(root / "imagesTr" / f"{case}_{int(index):04d}.nii.gz", data[name.lower()], ras_affine())
        save(root / "labelsTr" / f"{case}.nii.gz", data["mask"], ras_affine())


@pytest.mark.parametrize("key", ["channel_names", "modality"])  # nnU-Net v2, Medical Segmentation Decathlon
def test_nnunet_layout_channel_order_from_dataset_json(tmp_path, key):
    write_nnunet(tmp_path, {"0": "FLAIR", "1": "T1", "2": "T2"}, key)
    cases = find_cases(tmp_path)
    assert [c.id for c in cases] == ["ms_001", "ms_002"]
    assert cases[0].images["flair"].name == "ms_001_0000.nii.gz"
    assert cases[0].images["t1"].name == "ms_001_0001.nii.gz"
    assert cases[0].mask.name == "ms_001.nii.gz"
    # Channels follow the requested order, whatever the file order: check by the raw intensity levels.
    loaded = load_dataset(tmp_path, modalities=("t2", "flair"))
    assert loaded[0].modalities == ("t2", "flair") and loaded[0].image.shape[0] == 2
    raw = [loaded[0].to_original(loaded[0].image[c]) for c in range(2)]
    for img, name in zip(raw, ("t2", "flair")):
        expected = volumes()[name]
        corr = np.corrcoef(np.asarray(img.dataobj).ravel(), expected.ravel())[0, 1]
        assert corr > 0.999


def test_nnunet_layout_errors(tmp_path):
    write_nnunet(tmp_path, {"0": "FLAIR", "1": "T1"})
    with pytest.raises(DataError, match=r"dataset.json: modality 't2' .* matches no channel names"):
        find_cases(tmp_path)
    (tmp_path / "labelsTr" / "ms_001.nii.gz").unlink()
    with pytest.raises(DataError, match=r"ms_001.*label file .*labelsTr/ms_001.nii.gz is missing"):
        find_cases(tmp_path, modalities=("flair", "t1"))
    (tmp_path / "imagesTr" / "ms_002_0001.nii.gz").unlink()
    with pytest.raises(DataError, match=r"t1 file .*ms_002_0001.nii.gz is missing"):
        find_cases(tmp_path, modalities=("flair", "t1"), require_mask=False)
    (tmp_path / "dataset.json").write_text("{not json")
    with pytest.raises(DataError, match="cannot read .*dataset.json"):
        find_cases(tmp_path, layout="nnunet")


# ------------------------------------------------------------------------------------------ orientation


def reorient(data: np.ndarray, codes: str, perm: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Store RAS ``data`` with axes permuted by ``perm`` and flipped to ``codes``; returns (array, affine)."""
    affine = ras_affine()
    stored = np.transpose(data, perm)
    permuted = np.eye(4)
    permuted[:3, :3] = np.eye(3)[:, perm]  # stored voxel axis k is RAS axis perm[k]
    affine = affine @ permuted
    for k, code in enumerate(codes):
        if code in "LPI":  # flip stored axis k: world unchanged, index reversed
            flip = np.eye(4)
            flip[k, k] = -1
            flip[k, 3] = stored.shape[k] - 1
            stored = np.flip(stored, k)
            affine = affine @ flip
    return np.ascontiguousarray(stored), affine


@pytest.mark.parametrize("codes,perm", [("LPS", (0, 1, 2)), ("SLP", (2, 0, 1)), ("RAS", (0, 1, 2)), ("PIL", (1, 2, 0))])
def test_non_ras_round_trip(tmp_path, codes, perm):
    data = volumes()
    stored = {}
    for role in ("t1", "t2", "flair", "mask", "brain_mask"):
        stored[role], affine = reorient(data[role], codes, perm)
    assert "".join(nib.aff2axcodes(affine)) == codes
    files = write_subject(tmp_path, {r: f"{r}.nii.gz" for r in stored}, affine, stored)
    case = load_case(case_paths(files))
    # Model layout: (z, y, x) of the RAS volume, whatever the storage order.
    assert case.spacing == (3.0, 1.0, 1.0)
    np.testing.assert_array_equal(case.label, np.transpose(data["mask"], (2, 1, 0)))
    np.testing.assert_array_equal(case.brain_mask, np.transpose(data["brain_mask"], (2, 1, 0)) > 0)
    # to_original is the exact inverse: same array, affine and dtype as the stored file.
    back = case.to_original(case.label)
    assert back.shape == stored["mask"].shape and back.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asarray(back.dataobj), stored["mask"])
    np.testing.assert_allclose(back.affine, affine)
    saved = save(tmp_path / "pred.nii.gz", np.zeros(1), np.eye(4))
    nib.save(back, saved)
    np.testing.assert_array_equal(np.asarray(nib.load(saved).dataobj), stored["mask"])


@pytest.mark.parametrize(
    "spacing,order",
    [((3.0, 1.0, 1.0), (0, 2, 1)),   # sagittal acquisition: D = x, then (z, y)
     ((1.0, 2.5, 1.0), (1, 2, 0)),   # coronal acquisition: D = y, then (z, x)
     ((1.0, 1.0, 1.0), (2, 1, 0))],  # isotropic: the tie goes to z, the axial layout
)
def test_through_plane_axis_is_the_largest_spacing(tmp_path, spacing, order):
    data = volumes()
    affine = ras_affine(spacing=spacing)
    files = write_subject(tmp_path, {**{r: f"{r}.nii.gz" for r in STANDARD}}, affine, data)
    case = load_case(case_paths(files))
    assert case.spacing == tuple(spacing[a] for a in order)
    np.testing.assert_array_equal(case.label, np.transpose(data["mask"], order))
    np.testing.assert_array_equal(np.asarray(case.to_original(case.label).dataobj), data["mask"])


def test_in_memory_case_to_original_assumes_ras():
    label = np.zeros((2, 3, 4), np.uint8)
    case = Case("c", np.zeros((1, 2, 3, 4), np.float32), label, label > 0, (3.0, 1.0, 0.5), ("t1",))
    img = case.to_original(label)
    assert img.shape == (4, 3, 2)
    np.testing.assert_allclose(np.diag(img.affine), [0.5, 1.0, 3.0, 1.0])
    with pytest.raises(ValueError, match=r"volume has shape \(4, 3, 2\), expected"):
        case.to_original(np.zeros((4, 3, 2)))


# ------------------------------------------------------------------------------------------ normalisation


def test_zscore_within_brain_mask_or_nonzero(tmp_path):
    files = write_subject(tmp_path, {**{r: f"{r}.nii.gz" for r in STANDARD}, "brain_mask": "brainmask.nii.gz"})
    case = load_case(case_paths(files))
    assert case.image.dtype == np.float32 and case.image.shape == (3, 6, 10, 12)
    inside = case.image[:, case.brain_mask]
    np.testing.assert_allclose(inside.mean(1), 0, atol=1e-5)
    np.testing.assert_allclose(inside.std(1), 1, atol=1e-5)
    # Without a brain mask, the non-zero voxels are the brain (same here).
    no_mask = load_case(CasePaths("c", case_paths(files).images, files["mask"], None))
    np.testing.assert_array_equal(no_mask.brain_mask, case.brain_mask)
    np.testing.assert_allclose(no_mask.image, case.image, atol=1e-5)


# ------------------------------------------------------------------------------------------ bad input


@pytest.fixture
def subject(tmp_path) -> dict[str, Path]:
    return write_subject(tmp_path / "s1", {**{r: f"{r}.nii.gz" for r in STANDARD}, "brain_mask": "brain_mask.nii.gz"})


def test_shape_mismatch_needs_resample(subject):
    save(subject["t2"], volumes()["t2"][:, :, :5], ras_affine())
    with pytest.raises(DataError, match=r"t2 file .*t2.nii.gz has shape \(12, 10, 5\) but t1 has shape"):
        load_case(case_paths(subject))
    case = load_case(case_paths(subject), resample=True)
    assert case.image.shape == (3, 6, 10, 12)


def test_affine_mismatch_needs_resample(subject):
    data = volumes()
    save(subject["flair"], data["flair"], ras_affine(origin=(-3.0, -4.0, -7.0)))  # 2 mm shift along x
    with pytest.raises(DataError, match=r"flair file .*flair.nii.gz has an affine 2 mm away from t1's"):
        load_case(case_paths(subject))
    case = load_case(case_paths(subject), resample=True)
    # Resampled onto the t1 grid: the flair brain now starts 2 voxels later along x (W).
    flair = case.to_original(case.image[2])
    assert np.asarray(flair.dataobj)[:4].std() < np.asarray(flair.dataobj)[4:10].std()
    # A float32-rounding-sized difference is tolerated.
    save(subject["flair"], data["flair"], ras_affine(origin=(-5.00001, -4.0, -7.0)))
    load_case(case_paths(subject))


def test_mask_grid_is_checked_too(subject):
    save(subject["mask"], volumes()["mask"][:, :, :5], ras_affine())
    with pytest.raises(DataError, match=r"lesion mask file .*mask.nii.gz has shape"):
        load_case(case_paths(subject))


@pytest.mark.parametrize("label2,expected", [("ignore", 255), ("lesion", 1)])
def test_label_two(subject, label2, expected):
    mask = volumes()["mask"]
    mask[2, 2, 2] = 2
    save(subject["mask"], mask, ras_affine())
    with pytest.raises(DataError, match=r"mask .*mask.nii.gz is not binary: labels \[0, 1, 2\] with 1 voxels above 1; "
                                        r"for WMH-style label 2 pass label2="):
        load_case(case_paths(subject))
    case = load_case(case_paths(subject), label2=label2)
    assert case.label[2, 2, 2] == expected and case.label.dtype == np.uint8
    assert (case.label == 1).sum() == 2 + (expected == 1)


@pytest.mark.parametrize("bad,fragment", [(3, r"labels \[0, 1, 3\]"), (0.5, "non-integer or negative values"),
                                          (-1, "non-integer or negative values")])
def test_non_binary_masks(subject, bad, fragment):
    mask = volumes()["mask"].astype(np.float32)
    mask[2, 2, 2] = bad
    save(subject["mask"], mask, ras_affine())
    with pytest.raises(DataError, match=rf"lesion mask .*mask.nii.gz is not binary: {fragment}"):
        load_case(case_paths(subject), label2="ignore")


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_voxels(subject, value):
    t2 = volumes()["t2"]
    t2[3, 3, 3] = value
    save(subject["t2"], t2, ras_affine())
    with pytest.raises(DataError, match=r"t2 file .*t2.nii.gz has 1 NaN/inf voxels"):
        load_case(case_paths(subject))


def test_empty_unreadable_and_blank_files(subject):
    subject["t1"].write_bytes(b"")
    with pytest.raises(DataError, match=r"t1 file .*t1.nii.gz is empty \(0 bytes\)"):
        load_case(case_paths(subject))
    subject["t1"].write_bytes(b"this is not a nifti file")
    with pytest.raises(DataError, match=r"cannot read t1 file .*t1.nii.gz"):
        load_case(case_paths(subject))
    save(subject["t1"], np.zeros(SHAPE, np.float32), ras_affine())
    with pytest.raises(DataError, match=r"t1 file .*t1.nii.gz contains only zeros"):
        load_case(case_paths(subject))
    save(subject["t1"], np.zeros((12, 10, 6, 2), np.float32), ras_affine())
    with pytest.raises(DataError, match=r"t1 file .*t1.nii.gz has shape \(12, 10, 6, 2\); expected a 3-D volume"):
        load_case(case_paths(subject))


def test_brain_mask_problems(subject):
    save(subject["brain_mask"], np.zeros(SHAPE, np.uint8), ras_affine())
    with pytest.raises(DataError, match=r"brain mask file .*brain_mask.nii.gz is empty"):
        load_case(case_paths(subject))
    save(subject["brain_mask"], np.ones(SHAPE, np.uint8), ras_affine())
    save(subject["t1"], np.full(SHAPE, 7.0, np.float32), ras_affine())
    with pytest.raises(DataError, match=r"t1 file .*t1.nii.gz is constant"):
        load_case(case_paths(subject))


def test_load_case_argument_errors(subject):
    with pytest.raises(ValueError, match="label2 must be one of"):
        load_case(case_paths(subject), label2="drop")
    with pytest.raises(DataError, match=r"no file for modalities \['pd'\]"):
        load_case(case_paths(subject), modalities=("t1", "pd"))


# ------------------------------------------------------------------------------------------ crops


def make_case(shape=(8, 30, 30), lesion=(4, 20, 9)) -> Case:
    rng = np.random.default_rng(0)
    label = np.zeros(shape, np.uint8)
    label[lesion] = 1
    brain = np.zeros(shape, bool)
    brain[2:6, 5:25, 5:25] = True
    return Case("c", rng.normal(size=(2, *shape)).astype(np.float32), label, brain, (3.0, 1.0, 1.0), ("t1", "flair"))


def test_crop_shape_dtype_and_content():
    case = make_case()
    image, label = sample_crop(case, (4, 9, 9), np.random.default_rng(0), lesion_fraction=1.0)
    assert image.shape == (2, 4, 9, 9) and image.dtype == np.float32
    assert label.shape == (4, 9, 9) and label.dtype == np.uint8
    # Lesion-centred: the lesion voxel sits at the crop centre (no clipping needed here).
    assert label[2, 4, 4] == 1 and label.sum() == 1
    np.testing.assert_array_equal(image[:, 2, 4, 4], case.image[:, 4, 20, 9])


def test_crop_pads_small_volumes_with_zeros():
    case = make_case(shape=(4, 6, 30), lesion=(1, 2, 3))
    image, label = sample_crop(case, (8, 10, 10), np.random.default_rng(1), lesion_fraction=1.0)
    assert image.shape == (2, 8, 10, 10)
    # Depth 4 centred in 8 (2 zero slices each side), height 6 centred in 10.
    assert not image[:, :2].any() and not image[:, 6:].any()
    assert not image[:, :, :2].any() and not image[:, :, 8:].any() and image[:, 2:6, 2:8].all()
    assert label.sum() == 1 and label[3, 4].any()


def test_crops_stay_inside_and_follow_the_centre_rule():
    case = make_case()
    rng = np.random.default_rng(2)
    for _ in range(50):
        image, _ = sample_crop(case, (4, 6, 6), rng, lesion_fraction=0.0, centre="brain")
        # The crop's centre voxel is a brain voxel: find the crop in the volume by its values.
        d, h, w = (np.argwhere(case.image[0] == image[0, 2, 3, 3])[0])
        assert case.brain_mask[d, h, w]


def test_lesion_centred_fraction_is_respected_statistically():
    case = make_case()
    rng = np.random.default_rng(3)
    draws = 600
    centred = sum(sample_crop(case, (3, 5, 5), rng, lesion_fraction=0.3)[1][1, 2, 2] == 1 for _ in range(draws))
    # Binomial(600, 0.3): sd ~ 11; brain-centred crops hit the single lesion voxel with p = 1/1600.
    assert abs(centred - 0.3 * draws) < 45


def test_anywhere_crops_are_uniform_over_positions():
    case = make_case(shape=(4, 12, 12), lesion=(1, 1, 1))
    rng = np.random.default_rng(4)
    starts = set()
    for _ in range(300):
        image, _ = sample_crop(case, (4, 10, 10), rng, lesion_fraction=0.0, centre="anywhere")
        h, w = np.argwhere(case.image[0, 0] == image[0, 0, 0, 0])[0]
        starts.add((int(h), int(w)))
    assert starts == {(h, w) for h in range(3) for w in range(3)}


def test_crop_argument_errors():
    case = make_case()
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="size must be three positive ints"):
        sample_crop(case, (4, 4), rng)
    with pytest.raises(ValueError, match=r"lesion_fraction must be in \[0, 1\], got 1.5"):
        sample_crop(case, (4, 4, 4), rng, lesion_fraction=1.5)
    with pytest.raises(ValueError, match="centre must be one of"):
        sample_crop(case, (4, 4, 4), rng, centre="lesion")


def test_mean_lesion_fraction():
    a, b = make_case(), make_case()
    b.label[0, :2, :2] = 1
    size = a.label.size
    assert mean_lesion_fraction([a, b]) == pytest.approx((1 / size + 5 / size) / 2)
    b.label[1, 0, 0] = 255  # ignored voxels are not lesion
    assert mean_lesion_fraction([b]) == pytest.approx(5 / size)
    with pytest.raises(ValueError, match="cases is empty"):
        mean_lesion_fraction([])
    a.label = None
    with pytest.raises(ValueError, match=r"cases \['c'\] have no label"):
        mean_lesion_fraction([a])
