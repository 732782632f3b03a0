"""Reading MS-lesion datasets: NIfTI files in, checked and normalised arrays in model layout out.

Two on-disk layouts are supported (see ``docs/ms_lesion.md``):

* nnU-Net v2 / Medical Segmentation Decathlon: ``imagesTr/<case>_<XXXX>.nii.gz`` with the channel
  order read from ``dataset.json`` (``channel_names``, or MSD's ``modality``), ``labelsTr/<case>.nii.gz``;
* one folder per subject, files matched by name tokens (``ROLE_TOKENS``) or by ``--pattern ROLE=GLOB``.

Every volume is reoriented to RAS with nibabel, then transposed so that the through-plane axis
(largest voxel spacing) comes first: the model layout ``(D, H, W)``. For an axial scan that is
``(axial, coronal, sagittal)`` = ``(z, y, x)``, the axis convention of ``sliceattn``.
``Case.to_original`` undoes both steps exactly, so predictions can be written back on the source grid.
"""

from __future__ import annotations

import fnmatch
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from nibabel import orientations as ornt
from scipy import ndimage

MODALITIES: tuple[str, ...] = ("t1", "t2", "flair")
LAYOUTS: tuple[str, ...] = ("auto", "nnunet", "subject-folders")
LABEL2_MODES: tuple[str, ...] = ("error", "ignore", "lesion")
# The first of each is the default.
NORMALISATIONS: tuple[str, ...] = ("foreground", "brain-mask")
CENTRES: tuple[str, ...] = ("brain", "anywhere")
# Which image folders of an nnU-Net data set are read (labels from labelsTr / labelsTs beside them).
NNUNET_IMAGES: tuple[str, ...] = ("imagesTr", "imagesTs", "both")
ROLES: tuple[str, ...] = (*MODALITIES, "mask", "brain_mask")
IGNORE_LABEL = 255

# File names are read as tokens (split at anything but letters and digits), never as substrings, so
# "length" or "regtoMNI" do not contain the token "gt". A token names a role when it fully matches
# the role's expression; a name with tokens of several roles goes to the first role in ROLE_PRIORITY
# ("P1_T1_FLAIR" is FLAIR, "T2-FLAIR" is FLAIR, "T1_brain_mask" is a brain mask). A token that names a
# reference space ("T2_in_FLAIR_space", "T1_to_FLAIR") is not the image's own contrast. BIDS names
# ("sub-01_space-FLAIR_T1w", "sub-01_label-lesion_mask") are read the BIDS way: the suffix names the
# image and the key-value entities qualify it. ``--pattern ROLE=GLOB`` replaces a role's rule.
ROLE_TOKENS: dict[str, str] = {
    "t1": r"(3d)?t1w?|(t1)?mp2?rage",
    "t2": r"(3d)?t2w?",
    "flair": r"(3d)?(t2)?flair\d*",
    "mask": r"(lesion)?masks?\d*|lesions?\d*|seg|segmentation|gt|groundtruth|consensus|gold(standard)?|labels?"
            r"|wmh|manual\d*",
    "brain_mask": r"brainmask|bet_?mask",
}
# Tokens that disqualify a role: contrast-enhanced T1 is not T1, T2-star is not T2.
ROLE_EXCLUDES: dict[str, frozenset[str]] = {
    "t1": frozenset({"gd", "gado", "gadolinium", "ce", "t1ce", "t1gd", "t1c", "contrast", "post", "postcontrast"}),
    "t2": frozenset({"star", "t2star", "t2s"}),
}
SPACE_WORDS = frozenset({"in", "to", "reg", "regto", "reg2", "space", "into", "onto", "coreg", "ref"})
LESION_WORDS = frozenset({"lesion", "lesions", "ms", "msl", "wmh", "consensus"})
BIDS_SUFFIXES: dict[str, str] = {"t1w": "t1", "t1": "t1", "t2w": "t2", "t2": "t2", "flair": "flair"}
ROLE_PRIORITY: tuple[str, ...] = ("brain_mask", "mask", "flair", "t2", "t1")
ROLE_NAMES: dict[str, str] = {"mask": "lesion mask", "brain_mask": "brain mask"}
NIFTI_SUFFIXES: tuple[str, ...] = (".nii", ".nii.gz")
# MS lesions occupy well under 10 % of the brain (a heavy load is about 50 mL of 1200 mL); a "lesion
# mask" covering more is a brain or tissue mask picked by mistake.
MAX_LESION_BRAIN_FRACTION = 0.10

# Two grids are "the same" when the world positions of the volume corners differ by less than this
# fraction of the smallest voxel size (absorbs float32 rounding of affines written by other tools).
GRID_TOLERANCE = 0.1


