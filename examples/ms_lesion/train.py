"""Train a 3-D U-Net (plain, RSA or non-local) for MS-lesion segmentation, then evaluate it.

    python examples/ms_lesion/train.py                        # demo: synthetic cohort, CPU preset
    python examples/ms_lesion/train.py --data DIR --method rsa-101 --out runs/rsa-101
    python examples/ms_lesion/train.py --data DIR --out runs/rsa-101 --resume   # continue a killed run
    torchrun --nproc_per_node 2 examples/ms_lesion/train.py --data DIR         # several processes (DDP)

Defaults follow the paper (RSANet, MICCAI 2019): Adam lr 1e-3, weight decay 1e-5, batch 4, fixed-size
random crops, 800 iterations, exponentially weighted cross-entropy with r = mean lesion fraction of
the training subjects, filters 32..512. Without --data the synthetic "demo" cohort is generated
(cached) and a small CPU preset is trained instead (the "demo without --data" values in --help).

The run folder (--out) gets: checkpoint.pt (latest, for --resume), model.pt (final), log.csv,
split.json, metrics.json, cases.csv, figure.png and predictions/<id>.npz (test-subject masks).
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from data import MODALITIES, Case, load_dataset, mean_lesion_fraction, sample_crop
from evaluate import evaluate_cases, read_split, write_csv, write_json
from figures import save_comparison
from inference import add_inference_options, select_device
from loss import WEIGHTINGS, WeightedCrossEntropy, class_weights
from model import FILTER_PRESETS, METHODS, build_model, model_config, save_atomically, set_output_prior

# Settings that differ between the paper defaults and the no-data demo. Everything else is shared.
PAPER: dict[str, Any] = {
    "iterations": 800, "batch_size": 4, "crop": (32, 128, 128), "filters": "paper",
    "lesion_crop_fraction": 0.0, "val_every": 200,
}
DEMO: dict[str, Any] = {
    "iterations": 150, "batch_size": 2, "crop": (32, 64, 64), "filters": "tiny",
    "lesion_crop_fraction": 0.5, "val_every": 75,
}
DEMO_SUBJECTS = 12
LOG_FIELDS = ("iteration", "loss", "seconds", "val_sample_dice", "val_voxel_dice", "val_voxel_lesion_f1")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)

    def profile(key: str) -> str:
        paper, demo = PAPER[key], DEMO[key]
        show = (lambda v: " ".join(map(str, v))) if isinstance(paper, tuple) else str
        return f"(default: {show(paper)}; demo without --data: {show(demo)})"

    data = parser.add_argument_group("data")
    data.add_argument("--data", default=None, help="dataset folder (subject folders or nnU-Net layout); "
                      "default: generate the synthetic demo cohort in the cache and train the demo preset")
    data.add_argument("--modalities", nargs="+", default=list(MODALITIES), help="input channels (default: t1 t2 flair)")
    data.add_argument("--split", default=None, help="split JSON {'train': [ids], 'test': [ids]} (experiment.py writes "
                      "these); default: a random split with --test-fraction")
    data.add_argument("--test-fraction", type=float, default=23 / 43,
                      help="held-out fraction of subjects when no --split is given (default: 23/43, the paper)")
    data.add_argument("--label2", choices=("error", "ignore", "lesion"), default="error",
                      help="what a mask value 2 means (default: error)")
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
                       help=f"crop size, also the inference tile {profile('crop')}")
    train.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default: 1e-3)")
    train.add_argument("--weight-decay", type=float, default=1e-5, help="Adam weight decay (default: 1e-5)")
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
    run.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt")
    run.add_argument("--checkpoint-every", type=int, default=50, help="iterations between checkpoints (default: 50)")
    run.add_argument("--val-every", type=int, default=None,
                     help=f"iterations between evaluations of the held-out subjects, 0 = only at the end "
                     f"{profile('val_every')}")
    add_inference_options(run)
    run.add_argument("--amp", choices=("auto", "bf16", "fp16", "none"), default="auto",
                     help="CUDA autocast dtype; auto = bf16 where supported, else fp16; ignored on CPU (default: auto)")
    run.add_argument("--stop-at", type=int, default=None,
                     help="stop after this iteration as if killed (checkpoint written): for testing --resume")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the profile-dependent defaults (paper, or demo without --data) and check the values."""
    profile = PAPER if args.data else DEMO
    for key, value in profile.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if isinstance(args.filters, str) and args.filters not in FILTER_PRESETS:
        args.filters = [int(v) for v in args.filters.split(",")]
    if args.attention_scale not in (None, "none", "auto"):
        args.attention_scale = float(args.attention_scale)
    if args.attention_scale == "none":
        args.attention_scale = None
    args.crop = tuple(args.crop)
    for name in ("iterations", "batch_size", "checkpoint_every"):
        if getattr(args, name) < 1:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.out is None:
        args.out = str(Path("runs") / args.method)
    return args


# -------------------------------------------------------------------------------------------- pieces


