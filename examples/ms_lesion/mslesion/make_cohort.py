"""Write the synthetic MS cohort to disk.

Usage::

    python examples/ms_lesion/make_cohort.py --out DIR [--subjects 43] [--small | --preset {paper,demo,small,mni}]
                                             [--seed 0] [--anatomy auto|mni152|phantom] [--no-montage]
                                             [--layout subject-folders|nnunet] [--randomise | --no-randomise]

A non-empty ``--out`` that holds no cohort written by this script is refused; regenerating a cohort
deletes only the files it wrote.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence

from .cli import Parser, command
from .run import check_writable
from .synthetic.cohort import ANATOMIES, COHORT_LAYOUTS, MONTAGE_NAME, COHORT_PRESETS, default_cache_dir, make_cohort


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        "Generate a synthetic multiple-sclerosis cohort (T1, T2, FLAIR, lesion mask, brain mask "
        "per subject, NIfTI), in one folder per subject or as an nnU-Net v2 raw dataset.",
    )
    parser.add_argument(
        "--out", default=None,
        help=f"output folder (default: {default_cache_dir()}/cohort-<preset>-seed<seed>; "
        "$SLICEATTN_CACHE changes the base)",
    )
    parser.add_argument("--subjects", type=int, default=43, help="number of subjects (default 43, the paper's)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--preset", choices=sorted(COHORT_PRESETS), default="paper",
        help="paper: 0.7x0.7x3 mm, ~50x320x245 voxels (default); demo: 2x2x3 mm, ~44x104x88, for a CPU "
        "demo; small: 4x4x6 mm, 20x56x48, for tests; mni: the 1 mm MNI grid, 182x218x182, skull-stripped",
    )
    group.add_argument("--small", action="store_const", const="small", dest="preset", help="same as --preset small")
    parser.add_argument("--seed", type=int, default=0, help="random seed; same seed, same cohort (default 0)")
    parser.add_argument(
        "--anatomy", choices=ANATOMIES, default="auto",
        help="mni152: the ICBM152 2009 template packaged with nilearn; phantom: a procedural head; "
        "auto: mni152 if nilearn is installed (default)",
    )
    parser.add_argument("--layout", choices=COHORT_LAYOUTS, default="subject-folders",
                        help="subject-folders: <out>/<id>/{t1,t2,flair,mask,brain_mask}.nii.gz (default); nnunet: "
                        "an nnU-Net v2 raw dataset, imagesTr/<id>_0000..0002 (FLAIR, T1, T2), labelsTr, dataset.json")
    parser.add_argument("--randomise", action=argparse.BooleanOptionalAction, default=None,
                        help="draw each subject's contrasts, texture, lesion appearance, non-lesion hyperintensities, "
                        "blur, bias, noise, artefacts and intensity clipping at random, as SynthSeg does (default: "
                        f"the preset's: {', '.join(sorted(n for n, p in COHORT_PRESETS.items() if p.randomise))} randomise)")
    parser.add_argument("--no-montage", action="store_true", help=f"do not write {MONTAGE_NAME}")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.subjects < 1:
        parser.error(f"--subjects must be >= 1, got {args.subjects}")
    return args


@command
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    out = args.out or default_cache_dir() / f"cohort-{args.preset}-seed{args.seed}"
    check_writable(out)
    start = time.perf_counter()
    out = make_cohort(out, subjects=args.subjects, preset=args.preset, seed=args.seed, anatomy=args.anatomy,
                      montage=not args.no_montage, layout=args.layout, randomise=args.randomise)
    record = json.loads((out / "cohort.json").read_text())
    stats = record["stats"].values()
    fraction = sum(s["lesion_fraction"] for s in stats) / len(stats)
    print(f"cohort: {out} ({len(stats)} subjects, preset {args.preset}, anatomy {record['params']['anatomy']}, "
          f"layout {args.layout}, seed {args.seed}, {'randomised' if record['params']['randomise'] else 'fixed'} "
          f"appearance; mean lesion fraction {fraction:.2e}; "
          f"{time.perf_counter() - start:.1f} s)")
    if not args.no_montage:
        print(f"montage: {out / MONTAGE_NAME}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