class DataError(ValueError):
    """Bad input data; the message names the offending file(s)."""


@dataclass
class CasePaths:
    """The files of one case, found on disk but not read yet."""

    id: str
    images: dict[str, Path]
    mask: Path | None
    brain_mask: Path | None


@dataclass
class SourceGeometry:
    """What ``Case.to_original`` needs to put a model-layout volume back on the source grid."""

    shape: tuple[int, ...]      # source voxel grid (3-D)
    affine: np.ndarray          # (4, 4) source voxel -> world (mm)
    header: nib.Nifti1Header    # source header (qform/sform codes, units)
    to_ras: np.ndarray          # nibabel orientation transform, source -> RAS
    permutation: tuple[int, int, int]  # RAS axes in model order (D, H, W)


@dataclass
class Case:
    """One case read, checked, reoriented and normalised.

    Attributes:
        id: case identifier (folder name or nnU-Net case id).
        image: ``(M, D, H, W)`` float32, z-scored (see ``load_case``), modalities in ``modalities`` order.
            ``D`` is the through-plane axis (largest spacing); for axial scans ``(D, H, W) = (z, y, x)``.
        label: ``(D, H, W)`` uint8, 0 background, 1 lesion, 255 ignore; ``None`` without a mask file.
        brain_mask: ``(D, H, W)`` bool: the brain-mask file, else the non-zero voxels (crops are centred in it).
        spacing: voxel size in mm, ``(D, H, W)`` order.
        modalities: modality names, one per image channel.
        source: the source geometry; ``None`` for cases built in memory (then ``to_original`` assumes
            an RAS grid with this spacing).
    """

    id: str
    image: np.ndarray
    label: np.ndarray | None
    brain_mask: np.ndarray
    spacing: tuple[float, float, float]
    modalities: tuple[str, ...]
    source: SourceGeometry | None = field(default=None, repr=False, compare=False)
    _lesion_voxels: np.ndarray | None = field(default=None, init=False, repr=False, compare=False)
    _brain_voxels: np.ndarray | None = field(default=None, init=False, repr=False, compare=False)

    def to_original(self, volume: np.ndarray) -> nib.Nifti1Image:
        """Put a model-layout volume back in the source file's orientation, shape and affine.

        Args:
            volume: ``(D, H, W)`` array on this case's grid (dtype kept: pass uint8 for masks).

        Returns:
            A NIfTI image on the source grid; the exact inverse of the load-time reorientation.
        """
        volume = np.asarray(volume)
        if volume.shape != self.image.shape[1:]:
            raise ValueError(
                f"volume has shape {volume.shape}, expected the case's (D, H, W) = {self.image.shape[1:]}"
            )
        if self.source is None:
            affine = np.diag([*self.spacing[::-1], 1.0])
            return _image(np.transpose(volume, (2, 1, 0)), affine, None)
        src = self.source
        ras = np.transpose(volume, np.argsort(src.permutation))
        back = ornt.ornt_transform(ornt.axcodes2ornt("RAS"), ornt.io_orientation(src.affine))
        data = np.ascontiguousarray(ornt.apply_orientation(ras, back))
        assert data.shape == src.shape  # the orientation maths guarantees it
        return _image(data, src.affine, src.header)

    def lesion_voxels(self) -> np.ndarray:
        """Flat indices of the lesion voxels (label 1), computed once."""
        if self._lesion_voxels is None:
            self._lesion_voxels = (
                np.empty(0, np.int64) if self.label is None else np.flatnonzero(self.label == 1)
            )
        return self._lesion_voxels

    def brain_voxels(self) -> np.ndarray:
        """Flat indices of the brain-mask voxels, computed once."""
        if self._brain_voxels is None:
            self._brain_voxels = np.flatnonzero(self.brain_mask)
        return self._brain_voxels


def _image(data: np.ndarray, affine: np.ndarray, header: nib.Nifti1Header | None) -> nib.Nifti1Image:
    """A NIfTI image storing ``data`` unscaled in its own dtype (a copied header may carry a slope)."""
    img = nib.Nifti1Image(data, affine, header.copy() if header is not None else None)
    img.header.set_data_dtype(data.dtype)
    img.header.set_slope_inter(1.0, 0.0)
    return img


# --------------------------------------------------------------------------------------------- finding