def amp_dtype(choice: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``--amp`` on ``device`` (None on the CPU or with ``none``)."""
    if device.type != "cuda" or choice == "none":
        return None
    if choice == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if choice == "bf16" else torch.float16


def random_split(ids: Sequence[str], test_fraction: float, seed: int) -> dict[str, list[str]]:
    """Seeded random split of subject ids into train and test (at least one training subject)."""
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction!r}")
    order = np.random.default_rng(seed).permutation(len(ids))
    n_test = min(len(ids) - 1, round(test_fraction * len(ids)))
    test = sorted(ids[i] for i in order[:n_test])
    return {"train": sorted(ids[i] for i in order[n_test:]), "test": test}


def batch_for(iteration: int, cases: Sequence[Case], args: argparse.Namespace, rank: int, world: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """This process's share of the global batch of ``iteration``.

    The crops of an iteration depend only on (seed, iteration): a resumed run sees the same data as an
    uninterrupted one, and the processes of a DDP run split one global batch.
    """
    rng = np.random.default_rng([args.seed, iteration])
    crops = []
    for _ in range(args.batch_size):
        case = cases[int(rng.integers(len(cases)))]
        crops.append(sample_crop(case, args.crop, rng, lesion_fraction=args.lesion_crop_fraction,
                                 centre=args.crop_centre))
    share = crops[rank * args.batch_size // world:(rank + 1) * args.batch_size // world]
    return (torch.from_numpy(np.stack([c[0] for c in share])), torch.from_numpy(np.stack([c[1] for c in share])))


def rng_state() -> dict[str, Any]:
    """The torch (CPU and CUDA), numpy and python RNG states, for the checkpoint."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what ``rng_state`` saved."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def peak_memory_mb(device: torch.device) -> tuple[float, str]:
    """Peak memory of this process: CUDA allocator peak on a GPU, else the peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda-allocated"
    try:
        import resource  # Unix only
    except ImportError:
        return float("nan"), "unavailable"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "cpu-max-rss"


def read_log(path: Path, up_to: int) -> list[dict[str, str]]:
    """The log rows up to iteration ``up_to`` (a resumed run drops what it will redo)."""
    if not path.is_file():
        return []
    with path.open(newline="") as handle:
        return [row for row in csv.DictReader(handle) if int(row["iteration"]) <= up_to]


def write_log(path: Path, log: Sequence[dict[str, Any]]) -> None:
    """The CSV log: one row per iteration, validation columns empty where not evaluated."""
    write_csv(path, [{k: row.get(k, "") for k in LOG_FIELDS} for row in log])


# ---------------------------------------------------------------------------------------------- main


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Run the training described by resolved ``args``; returns the final metrics (rank 0) or {}."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = select_device(args.device, int(os.environ.get("LOCAL_RANK", "0")))
    if args.batch_size % world:
        raise SystemExit(f"error: --batch-size {args.batch_size} must be divisible by the {world} processes")
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cpu":
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = False
    out = Path(args.out)
    main_process = rank == 0
    if main_process:
        out.mkdir(parents=True, exist_ok=True)

    if args.data is None:
        from synthetic import default_cache_dir, make_cohort  # only the demo needs the generator

        args.data = str(default_cache_dir() / "demo-cohort")
        if main_process:
            print(f"no --data: generating/using the synthetic demo cohort ({DEMO_SUBJECTS} subjects) in {args.data}")
            make_cohort(args.data, subjects=DEMO_SUBJECTS, preset="demo", seed=0, montage=False)
        if world > 1:
            dist.barrier()
    cases = load_dataset(args.data, modalities=args.modalities, label2=args.label2)
    ids = [c.id for c in cases]
    split = read_split(args.split) if args.split else random_split(ids, args.test_fraction, args.seed)
    missing = sorted(set(split["train"] + split["test"]) - set(ids))
    if missing:
        raise SystemExit(f"error: split ids {missing} are not in {args.data}")
    train_cases = [c for c in cases if c.id in set(split["train"])]
    test_cases = [c for c in cases if c.id in set(split["test"])]
    r = mean_lesion_fraction(train_cases)

    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    random.seed(args.seed)
    options = {"scale": args.attention_scale} if args.method.startswith("rsa") else {}
    config = model_config(args.method, in_channels=len(args.modalities), filters=args.filters,
                          attention_options=options)
    network = build_model(**config)
    if args.prior_start:
        # The constant prediction that minimises the weighted loss: p = w_l r / (w_l r + w_b (1 - r)).
        background, lesion = class_weights(r, args.loss_weights)
        set_output_prior(network, lesion * r / (lesion * r + background * (1 - r)))
    network = network.to(device)
    optimizer = torch.optim.Adam(network.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    dtype = amp_dtype(args.amp, device)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    criterion = WeightedCrossEntropy(r, args.loss_weights).to(device)
    meta = {"config": config, "crop": list(args.crop), "modalities": list(args.modalities), "r": r,
            "loss_weights": args.loss_weights, "args": {k: v for k, v in vars(args).items()}}

    start, elapsed = 0, 0.0
    checkpoint_path = out / "checkpoint.pt"
    if args.resume and checkpoint_path.is_file():
        state = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
        network.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        start, elapsed = state["iteration"], state["seconds"]
        if main_process:
            print(f"resuming {checkpoint_path} at iteration {start}")
    elif args.resume and main_process:
        print(f"--resume: no {checkpoint_path} yet, starting from scratch")
    model = DistributedDataParallel(network) if world > 1 else network
    log_path = out / "log.csv"
    log = read_log(log_path, start)

    def save_checkpoint(iteration: int) -> None:
        state = {**meta, "model": network.state_dict(), "optimizer": optimizer.state_dict(),
                 "scaler": scaler.state_dict(), "rng": rng_state(), "iteration": iteration, "seconds": elapsed}
        save_atomically(checkpoint_path, lambda tmp: torch.save(state, tmp))
        write_log(log_path, log)

    def validate() -> dict[str, float]:
        summary, _, _ = evaluate_cases(network, test_cases, args.crop, overlap=args.overlap, device=device,
                                       amp_dtype=dtype)
        network.train()
        return summary

    stop = min(args.iterations, args.stop_at or args.iterations)
    bar = tqdm(total=args.iterations, initial=start, disable=args.no_progress or not main_process,
               desc=args.method, dynamic_ncols=True)
    network.train()
    for iteration in range(start + 1, stop + 1):
        tick = time.perf_counter()
        image, label = batch_for(iteration, train_cases, args, rank, world)
        image, label = image.to(device, non_blocking=True), label.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            logits = model(image)
        loss = criterion(logits, label)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        elapsed += time.perf_counter() - tick
        row: dict[str, Any] = {"iteration": iteration, "loss": f"{loss.item():.6f}", "seconds": f"{elapsed:.2f}"}
        if main_process and test_cases and args.val_every and iteration % args.val_every == 0 and iteration < args.iterations:
            summary = validate()
            row.update({f"val_{k}": f"{summary[k]:.4f}" for k in ("sample_dice", "voxel_dice", "voxel_lesion_f1")})
            bar.set_postfix(loss=f"{loss.item():.4f}", dice=f"{summary['sample_dice']:.3f}")
        else:
            bar.set_postfix(loss=f"{loss.item():.4f}")
        log.append(row)
        bar.update(1)
        if main_process and (iteration % args.checkpoint_every == 0 or iteration == stop):
            save_checkpoint(iteration)
    bar.close()
    if world > 1:
        dist.barrier()
    result: dict[str, Any] = {}
    if main_process and stop == args.iterations:
        result = finish(args, out, network, meta, test_cases, split, elapsed, device, dtype, log)
    if world > 1:
        dist.destroy_process_group()
    return result


def finish(args: argparse.Namespace, out: Path, network: torch.nn.Module, meta: dict[str, Any],
           test_cases: Sequence[Case], split: dict[str, list[str]], elapsed: float, device: torch.device,
           dtype: torch.dtype | None, log: list[dict[str, Any]]) -> dict[str, Any]:
    """Write the final model, the held-out metrics, the predictions and the figure; print where."""
    peak, peak_kind = peak_memory_mb(device)
    model_path = out / "model.pt"
    save_atomically(model_path, lambda tmp: torch.save({**meta, "model": network.state_dict()}, tmp))
    write_json(out / "split.json", split)
    result: dict[str, Any] = {"method": args.method, "iterations": args.iterations, "train_seconds": elapsed,
                              "peak_memory_mb": peak, "peak_memory_kind": peak_kind, "r": meta["r"],
                              "loss_weights": args.loss_weights, "train": split["train"], "test": split["test"]}
    if test_cases:
        summary, rows, predictions = evaluate_cases(network, test_cases, args.crop, overlap=args.overlap,
                                                    device=device, amp_dtype=dtype)
        result["summary"] = summary
        log[-1].update({f"val_{k}": f"{summary[k]:.4f}" for k in ("sample_dice", "voxel_dice", "voxel_lesion_f1")})
        write_csv(out / "cases.csv", rows)
        for case_id, mask in predictions.items():
            save_atomically(out / "predictions" / f"{case_id}.npz", lambda tmp, m=mask: np.savez_compressed(tmp, mask=m))
        shown = max(test_cases, key=lambda c: int(np.count_nonzero(c.label == 1)))
        flair = shown.modalities.index("flair") if "flair" in shown.modalities else 0
        save_comparison(out / "figure.png", shown.image[flair], shown.label, {args.method: predictions[shown.id]},
                        title=shown.id)
    write_log(out / "log.csv", log)
    write_json(out / "metrics.json", result)
    print(f"model:   {model_path}")
    if test_cases:
        s = result["summary"]
        print(f"metrics: {out / 'metrics.json'} (held-out subjects: sample Dice {s['sample_dice']:.3f}, "
              f"voxel Dice {s['voxel_dice']:.3f}, lesion F1 {s['voxel_lesion_f1']:.3f})")
        print(f"figure:  {out / 'figure.png'}")
    print(f"log:     {out / 'log.csv'}  ({elapsed:.0f} s of training)")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    args = resolve(build_parser().parse_args(argv))
    train(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
