"""Train a 3-D U-Net (plain, RSA or non-local) for MS-lesion segmentation, then evaluate it.

    python examples/ms_lesion/train.py                        # demo: synthetic cohort, CPU preset
    python examples/ms_lesion/train.py --data DIR --list      # which file took which role, then stop
    python examples/ms_lesion/train.py --data DIR --method rsa-101 --out runs/rsa-101
    python examples/ms_lesion/train.py --data DIR --out runs/rsa-101 --resume   # continue a killed run
    torchrun --nproc_per_node 2 examples/ms_lesion/train.py --data DIR         # several processes (DDP)

Adam lr 1e-3, weight decay 1e-5 and the exponentially weighted cross-entropy with r = mean lesion
fraction of the training subjects (RSANet, MICCAI 2019) in every preset; --preset sets the rest:

  preset  iterations  batch  crop          filters   lesion crops  lr schedule  s/iteration (2 CPU cores)
  paper   800         4      32 128 128    32..512   0             constant     about 40 (a GPU preset)
  cpu     300         2      64 64 64      16..256   0.5           poly         1.6 (about 8 min)
  demo    150         2      32 64 64      4..64     0.5           constant     0.26

Default: demo without --data (the synthetic demo cohort is generated and cached); with --data, paper
on a CUDA device and cpu on the CPU (printed at the start). Explicit flags override single values.

The run folder (--out) gets: checkpoint.pt (latest, for --resume), model.pt (final), log.csv,
split.json, metrics.json, cases.csv, figure.png and predictions/<id>.npz (test-subject masks).
An --out that holds a run is refused unless --resume (same options) or --overwrite.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from cli import (
    Parser, add_data_options, add_inference_options, add_runtime_options, command, data_options, list_cases,
    select_device,
)
from loss import WEIGHTINGS
from model import FILTER_PRESETS, METHODS
from run import UsageError
from training import LR_SCHEDULES, PRESETS, choose_preset, run_training


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(__doc__)

    def profile(key: str) -> str:
        show = (lambda v: " ".join(map(str, v))) if isinstance(PRESETS["paper"][key], tuple) else str
        return "(default: from --preset: " + ", ".join(f"{name} {show(v[key])}" for name, v in PRESETS.items()) + ")"

    parser.add_argument("--data", default=None, help="dataset folder (subject folders or nnU-Net layout); "
                        "default: generate the synthetic demo cohort in the cache and train the demo preset")
    parser.add_argument("--split", default=None, help="split JSON {'train': [ids], 'test': [ids]} (experiment.py "
                        "writes these); default: a random split with --test-fraction")
    parser.add_argument("--test-fraction", type=float, default=23 / 43,
                        help="held-out fraction of subjects when no --split is given (default: 23/43, the paper)")
    add_data_options(parser)
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="the values below that are not given (see the table above; default: demo without "
                        "--data, else paper on CUDA and cpu on the CPU)")
    model = parser.add_argument_group("model")
    model.add_argument("--method", choices=METHODS, default="rsa-010", help="network (default: rsa-010)")
    model.add_argument("--filters", default=None, help=f"filter preset {sorted(FILTER_PRESETS)} or comma-separated "
                       f"ints {profile('filters')}")
    model.add_argument("--attention-scale", default=None, help="RSA logit scale: none (the paper), 'auto' "
                       "(1/sqrt(C*H*W)) or a float (default: none)")
    train = parser.add_argument_group("training")
    train.add_argument("--iterations", type=int, default=None, help=f"optimiser steps {profile('iterations')}")
    train.add_argument("--batch-size", type=int, default=None,
                       help=f"crops per step, over all processes {profile('batch_size')}")
    train.add_argument("--crop", type=int, nargs=3, default=None, metavar=("D", "H", "W"),
                       help=f"crop size, also the inference tile; multiples of 16 {profile('crop')}")
    train.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default: 1e-3)")
    train.add_argument("--lr-schedule", choices=LR_SCHEDULES, default=None,
                       help=f"constant, or nnU-Net's polynomial decay lr*(1-i/iterations)^0.9 {profile('lr_schedule')}")
    train.add_argument("--weight-decay", type=float, default=1e-5, help="Adam weight decay (default: 1e-5)")
    train.add_argument("--attention-weight-decay", type=float, default=0.0,
                       help="Adam weight decay of the attention blocks; the paper's 1e-5 collapses an RSA block "
                       "that starts as the identity (docs/ms_lesion_training.md) (default: 0)")
    train.add_argument("--loss-weights", choices=WEIGHTINGS, default="swapped",
                       help="cross-entropy class weights: 'swapped' (lesion e^(1-r)/..., measured better, see "
                       "docs/ms_lesion_training.md), 'literal' (the paper's formula as printed) or 'none' "
                       "(default: swapped)")
    train.add_argument("--lesion-crop-fraction", type=float, default=None,
                       help=f"probability that a crop is centred on a lesion voxel {profile('lesion_crop_fraction')}")
    train.add_argument("--crop-centre", choices=("brain", "anywhere"), default="brain",
                       help="other crops are centred on a random brain voxel or anywhere (default: brain)")
    train.add_argument("--no-prior-start", dest="prior_start", action="store_false",
                       help="start the output layer at p(lesion) = 0.5 instead of at the weighted lesion prior "
                       "(the prior start is a departure from the paper that saves hundreds of iterations)")
    train.add_argument("--seed", type=int, default=0, help="seed of the weights, the crops and the split (default: 0)")
    run = parser.add_argument_group("run")
    run.add_argument("--out", default=None, help="run folder (default: runs/<method>)")
    run.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt (same options)")
    run.add_argument("--overwrite", action="store_true",
                     help="replace the run in --out (removes only the files a run writes)")
    run.add_argument("--checkpoint-every", type=int, default=50, help="iterations between checkpoints (default: 50)")
    run.add_argument("--val-every", type=int, default=None,
                     help=f"iterations between evaluations of the held-out subjects, 0 = only at the end "
                     f"{profile('val_every')}")
    add_inference_options(run)
    add_runtime_options(run)
    run.add_argument("--amp", choices=("auto", "bf16", "fp16", "none"), default="auto",
                     help="CUDA autocast dtype; auto = bf16 where supported, else fp16; ignored on CPU (default: auto)")
    run.add_argument("--stop-at", type=int, default=None,
                     help="stop after this iteration as if killed (checkpoint written): for testing --resume")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the preset's defaults (``choose_preset``), say which preset and why, and check the values."""
    args.preset, why = choose_preset(args, select_device(args.device))
    if not args.list:
        print(f"preset {args.preset} ({why})")
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if isinstance(args.filters, str) and args.filters not in FILTER_PRESETS:
        try:
            args.filters = [int(v) for v in args.filters.split(",")]
        except ValueError:
            raise UsageError(f"--filters {args.filters!r}: give a preset {sorted(FILTER_PRESETS)} or "
                             "comma-separated ints such as 16,32,64,128,256") from None
        if len(args.filters) < 2 or min(args.filters) < 1:
            raise UsageError(f"--filters needs at least two positive ints (one per level), got {args.filters}")
    if args.attention_scale not in (None, "none", "auto"):
        try:
            args.attention_scale = float(args.attention_scale)
        except ValueError:
            raise UsageError(f"--attention-scale must be none, auto or a number, got {args.attention_scale!r}") from None
    if args.attention_scale == "none":
        args.attention_scale = None
    args.crop = tuple(args.crop)
    for name in ("iterations", "batch_size", "checkpoint_every"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 0.0 <= args.lesion_crop_fraction <= 1.0:
        raise UsageError(f"--lesion-crop-fraction must be in [0, 1], got {args.lesion_crop_fraction}")
    if args.data is not None and not Path(args.data).is_dir():
        raise UsageError(f"--data {args.data} does not exist or is not a folder")
    if args.out is None:
        args.out = str(Path("runs") / args.method)
    return args


@command
def main(argv: Sequence[str] | None = None) -> int:
    args = resolve(build_parser().parse_args(argv))
    if args.list:
        if args.data is None:
            raise UsageError("--list needs --data")
        return list_cases(args.data, data_options(args), require_mask=True)
    run_training(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