def _stem(name: str) -> str:
    """The lower-case file name without folders and NIfTI suffix; ``*`` (as in "T2*") reads as "star"."""
    name = name.rsplit("/", 1)[-1].lower()
    for suffix in sorted(NIFTI_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return name.replace("*", "_star")


def _bids_roles(stem: str) -> set[str] | None:
    """The roles of a BIDS name (``key-value`` entities, then a suffix), or None if it is not one."""
    parts = stem.split("_")
    if len(parts) < 2 or "-" in parts[-1] or not all(re.fullmatch(r"[a-z]+-[a-z0-9]+", p) for p in parts[:-1]):
        return None
    entities = dict(p.split("-", 1) for p in parts[:-1])
    suffix = parts[-1]
    if suffix in BIDS_SUFFIXES:
        role = BIDS_SUFFIXES[suffix]
        return set() if role == "t1" and "ce" in entities else {role}
    if suffix in ("mask", "roi", "dseg", "lesion", "lesions"):
        what = {entities.get("label", ""), entities.get("desc", "")}
        if "brain" in what:
            return {"brain_mask"}
        return {"mask"} if what & LESION_WORDS or not what - {""} else set()
    return set()


def default_roles(name: str) -> set[str]:
    """The roles the built-in rules give a file name (empty: no role); see ``ROLE_TOKENS``."""
    stem = _stem(name)
    bids = _bids_roles(stem)
    if bids is not None:
        return bids
    tokens = [t for t in re.split(r"[^a-z0-9]+", stem) if t]
    # A contrast named as a reference space ("in FLAIR space", "to FLAIR") is not this image's contrast.
    own = [t for i, t in enumerate(tokens)
           if not (i > 0 and tokens[i - 1] in SPACE_WORDS) and not (i + 1 < len(tokens) and tokens[i + 1] == "space")]
    roles = {role for role, expr in ROLE_TOKENS.items() if any(re.fullmatch(expr, t) for t in own)}
    roles -= {role for role, words in ROLE_EXCLUDES.items() if words & set(tokens)}
    if "brain" in tokens and "mask" in roles and not LESION_WORDS & set(tokens):
        roles = (roles - {"mask"}) | {"brain_mask"}  # "brain_mask", "T1_brain_mask", "skull_strip_brain_mask"
    return roles


def _glob_matches(name: str, pattern: str) -> bool:
    """Whether ``name`` (a relative path) matches a ``|``/``!`` glob pattern, case-insensitively."""
    name = name.lower()
    alternatives = [alt.strip().lower() for alt in pattern.split("|") if alt.strip()]
    include = [alt for alt in alternatives if not alt.startswith("!")]
    exclude = [alt[1:] for alt in alternatives if alt.startswith("!")]

    def hit(glob: str) -> bool:
        return fnmatch.fnmatchcase(name if "/" in glob else name.rsplit("/", 1)[-1], glob)

    return any(hit(g) for g in include) and not any(hit(g) for g in exclude)


def _assign(names: Sequence[str], roles: Sequence[str], patterns: Mapping[str, str]) -> dict[str, list[str]]:
    """Role -> matching names. A user pattern decides its role alone; the built-in rules decide the
    others; each name goes to its highest-priority role."""
    order = [r for r in ROLE_PRIORITY if r in roles] + [r for r in roles if r not in ROLE_PRIORITY]
    found: dict[str, list[str]] = {role: [] for role in roles}
    for name in names:
        by_rule = default_roles(name)
        matched = [r for r in order if (_glob_matches(name, patterns[r]) if r in patterns else r in by_rule)]
        if matched:
            found[matched[0]].append(name)
    return found


def parse_patterns(items: Sequence[str]) -> dict[str, str]:
    """``["flair=raw/*flair*", ...]`` (``--pattern ROLE=GLOB``) -> ``{"flair": "raw/*flair*"}``."""
    patterns: dict[str, str] = {}
    for item in items:
        role, sep, glob = item.partition("=")
        role = role.strip().lower()
        if not sep or not role or not glob.strip():
            raise ValueError(f"--pattern takes ROLE=GLOB (e.g. --pattern 'flair=*FLAIR*'), got {item!r}")
        patterns[role] = glob.strip()
    return patterns


def _check_roles(modalities: Sequence[str], patterns: Mapping[str, str]) -> tuple[str, ...]:
    modalities = tuple(modalities)
    if not modalities or len(set(modalities)) != len(modalities):
        raise ValueError(f"modalities must be a non-empty list of distinct names, got {modalities!r}")
    unknown = [m for m in modalities if m not in ROLES and m not in patterns]
    if unknown:
        raise ValueError(f"modalities {unknown} have no built-in rule; known: {list(MODALITIES)} "
                         f"(give one with --pattern {unknown[0]}=GLOB)")
    bad_roles = [r for r in patterns if r not in ROLES and r not in modalities]
    if bad_roles:
        raise ValueError(f"--pattern role {bad_roles[0]!r} is neither a modality {list(modalities)} nor "
                         "'mask' or 'brain_mask'")
    return modalities


def _is_nifti(path: Path) -> bool:
    return path.is_file() and not path.name.startswith(".") and path.name.lower().endswith(NIFTI_SUFFIXES)


def find_cases(
    root: str | Path,
    *,
    layout: str = "auto",
    modalities: Sequence[str] = MODALITIES,
    patterns: Mapping[str, str] | None = None,
    require_mask: bool = True,
    errors: dict[str, DataError] | None = None,
    nnunet_images: str = NNUNET_IMAGES[0],
) -> list[CasePaths]:
    """Find the cases of a dataset folder.

    Args:
        root: dataset folder.
        layout: ``"nnunet"`` (``dataset.json`` + ``imagesTr``/``labelsTr``), ``"subject-folders"``
            (one folder per subject) or ``"auto"`` (nnU-Net if ``dataset.json`` or ``imagesTr`` exists).
        modalities: modalities to read, in channel order.
        patterns: role -> glob pattern replacing the built-in rule of that role (roles: modality
            names, ``"mask"``, ``"brain_mask"``); in the nnU-Net layout the modality rules and patterns
            are matched against the ``dataset.json`` channel names.
        require_mask: raise if a case has no lesion mask or several candidates (else its ``mask`` is ``None``
            then: a caller that needs no mask, such as prediction, is not stopped by the mask's files).
        errors: if given, a case with a missing or ambiguous file is left out and its error
            stored here under its id instead of raised (so one bad subject does not stop a batch).
        nnunet_images: the nnU-Net layout's image folders to read: ``"imagesTr"``, ``"imagesTs"`` or
            ``"both"`` (ignored in the subject-folder layout).

    Returns:
        The cases sorted by id.

    Raises:
        DataError: nothing found, a missing or ambiguous file, or a bad ``dataset.json``.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if nnunet_images not in NNUNET_IMAGES:
        raise ValueError(f"nnunet_images must be one of {NNUNET_IMAGES}, got {nnunet_images!r}")
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"dataset folder {root} does not exist or is not a folder (check --data)")
    patterns = dict(patterns or {})
    modalities = _check_roles(modalities, patterns)
    layout = resolve_layout(root, layout)
    if layout == "nnunet":
        folders = ("imagesTr", "imagesTs") if nnunet_images == "both" else (nnunet_images,)
        found = _find_nnunet(root, modalities, patterns, require_mask, folders)
    else:
        found = _find_subject_folders(root, modalities, patterns, require_mask)
    cases = []
    for case_id, case in found:
        if isinstance(case, DataError):
            if errors is None:
                raise case
            errors[case_id] = case
        else:
            cases.append(case)
    if not cases and not errors:
        raise DataError(f"no cases found in {root} (layout {layout!r}); see docs/ms_lesion.md for the layouts")
    return sorted(cases, key=lambda c: c.id)


def resolve_layout(root: str | Path, layout: str) -> str:
    """``"auto"`` -> ``"nnunet"`` if ``root`` has ``dataset.json`` or ``imagesTr``, else ``"subject-folders"``."""
    if layout != "auto":
        return layout
    root = Path(root)
    return "nnunet" if (root / "dataset.json").is_file() or (root / "imagesTr").is_dir() else "subject-folders"


def read_json(path: Path, what: str) -> Any:
    """The JSON in ``path``; a missing or unreadable file is a ``DataError`` naming ``what`` and the path."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise DataError(f"{what} {path} does not exist") from None
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read {what} {path}: {exc}") from exc


def _rule(role: str, patterns: Mapping[str, str]) -> str:
    return f"pattern {patterns[role]!r}" if role in patterns else "the built-in rule"


def _nnunet_channels(root: Path, modalities: tuple[str, ...], patterns: dict[str, str]) -> tuple[dict[str, int], str]:
    """The channel index of each modality (from ``dataset.json``) and the file ending."""
    meta_path = root / "dataset.json"
    meta = read_json(meta_path, "the nnU-Net layout's file")
    channels = meta.get("channel_names", meta.get("modality"))
    if not isinstance(channels, dict) or not channels:
        raise DataError(f"{meta_path} has no 'channel_names' (nnU-Net v2) or 'modality' (MSD) mapping")
    ending = str(meta.get("file_ending", ".nii.gz"))
    # Channel names are matched with the same rules as file names ("FLAIR" -> flair, "T1w" -> t1).
    by_role = _assign([str(v) for v in channels.values()], modalities, patterns)
    index = {str(v): int(k) for k, v in channels.items()}
    channel_of: dict[str, int] = {}
    for modality in modalities:
        names = by_role[modality]
        if len(names) != 1:
            raise DataError(
                f"{meta_path}: modality {modality!r} ({_rule(modality, patterns)}) matches "
                f"{'no' if not names else 'several'} channel names {names or list(channels.values())}; "
                f"choose with --pattern {modality}=NAME"
            )
        channel_of[modality] = index[names[0]]
    return channel_of, ending


def _find_nnunet(
    root: Path, modalities: tuple[str, ...], patterns: dict[str, str], require_mask: bool, folders: Sequence[str]
) -> Iterator[tuple[str, CasePaths | DataError]]:
    """Each case id of the image ``folders`` with its paths, or with the error that makes it unusable."""
    channel_of, ending = _nnunet_channels(root, modalities, patterns)
    seen: dict[str, str] = {}
    for folder in folders:
        images_dir, labels_dir = root / folder, root / folder.replace("images", "labels")
        if not images_dir.is_dir():
            raise DataError(f"nnU-Net layout: the folder {images_dir} does not exist")
        suffix = "_0000" + ending
        ids = sorted(p.name[: -len(suffix)] for p in images_dir.iterdir() if p.name.endswith(suffix))
        twice = sorted(set(ids) & seen.keys())
        if twice:
            raise DataError(f"nnU-Net layout: cases {twice} are in both {seen[twice[0]]} and {folder}")
        seen.update(dict.fromkeys(ids, folder))
        yield from _nnunet_cases(ids, images_dir, labels_dir, channel_of, ending, require_mask)


def _nnunet_cases(ids: Sequence[str], images_dir: Path, labels_dir: Path, channel_of: Mapping[str, int], ending: str,
                  require_mask: bool) -> Iterator[tuple[str, CasePaths | DataError]]:
    modalities = tuple(channel_of)
    for case_id in ids:
        images = {m: images_dir / f"{case_id}_{channel_of[m]:04d}{ending}" for m in modalities}
        absent = [f"{modality} file {path}" for modality, path in images.items() if not path.is_file()]
        mask: Path | None = labels_dir / f"{case_id}{ending}"
        if not mask.is_file():
            if require_mask:
                absent.append(f"label file {mask}")
            mask = None
        if absent:
            yield case_id, DataError(f"case {case_id!r}: {', '.join(absent)} is missing")
        else:
            yield case_id, CasePaths(case_id, images, mask, None)


def _find_subject_folders(
    root: Path, modalities: tuple[str, ...], patterns: dict[str, str], require_mask: bool
) -> Iterator[tuple[str, CasePaths | DataError]]:
    """Each subject folder's id with its paths, or with the error that makes it unusable."""
    roles = (*modalities, "mask", "brain_mask")
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if _is_nifti(p)}
        if not files:
            continue  # not a subject folder (docs, a cache...)
        found = _assign(list(files), roles, patterns)
        if not require_mask and len(found["mask"]) > 1:  # an optional mask is not chosen among candidates
            found["mask"] = []
        ambiguous = {role: names for role, names in found.items() if len(names) > 1}
        if ambiguous:
            role, names = next(iter(ambiguous.items()))
            yield folder.name, DataError(
                f"subject folder {folder}: {len(names)} files could be the {ROLE_NAMES.get(role, role + ' image')} "
                f"({_rule(role, patterns)}): {names}; choose one with --pattern {role}=GLOB (e.g. --pattern "
                f"'{role}={next((n for n in names if '/' in n), names[0])}'; a GLOB with '/' matches the path inside "
                "the folder)"
            )
            continue
        chosen = {role: files[names[0]] if names else None for role, names in found.items()}
        missing = [m for m in modalities if chosen[m] is None]
        if require_mask and chosen["mask"] is None:
            missing.append("mask")
        if missing:
            yield folder.name, DataError(
                f"subject folder {folder}: no file for {missing} "
                f"({', '.join(f'{r}: {_rule(r, patterns)}' for r in missing)}); files there: {list(files)}; "
                f"name it with --pattern {missing[0]}=GLOB"
            )
            continue
        images = {m: chosen[m] for m in modalities}
        yield folder.name, CasePaths(folder.name, images, chosen["mask"], chosen["brain_mask"])  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------- reading


