"""Train a 3-D U-Net (plain, RSA or non-local) for MS-lesion segmentation, then evaluate it.

    python examples/ms_lesion/train.py                        # the demo: synthetic demo cohort, demo preset
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
split.json, metrics.json, cases.csv, figure.png, attention.png (RSA methods: where the first RSA
block looks from a held-out lesion) and predictions/<id>.npz (test-subject masks). An --out that
holds a run is refused unless --resume (same options) or --overwrite (removes exactly these files).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from .cli import Parser, add_training_arguments, command, data_options, list_cases, make_config
from .config import TrainingConfig
from .run import UsageError
from .training.loop import run_training

def build_parser() -> argparse.ArgumentParser:
    parser = Parser(__doc__)
    add_training_arguments(parser)
    # experiment.py's child process: the TrainingConfig.record() it built with make_config, as JSON on stdin
    parser.add_argument("--run-config", choices=["-"], default=None, help=argparse.SUPPRESS)
    return parser


def recorded_run_config(argv: Sequence[str] | None) -> TrainingConfig:
    """The configuration ``experiment.py`` sends on stdin (``--run-config -``, given alone)."""
    if len(sys.argv[1:] if argv is None else argv) != 2:
        raise UsageError("--run-config is experiment.py's internal option and takes no other flag")
    return TrainingConfig.from_record(json.load(sys.stdin))


@command
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.run_config:
        run_training(recorded_run_config(argv))
        return 0
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
