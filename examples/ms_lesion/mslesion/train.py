"""Train a 3-D U-Net (plain, RSA or non-local) for MS-lesion segmentation, then evaluate it.

    python examples/ms_lesion/train.py                        # demo: synthetic cohort, CPU preset
    python examples/ms_lesion/train.py --data DIR --list      # which file took which role, then stop
    python examples/ms_lesion/train.py --data DIR --method rsa-101 --out runs/rsa-101
    python examples/ms_lesion/train.py --data DIR --out runs/rsa-101 --resume   # continue a killed run
    torchrun --nproc_per_node 2 examples/ms_lesion/train.py --data DIR         # several processes (DDP)

Adam lr 1e-3, weight decay 1e-5 and the exponentially weighted cross-entropy with r = mean lesion
fraction of the training subjects (RSANet, MICCAI 2019) in every preset; --preset sets the rest:

  preset  iterations  batch  crop          filters   lesion crops  lr schedule  augment  s/iteration (2 CPU cores)
  paper   800         4      32 128 128    32..512   0             constant     none     about 40 (a GPU preset)
  cpu     300         2      64 64 64      16..256   0.5           poly         light    0.9 (about 4.5 min)
  demo    150         2      32 64 64      4..64     0.5           constant     light    0.26

Default: demo without --data (the synthetic demo cohort is generated and cached); with --data, paper
on a CUDA device and cpu on the CPU (printed at the start). Explicit flags override single values.

The run folder (--out) gets: checkpoint.pt (latest, for --resume), model.pt (final), log.csv,
split.json, metrics.json, cases.csv, figure.png and predictions/<id>.npz (test-subject masks).
An --out that holds a run is refused unless --resume (same options) or --overwrite.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from .data.augment import AUGMENTATIONS
from .cli import (
    Parser, add_amp_option, add_data_options, add_inference_options, add_runtime_options, command, data_options,
    list_cases,
)
from .config import LR_SCHEDULES, PRESETS, TrainingConfig, parse_attention_scale, parse_filters
from .data.reading import CENTRES
from .model.loss import LOSSES, WEIGHTINGS
from .model.unet import FILTER_PRESETS, METHODS
from .run import UsageError
from .training.runtime import select_device
from .training.loop import run_training

# Each default lives in TrainingConfig (or PRESETS); the parser's defaults are None, "not given".
DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainingConfig) if f.default is not dataclasses.MISSING}


def _default(name: str) -> str:
    return f"(default: {DEFAULTS[name]})"


def _preset_default(key: str) -> str:
    show = (lambda v: " ".join(map(str, v))) if isinstance(PRESETS["paper"][key], tuple) else str
    return "(default: from --preset: " + ", ".join(f"{name} {show(v[key])}" for name, v in PRESETS.items()) + ")"


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(__doc__)
    parser.add_argument("--data", default=None, help="dataset folder (subject folders or nnU-Net layout); "
                        "default: generate the synthetic demo cohort in the cache and train the demo preset")
    parser.add_argument("--split", default=None, help="split JSON {'train': [ids], 'test': [ids]} (experiment.py "
                        "writes these); default: a random split with --test-fraction")
    parser.add_argument("--test-fraction", type=float, default=None,
                        help="held-out fraction of subjects when no --split is given (default: 23/43, the paper)")
    add_data_options(parser)
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="the values below that are not given (see the table above; default: demo without "
                        "--data, else paper on CUDA and cpu on the CPU)")
    add_model_options(parser.add_argument_group("model"))
    add_training_options(parser.add_argument_group("training"))
    add_run_options(parser.add_argument_group("run"))
    return parser


def add_model_options(model: argparse._ArgumentGroup) -> None:
    """``--method --filters --attention-scale``."""
    model.add_argument("--method", choices=METHODS, default=None, help=f"network {_default('method')}")
    model.add_argument("--filters", default=None, help=f"filter preset {sorted(FILTER_PRESETS)} or comma-separated "
                       f"ints {_preset_default('filters')}")
    model.add_argument("--attention-scale", default=None, help="RSA logit scale: none (the paper), 'auto' "
                       "(1/sqrt(C*H*W)) or a positive float (default: none)")


def add_training_options(train: argparse._ArgumentGroup) -> None:
    """The optimisation: iterations, batch, crops, learning rate, decay, loss, seed."""
    train.add_argument("--iterations", type=int, default=None, help=f"optimiser steps {_preset_default('iterations')}")
    train.add_argument("--batch-size", type=int, default=None,
                       help=f"crops per step, over all processes {_preset_default('batch_size')}")
    train.add_argument("--crop", type=int, nargs=3, default=None, metavar=("D", "H", "W"),
                       help=f"crop size, also the inference tile; multiples of 16 {_preset_default('crop')}")
    train.add_argument("--lr", type=float, default=None, help=f"Adam learning rate {_default('lr')}")
    train.add_argument("--lr-schedule", choices=LR_SCHEDULES, default=None, help="constant, or nnU-Net's polynomial "
                       f"decay lr*(1-i/iterations)^0.9 {_preset_default('lr_schedule')}")
    train.add_argument("--weight-decay", type=float, default=None, help=f"Adam weight decay {_default('weight_decay')}")
    train.add_argument("--attention-weight-decay", type=float, default=None,
                       help="Adam weight decay of the attention blocks; the paper's 1e-5 collapses an RSA block "
                       f"that starts as the identity (docs/ms_lesion_training.md) {_default('attention_weight_decay')}")
    train.add_argument("--loss-weights", choices=WEIGHTINGS, default=None,
                       help="cross-entropy class weights: 'swapped' (lesion e^(1-r)/..., measured better, see "
                       "docs/ms_lesion_training.md), 'literal' (the paper's formula as printed) or 'none' "
                       f"{_default('loss_weights')}")
    train.add_argument("--loss", choices=LOSSES, default=None,
                       help="ce: the paper's class-weighted cross-entropy; dice-ce: nnU-Net's soft Dice of the lesion "
                       f"class plus that cross-entropy {_default('loss')}")
    train.add_argument("--lesion-crop-fraction", type=float, default=None, help="probability that a crop is centred "
                       f"on a lesion voxel {_preset_default('lesion_crop_fraction')}")
    train.add_argument("--crop-centre", choices=CENTRES, default=None,
                       help=f"other crops are centred on a random brain voxel or anywhere {_default('crop_centre')}")
    train.add_argument("--augment", choices=AUGMENTATIONS, default=None,
                       help="augmentation of each crop (batchgeneratorsv2): none (the paper's plain random crops), "
                       "light (mirroring, intensity), default (nnU-Net's default transforms), heavy (more often, "
                       f"stronger, elastic) {_preset_default('augment')}")
    train.add_argument("--ema", type=float, default=None, metavar="DECAY",
                       help="keep an exponential moving average of the weights with this decay (e.g. 0.98) and "
                       f"save and evaluate it instead of the last weights; 0 = the last weights {_default('ema')}")
    train.add_argument("--no-prior-start", dest="prior_start", action="store_const", const=False, default=None,
                       help="start the output layer at p(lesion) = 0.5 instead of at the weighted lesion prior "
                       "(the prior start is a departure from the paper that saves hundreds of iterations)")
    train.add_argument("--seed", type=int, default=None, help=f"seed of the weights, the crops and the split "
                       f"{_default('seed')}")


def add_run_options(run: argparse._ArgumentGroup) -> None:
    """Where the run goes and how it runs: folder, resume, checkpoints, validation, device, threads."""
    run.add_argument("--out", default=None, help="run folder (default: runs/<method>)")
    run.add_argument("--resume", action="store_const", const=True, default=None,
                     help="continue from <out>/checkpoint.pt (same options)")
    run.add_argument("--overwrite", action="store_const", const=True, default=None,
                     help="replace the run in --out (removes only the files a run writes)")
    run.add_argument("--checkpoint-every", type=int, default=None,
                     help=f"iterations between checkpoints {_default('checkpoint_every')}")
    run.add_argument("--val-every", type=int, default=None, help="iterations between evaluations of the held-out "
                     f"subjects, 0 = only at the end {_preset_default('val_every')}")
    add_inference_options(run)
    add_runtime_options(run)
    add_amp_option(run, "auto: on CUDA bf16 where supported, else fp16; on the CPU bf16 where the CPU executes it "
                   "natively (AVX-512 BF16 or AMX), else float32; none: float32; fp16 is refused on the CPU; the run "
                   f"records the choice {_default('amp')}")
    run.add_argument("--stop-at", type=int, default=None,
                     help="stop after this iteration as if killed (checkpoint written): for testing --resume")
    run.add_argument("--no-progress", dest="progress", action="store_const", const=False, default=None,
                     help="no progress bar")


def choose_preset(preset: str | None, data_given: bool, device_type: str) -> tuple[str, str]:
    """The preset of a run and why: ``--preset``, else demo without ``--data``, else by the device."""
    if preset is not None:
        return preset, "--preset"
    if not data_given:
        return "demo", "no --data: the synthetic demo"
    if device_type == "cuda":
        return "paper", "--data on CUDA: the paper's protocol"
    return "cpu", "--data on the CPU: the CPU preset (--preset paper for the paper's protocol, about 9 h here)"


def make_config(args: argparse.Namespace) -> tuple[TrainingConfig, str]:
    """The run's one configuration from the parsed flags, the preset and the environment, and why that preset.

    Raises:
        UsageError: a value that cannot work, named by its flag.
    """
    device = select_device(args.device, int(os.environ.get("LOCAL_RANK", "0")))
    preset, why = choose_preset(args.preset, args.data is not None, device.type)
    given = {name: getattr(args, name) for name in (
        "method", "iterations", "batch_size", "crop", "lr", "lr_schedule", "weight_decay", "attention_weight_decay",
        "loss", "loss_weights", "ema", "lesion_crop_fraction", "crop_centre", "augment", "prior_start", "seed",
        "test_fraction", "resume", "overwrite", "checkpoint_every", "val_every", "amp", "stop_at", "progress", "threads",
        "overlap")}
    values = {**PRESETS[preset], **{k: v for k, v in given.items() if v is not None}}
    if args.data is None:
        from .synthetic.cohort import default_cache_dir  # only the demo needs the generator

        data, demo = default_cache_dir() / "demo-cohort", True
    elif not Path(args.data).is_dir():
        raise UsageError(f"--data {args.data} does not exist or is not a folder")
    else:
        data, demo = Path(args.data), False
    method = values.get("method", DEFAULTS["method"])
    config = TrainingConfig(
        **{**values, "crop": tuple(values["crop"]), "filters": parse_filters(args.filters or values["filters"])},
        data=str(data.resolve()), demo_cohort=demo, data_options=data_options(args), preset=preset,
        attention_scale=parse_attention_scale(args.attention_scale), split_file=args.split,
        out=args.out or str(Path("runs") / method), device=str(device), malloc_tuning=not args.no_malloc_tuning,
    )
    return config, why


@command
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.list:
        if args.data is None:
            raise UsageError("--list needs --data")
        return list_cases(args.data, data_options(args), require_mask=True)
    config, why = make_config(args)
    print(f"preset {config.preset} ({why})")
    run_training(config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