def _read(path: Path, what: str) -> tuple[np.ndarray, nib.Nifti1Image]:
    """Read a 3-D NIfTI volume as float32, with DataErrors for unreadable, empty or non-finite data."""
    if not path.is_file():
        raise DataError(f"{what} file {path} does not exist")
    if path.stat().st_size == 0:
        raise DataError(f"{what} file {path} is empty (0 bytes)")
    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as exc:  # nibabel raises many types for corrupt files; all mean "unreadable"
        raise DataError(f"cannot read {what} file {path}: {exc}") from exc
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DataError(f"{what} file {path} has shape {data.shape}; expected a 3-D volume")
    if data.size == 0:
        raise DataError(f"{what} file {path} is empty (shape {data.shape})")
    bad = ~np.isfinite(data)
    if bad.any():
        raise DataError(f"{what} file {path} has {int(bad.sum())} NaN/inf voxels")
    return data, img


def _grid_gap(a: nib.Nifti1Image, b: nib.Nifti1Image) -> float:
    """Largest world distance (mm) between the corners of the voxel grid under the two affines."""
    corners = np.array(np.meshgrid(*[[0, n - 1] for n in a.shape[:3]], indexing="ij")).reshape(3, -1)
    corners = np.vstack([corners, np.ones(corners.shape[1])])
    return float(np.abs(a.affine @ corners - b.affine @ corners).max())


def _on_grid(
    data: np.ndarray, img: nib.Nifti1Image, ref: nib.Nifti1Image, what: str, path: Path,
    ref_what: str, resample: bool, order: int,
) -> np.ndarray:
    """``data`` on the reference grid: checked equal, or resampled when ``resample``."""
    voxel = float(np.sqrt((ref.affine[:3, :3] ** 2).sum(0)).min())
    same_shape = data.shape == ref.shape[:3]
    gap = _grid_gap(img, ref) if same_shape else np.inf
    if same_shape and gap <= GRID_TOLERANCE * voxel:
        return data
    if not resample:
        detail = (
            f"shape {data.shape} but {ref_what} has shape {ref.shape[:3]}"
            if not same_shape
            else f"an affine {gap:.3g} mm away from {ref_what}'s at the volume corners"
        )
        raise DataError(
            f"{what} file {path} has {detail} ({ref.get_filename()}); pass resample=True (--resample) "
            f"to resample onto the {ref_what} grid"
        )
    to_moving = np.linalg.inv(img.affine) @ ref.affine
    return ndimage.affine_transform(data, to_moving, output_shape=ref.shape[:3], order=order, mode="constant")


def _label(data: np.ndarray, path: Path, label2: str) -> np.ndarray:
    """A lesion mask as uint8 {0, 1, 255}; any other value is an error (label 2 per ``label2``)."""
    values, counts = np.unique(data, return_counts=True)
    if np.any(values != np.round(values)) or values.min() < 0:
        odd = values[(values != np.round(values)) | (values < 0)][:5]
        raise DataError(f"lesion mask {path} is not binary: non-integer or negative values {odd.tolist()}")
    extra = values > 1
    if extra.any():
        only_two = set(values[extra].tolist()) == {2.0}
        if not only_two or label2 == "error":
            hint = "; for WMH-style label 2 pass label2='ignore' or 'lesion' (--label2)" if only_two else ""
            raise DataError(
                f"lesion mask {path} is not binary: labels {values.astype(int).tolist()} with "
                f"{int(counts[extra].sum())} voxels above 1{hint}"
            )
    label = (data == 1).astype(np.uint8)
    if label2 == "ignore":
        label[data == 2] = IGNORE_LABEL
    elif label2 == "lesion":
        label[data == 2] = 1
    return label


def _model_layout(spacing_ras: np.ndarray) -> tuple[int, int, int]:
    """RAS axes in model order: through-plane (largest spacing; ties prefer z, then y) first, then the
    other two in (z, y, x) order, so an axial scan becomes (z, y, x) = (axial, coronal, sagittal)."""
    order = [2, 1, 0]
    through = max(order, key=lambda axis: (spacing_ras[axis] > spacing_ras.max() * (1 - 1e-3), -order.index(axis)))
    rest = [axis for axis in order if axis != through]
    return (through, rest[0], rest[1])


def _normalise(data: np.ndarray, region: np.ndarray, path: Path, what: str) -> np.ndarray:
    """``data`` z-scored over the voxels of ``region``."""
    inside = data[region]
    mean, std = float(inside.mean()), float(inside.std())
    if std == 0.0:
        raise DataError(f"{what} file {path} is constant ({mean}) where it is z-scored; cannot normalise")
    return ((data - mean) / std).astype(np.float32)


def _check_load(paths: CasePaths, modalities: Sequence[str], label2: str, normalisation: str) -> tuple[str, ...]:
    """The modalities to read, after checking the options against the case's files."""
    if label2 not in LABEL2_MODES:
        raise ValueError(f"label2 must be one of {LABEL2_MODES}, got {label2!r}")
    if normalisation not in NORMALISATIONS:
        raise ValueError(f"normalisation must be one of {NORMALISATIONS}, got {normalisation!r}")
    if normalisation == "brain-mask" and paths.brain_mask is None:
        raise DataError(
            f"case {paths.id!r} has no brain-mask file, but the model z-scores inside brain masks "
            "(normalisation 'brain-mask'); add its brain mask (see --pattern brain_mask=GLOB) or train with "
            "--normalisation foreground"
        )
    modalities = tuple(modalities)
    missing = [m for m in modalities if m not in paths.images]
    if not modalities or missing:
        raise DataError(f"case {paths.id!r}: no file for modalities {missing or modalities}; have {sorted(paths.images)}")
    return modalities


def _read_modalities(paths: CasePaths, modalities: tuple[str, ...], resample: bool
                     ) -> tuple[list[np.ndarray], nib.Nifti1Image]:
    """Each modality's volume on the first modality's grid, and that reference image."""
    ref_data, ref = _read(paths.images[modalities[0]], modalities[0])
    volumes = [ref_data]
    for modality in modalities[1:]:
        data, img = _read(paths.images[modality], modality)
        volumes.append(_on_grid(data, img, ref, modality, paths.images[modality], modalities[0], resample, order=1))
    for modality, data in zip(modalities, volumes):
        if not data.any():
            raise DataError(f"{modality} file {paths.images[modality]} contains only zeros")
    return volumes, ref


def _read_mask(path: Path, what: str, ref: nib.Nifti1Image, ref_what: str, resample: bool) -> np.ndarray:
    """A mask file on the reference grid (nearest-neighbour when resampled)."""
    data, img = _read(path, what)
    return _on_grid(data, img, ref, what, path, ref_what, resample, order=0)


@dataclass(frozen=True)
class _ModelGrid:
    """The source grid's orientation: RAS reorientation, then the through-plane axis first."""

    to_ras: np.ndarray
    permutation: tuple[int, int, int]
    spacing: tuple[float, float, float]   # model order (D, H, W), mm

    @classmethod
    def of(cls, ref: nib.Nifti1Image) -> _ModelGrid:
        to_ras = ornt.io_orientation(ref.affine)
        spacing_ras = np.empty(3)
        spacing_ras[to_ras[:, 0].astype(int)] = np.sqrt((ref.affine[:3, :3] ** 2).sum(0))
        permutation = _model_layout(spacing_ras)
        # Rounded: affines stored as float32 would give 0.699999988 for 0.7 mm.
        spacing = tuple(round(float(spacing_ras[a]), 5) for a in permutation)
        return cls(to_ras, permutation, spacing)  # type: ignore[arg-type]

    def apply(self, volume: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(np.transpose(ornt.apply_orientation(volume, self.to_ras), self.permutation))


def load_case(
    paths: CasePaths,
    *,
    modalities: Sequence[str] = MODALITIES,
    resample: bool = False,
    label2: str = LABEL2_MODES[0],
    normalisation: str = NORMALISATIONS[0],
) -> Case:
    """Read, check, reorient (RAS, then through-plane first) and z-score one case.

    Args:
        paths: the case's files (from ``find_cases``).
        modalities: channels to read, in order; each must be in ``paths.images``.
        resample: resample modalities and masks onto the first modality's grid instead of raising
            when shapes or affines differ.
        label2: what a mask label 2 means: ``"error"`` (raise), ``"ignore"`` (-> 255) or ``"lesion"`` (-> 1).
        normalisation: the voxels each modality is z-scored over: ``"foreground"`` (non-zero in any
            modality: the brain of skull-stripped data, the whole field of view otherwise; the same
            whether or not a brain-mask file exists) or ``"brain-mask"`` (inside the case's brain-mask
            file, which must exist).

    Returns:
        The case in model layout; see ``Case``.

    Raises:
        DataError: unreadable/empty files, NaN/inf, grid mismatch, non-binary masks, empty brain mask.
    """
    modalities = _check_load(paths, modalities, label2, normalisation)
    volumes, ref = _read_modalities(paths, modalities, resample)
    label = None
    if paths.mask is not None:
        label = _label(_read_mask(paths.mask, "lesion mask", ref, modalities[0], resample), paths.mask, label2)
    # Skull-stripped data: the brain is where any modality is non-zero.
    foreground = np.any([v != 0 for v in volumes], axis=0)
    brain = foreground
    if paths.brain_mask is not None:
        brain = _read_mask(paths.brain_mask, "brain mask", ref, modalities[0], resample) > 0
        if not brain.any():
            raise DataError(f"brain mask file {paths.brain_mask} is empty (no voxel above 0)")
    grid = _ModelGrid.of(ref)
    region = grid.apply(brain if normalisation == "brain-mask" else foreground)
    image = np.stack([_normalise(grid.apply(v), region, paths.images[m], m) for m, v in zip(modalities, volumes)])
    source = SourceGeometry(shape=tuple(ref.shape[:3]), affine=ref.affine.copy(), header=ref.header.copy(),
                            to_ras=grid.to_ras, permutation=grid.permutation)
    return Case(id=paths.id, image=image, label=None if label is None else grid.apply(label),
                brain_mask=grid.apply(brain), spacing=grid.spacing, modalities=modalities, source=source)


@dataclass(frozen=True)
class DataOptions:
    """How a dataset is read: chosen once (command line or defaults), recorded with a run, read back.

    ``layout``, ``patterns``, ``resample`` and ``label2`` only say how to find and read files;
    ``modalities`` and ``normalisation`` define what the model sees and must match the model's.

    Raises:
        ValueError: an unknown layout, label-2 mode or normalisation, repeated or unknown modalities,
            or a pattern for an unknown role.
    """

    layout: str = LAYOUTS[0]
    modalities: tuple[str, ...] = MODALITIES
    patterns: dict[str, str] = field(default_factory=dict)
    label2: str = LABEL2_MODES[0]
    resample: bool = False
    normalisation: str = NORMALISATIONS[0]

    def __post_init__(self) -> None:
        for name, choices in (("layout", LAYOUTS), ("label2", LABEL2_MODES), ("normalisation", NORMALISATIONS)):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {getattr(self, name)!r}")
        _check_roles(self.modalities, self.patterns)

    def record(self) -> dict[str, Any]:
        """A JSON-able dict (checkpoints store it); ``DataOptions.from_record`` rebuilds the options."""
        return {"layout": self.layout, "modalities": list(self.modalities), "patterns": dict(self.patterns),
                "label2": self.label2, "resample": self.resample, "normalisation": self.normalisation}

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> DataOptions:
        return cls(**{**record, "modalities": tuple(record["modalities"]), "patterns": dict(record["patterns"])})

    def find(self, root: str | Path, **kwargs: Any) -> list[CasePaths]:
        """``find_cases`` with these options."""
        return find_cases(root, layout=self.layout, modalities=self.modalities, patterns=self.patterns, **kwargs)

    def load(self, paths: CasePaths) -> Case:
        """``load_case`` with these options."""
        return load_case(paths, modalities=self.modalities, resample=self.resample, label2=self.label2,
                         normalisation=self.normalisation)


def load_dataset(root: str | Path, *, require_mask: bool = True, **options: Any) -> list[Case]:
    """``find_cases`` then ``load_case`` on each; ``options`` are ``DataOptions`` fields."""
    data = DataOptions(**options)
    return [data.load(p) for p in data.find(root, require_mask=require_mask)]


def lesion_brain_fraction(case: Case) -> float:
    """Lesion voxels over brain voxels (``Case.brain_mask``); MS lesions are a few per cent at most."""
    return float(case.lesion_voxels().size / max(case.brain_voxels().size, 1))


def check_lesion_masks(cases: Sequence[Case], *, training: bool = True) -> None:
    """Refuse masks that cannot be MS lesion masks: covering a brain or tissue, or (for training) all empty.

    Raises:
        DataError: naming the subjects and the fix.
    """
    fractions = {c.id: lesion_brain_fraction(c) for c in cases}
    large = {i: f for i, f in fractions.items() if f > MAX_LESION_BRAIN_FRACTION}
    if large:
        shown = ", ".join(f"{i} ({f:.0%})" for i, f in sorted(large.items()))
        raise DataError(
            f"the lesion masks of {shown} cover more than {MAX_LESION_BRAIN_FRACTION:.0%} of the brain: this looks "
            "like a brain or tissue mask, not MS lesions; check the files with --list and choose the lesion file "
            "with --pattern mask=GLOB"
        )
    if training and cases and not any(c.lesion_voxels().size for c in cases):
        raise DataError(f"every training lesion mask is empty ({len(cases)} subjects); nothing to learn. "
                        "Check the files with --list and --pattern mask=GLOB")


def describe(root: Path, paths: CasePaths, case: Case) -> str:
    """A few lines for ``--list``: which file took which role, shape, spacing, lesion fraction."""
    def rel(path: Path | None) -> str:
        return "-" if path is None else (path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path))

    roles = {**paths.images, "mask": paths.mask, "brain_mask": paths.brain_mask}
    lines = [f"{case.id}:"] + [f"  {role:<10} {rel(path)}" for role, path in roles.items()]
    shape = "x".join(map(str, case.image.shape[1:]))
    spacing = "x".join(f"{s:g}" for s in case.spacing)
    summary = f"  (D, H, W) {shape} voxels of {spacing} mm"
    if case.label is not None:
        fraction = lesion_brain_fraction(case)
        summary += f"; lesions {case.lesion_voxels().size} voxels = {fraction:.2%} of the brain"
        if fraction > MAX_LESION_BRAIN_FRACTION:
            summary += " <- this looks like a brain or tissue mask, not MS lesions"
    return "\n".join(lines + [summary])
