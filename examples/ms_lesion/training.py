"""Training as named steps: ``run_training`` reads the data, builds the model, then loops ``train_step``.

The shape of a run (nnU-Net's ``run_training`` without the class hierarchy)::

    prepare_out_folder -> load_training_data -> build_training -> resume_or_start
    -> for each iteration: train_step, on_iteration_end (log, validate, checkpoint) -> finish

Every option that changes the result is recorded in the checkpoint (``options``); ``--resume``
refuses a command whose options differ, listing the differences.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import os
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from cli import configure_runtime, data_options, select_device
from data import Case, DataOptions, check_lesion_masks, mean_lesion_fraction, resolve_normalisation, sample_crop
from figures import save_attention_figure, save_comparison
from inference import evaluate_cases, lesion_attention
from loss import WeightedCrossEntropy, class_weights
from model import build_model, model_config, read_checkpoint, set_output_prior, training_memory_bytes
from run import (
    UsageError, check_split, differences, random_split, read_split, remove_run, run_files, save_atomically,
    write_csv, write_json,
)
from sliceattn import NonLocal3d, RecurrentSliceAttention3d

# train.py --preset: the values an explicit flag does not set. "paper" is the paper's protocol (for a GPU);
# "cpu" the best measured configuration for 1 mm scans within 15 minutes on 2 CPU cores; "demo" the
# no-data demo. docs/ms_lesion_training.md ("CPU or GPU") has the measurements that chose them.
PRESETS: dict[str, dict[str, Any]] = {
    "paper": {"iterations": 800, "batch_size": 4, "crop": (32, 128, 128), "filters": "paper",
              "lesion_crop_fraction": 0.0, "val_every": 200, "lr_schedule": "constant"},
    "cpu": {"iterations": 300, "batch_size": 2, "crop": (64, 64, 64), "filters": "half",
            "lesion_crop_fraction": 0.5, "val_every": 0, "lr_schedule": "poly"},
    "demo": {"iterations": 150, "batch_size": 2, "crop": (32, 64, 64), "filters": "tiny",
             "lesion_crop_fraction": 0.5, "val_every": 75, "lr_schedule": "constant"},
}
LR_SCHEDULES: tuple[str, ...] = ("constant", "poly")
DEMO_SUBJECTS = 12
LOG_FIELDS = ("iteration", "loss", "seconds", "val_sample_dice", "val_voxel_dice", "val_voxel_lesion_f1")
# Options that cannot change the trained weights or the metrics: they may differ on --resume.
NEUTRAL_OPTIONS = frozenset({"no_progress", "checkpoint_every", "stop_at", "resume", "overwrite", "list", "device",
                             "preset", "threads", "no_malloc_tuning",
                             "val_every", "out", "iterations", "data", "layout", "pattern", "resample", "label2",
                             "modalities", "normalisation"})


@dataclass
class Run:
    """Everything a training run holds while it goes."""

    args: argparse.Namespace
    out: Path
    device: torch.device
    rank: int
    world: int
    train_cases: list[Case]
    test_cases: list[Case]
    split: dict[str, list[str]]
    network: nn.Module
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    criterion: WeightedCrossEntropy
    amp_dtype: torch.dtype | None
    meta: dict[str, Any]
    start: int = 0
    elapsed: float = 0.0
    log: list[dict[str, Any]] = field(default_factory=list)

    @property
    def main_process(self) -> bool:
        return self.rank == 0


# ------------------------------------------------------------------------------------------------ setup


def choose_preset(args: argparse.Namespace, device: torch.device) -> tuple[str, str]:
    """The preset of a run and why: ``--preset``, else demo without ``--data``, else by the device."""
    if args.preset is not None:
        return args.preset, "--preset"
    if args.data is None:
        return "demo", "no --data: the synthetic demo"
    if device.type == "cuda":
        return "paper", f"--data on {device}: the paper's protocol"
    return "cpu", "--data on the CPU: the CPU preset (--preset paper for the paper's protocol, about 9 h here)"


def learning_rate(args: argparse.Namespace, iteration: int) -> float:
    """The learning rate of ``iteration`` (1-based): constant, or nnU-Net's polynomial decay
    ``lr * (1 - (iteration - 1) / iterations) ** 0.9``."""
    if args.lr_schedule == "poly":
        return args.lr * (1.0 - (iteration - 1) / args.iterations) ** 0.9
    return args.lr


def amp_dtype(choice: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``--amp`` on ``device`` (None on the CPU or with ``none``)."""
    if device.type != "cuda" or choice == "none":
        return None
    if choice == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if choice == "bf16" else torch.float16


def recorded_options(args: argparse.Namespace, data: DataOptions, split: dict[str, list[str]]) -> dict[str, Any]:
    """The options that change the result, as recorded in the checkpoint and compared on ``--resume``."""
    options = {k: v for k, v in vars(args).items() if k not in NEUTRAL_OPTIONS}
    options["crop"] = list(options["crop"])
    options["filters"] = options["filters"] if isinstance(options["filters"], str) else list(options["filters"])
    return {**options, "data": str(Path(args.data).resolve()), **data.record(), "split": split}


def prepare_out_folder(args: argparse.Namespace, main_process: bool) -> Path:
    """Check ``--out`` against ``--resume``/``--overwrite`` before any work; ``--overwrite`` removes the old run.

    Raises:
        UsageError: the folder holds a run and neither flag says what to do with it.
    """
    out = Path(args.out)
    if args.resume and args.overwrite:
        raise UsageError("--resume and --overwrite contradict each other: continue the run or replace it")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a folder")
    existing = run_files(out)
    has_checkpoint = (out / "checkpoint.pt").is_file()
    if existing and not (args.resume or args.overwrite):
        raise UsageError(f"--out {out} already holds a run ({', '.join(p.name for p in existing[:4])}); continue it "
                         "with --resume, replace it with --overwrite, or choose another --out")
    if args.resume and existing and not has_checkpoint:
        raise UsageError(f"--resume: {out} holds run files but no checkpoint.pt to continue from; use --overwrite")
    if args.overwrite and main_process:
        remove_run(out)
    return out


def check_crop(config: dict[str, Any], crop: Sequence[int], batch_size: int, device: torch.device) -> None:
    """Refuse a crop the U-Net cannot take, or one whose training step cannot fit in memory."""
    divisor = 2 ** (len(config["filters"]) - 1)
    if any(c % divisor for c in crop):
        raise UsageError(f"--crop {' '.join(map(str, crop))}: every size must be a multiple of {divisor} "
                         f"(2**{len(config['filters']) - 1} for {len(config['filters'])} levels), e.g. "
                         f"{' '.join(str(max(divisor, c // divisor * divisor)) for c in crop)}")
    need = training_memory_bytes(config, crop, batch_size)
    if device.type == "cuda":
        have, where = torch.cuda.get_device_properties(device).total_memory, f"{device} memory"
    else:
        have, where = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this machine's memory"
    if need > have:
        raise UsageError(f"--crop {' '.join(map(str, crop))} with --batch-size {batch_size} and filters "
                         f"{config['filters']} needs at least {need / 2**30:.1f} GiB for training, more than "
                         f"{where} ({have / 2**30:.1f} GiB); use a smaller --crop, --batch-size or --filters")


def load_training_data(args: argparse.Namespace, main_process: bool
                       ) -> tuple[DataOptions, list[Case], list[Case], dict[str, list[str]]]:
    """Resolve the data options, read the subjects, draw or read the split, and check the masks."""
    if args.data is None:
        from synthetic import default_cache_dir, make_cohort  # only the demo needs the generator

        args.data = str(default_cache_dir() / "demo-cohort")
        if main_process:
            print(f"no --data: generating/using the synthetic demo cohort ({DEMO_SUBJECTS} subjects) in {args.data}")
            make_cohort(args.data, subjects=DEMO_SUBJECTS, preset="demo", seed=0, montage=False)
        if dist.is_initialized():
            dist.barrier()
    options = data_options(args)
    found = options.find(args.data)
    ids = [p.id for p in found]
    split = read_split(args.split) if args.split else random_split(ids, args.test_fraction, args.seed)
    check_split(split, ids, args.split or "drawn with --test-fraction")
    train_ids = set(split["train"])
    training = [p for p in found if p.id in train_ids]
    options = dataclasses.replace(options, normalisation=resolve_normalisation(options.normalisation, training))
    wanted = train_ids | set(split["test"])
    cases = [options.load(p) for p in found if p.id in wanted]
    train_cases = [c for c in cases if c.id in train_ids]
    check_lesion_masks(train_cases)
    return options, train_cases, [c for c in cases if c.id in set(split["test"])], split


def parameter_groups(network: nn.Module, weight_decay: float, attention_weight_decay: float) -> list[dict[str, Any]]:
    """Adam parameter groups: the attention blocks' parameters get their own weight decay.

    An RSA block starts as the identity (gates ``alpha = 0``), so its projections get exactly zero
    gradient until a gate moves. Adam's weight decay is an L2 term added to the gradient, which Adam
    then normalises: a parameter whose only gradient is ``wd * w`` moves by about the learning rate
    per step towards 0 whatever ``wd`` is. With the paper's 1e-5 the projections collapsed from 0.06 to
    about 1e-8 within 300 steps and the gates never left 0: the block stayed the identity.
    """
    attention = {id(p) for m in network.modules() if isinstance(m, (RecurrentSliceAttention3d, NonLocal3d))
                 for p in m.parameters()}
    rest = [p for p in network.parameters() if id(p) not in attention]
    blocks = [p for p in network.parameters() if id(p) in attention]
    return [{"params": rest, "weight_decay": weight_decay},
            {"params": blocks, "weight_decay": attention_weight_decay}]


def build_training(args: argparse.Namespace, options: DataOptions, train_cases: Sequence[Case],
                   device: torch.device, distributed: bool
                   ) -> tuple[nn.Module, torch.optim.Optimizer, torch.amp.GradScaler, WeightedCrossEntropy,
                              dict[str, Any]]:
    """The network (seeded, prior-started), optimiser, gradient scaler, loss and the checkpoint metadata."""
    r = mean_lesion_fraction(train_cases)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    random.seed(args.seed)
    attention = {"scale": args.attention_scale} if args.method.startswith("rsa") else {}
    config = model_config(args.method, in_channels=len(options.modalities), filters=args.filters,
                          attention_options=attention)
    network = build_model(**config)
    if args.prior_start:
        # The constant prediction that minimises the weighted loss: p = w_l r / (w_l r + w_b (1 - r)).
        background, lesion = class_weights(r, args.loss_weights)
        set_output_prior(network, lesion * r / (lesion * r + background * (1 - r)))
    network = network.to(device)
    optimizer = torch.optim.Adam(parameter_groups(network, args.weight_decay, args.attention_weight_decay), lr=args.lr)
    dtype = amp_dtype(args.amp, device)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    criterion = WeightedCrossEntropy(r, args.loss_weights, distributed=distributed).to(device)
    meta = {"config": config, "crop": list(args.crop), "modalities": list(options.modalities), "r": r,
            "loss_weights": args.loss_weights, "data": options.record(), "iterations": args.iterations}
    return network, optimizer, scaler, criterion, meta


def resume_or_start(run: Run) -> None:
    """Load ``<out>/checkpoint.pt`` with ``--resume`` after checking it was made with the same options."""
    path = run.out / "checkpoint.pt"
    if not (run.args.resume and path.is_file()):
        if run.args.resume and run.main_process:
            print(f"--resume: no {path} yet, starting from scratch")
        return
    state = read_checkpoint(path)
    recorded = state.get("options", {})
    if state["config"]["method"] != run.meta["config"]["method"] or state["config"]["filters"] != run.meta["config"]["filters"]:
        raise UsageError(f"--resume: {path} holds a {state['config']['method']} network with filters "
                         f"{state['config']['filters']}, not {run.meta['config']['method']} with "
                         f"{run.meta['config']['filters']}; use the same --method/--filters or another --out")
    changed = differences(recorded, run.meta["options"])
    if changed:
        raise UsageError(f"--resume: the command differs from the run in {path}: " + "; ".join(changed)
                         + ". Resume with the recorded options, or start a new run (another --out, or --overwrite)")
    if run.args.lr_schedule == "poly" and run.args.iterations != state.get("iterations"):
        raise UsageError(f"--resume: --iterations {run.args.iterations} differs from the run's "
                         f"{state.get('iterations')}, and the poly learning-rate schedule depends on it; give "
                         f"--iterations {state.get('iterations')}")
    if run.args.iterations < state["iteration"]:
        raise UsageError(f"--resume: --iterations {run.args.iterations} is below the {state['iteration']} "
                         f"iterations {path} already trained; give --iterations {state['iteration']} or more")
    run.network.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])
    run.start, run.elapsed = state["iteration"], state["seconds"]
    run.log = read_log(run.out / "log.csv", run.start)
    if run.main_process:
        print(f"resuming {path} at iteration {run.start}")


# ------------------------------------------------------------------------------------------------- steps


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


def train_step(run: Run, iteration: int) -> float:
    """One optimiser step on this iteration's crops; returns the loss of the whole global batch."""
    for group in run.optimizer.param_groups:
        group["lr"] = learning_rate(run.args, iteration)
    image, label = batch_for(iteration, run.train_cases, run.args, run.rank, run.world)
    image, label = image.to(run.device, non_blocking=True), label.to(run.device, non_blocking=True)
    with torch.autocast(run.device.type, dtype=run.amp_dtype, enabled=run.amp_dtype is not None):
        logits = run.model(image)
    loss = run.criterion(logits, label)
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    run.scaler.step(run.optimizer)
    run.scaler.update()
    value = loss.detach()
    if run.world > 1:  # each process holds world * its share of the global loss
        dist.all_reduce(value)
        value /= run.world
    return float(value)


def validate(run: Run) -> dict[str, float]:
    """Score the held-out subjects with the current weights."""
    summary, _, _ = evaluate_cases(run.network, run.test_cases, run.args.crop, overlap=run.args.overlap,
                                   device=run.device, amp_dtype=run.amp_dtype)
    run.network.train()
    return summary


def save_checkpoint(run: Run, iteration: int) -> None:
    """The resumable state, atomically, and the log so far."""
    state = {**run.meta, "model": run.network.state_dict(), "optimizer": run.optimizer.state_dict(),
             "scaler": run.scaler.state_dict(), "rng": rng_state(), "iteration": iteration, "seconds": run.elapsed}
    save_atomically(run.out / "checkpoint.pt", lambda tmp: torch.save(state, tmp))
    write_log(run.out / "log.csv", run.log)


def on_iteration_end(run: Run, iteration: int, loss: float, stop: int, bar: tqdm) -> None:
    """Log the loss, validate every ``--val-every`` iterations, checkpoint every ``--checkpoint-every``."""
    args = run.args
    row: dict[str, Any] = {"iteration": iteration, "loss": f"{loss:.6f}", "seconds": f"{run.elapsed:.2f}"}
    if (run.main_process and run.test_cases and args.val_every and iteration % args.val_every == 0
            and iteration < args.iterations):
        summary = validate(run)
        row.update({f"val_{k}": f"{summary[k]:.4f}" for k in ("sample_dice", "voxel_dice", "voxel_lesion_f1")})
        bar.set_postfix(loss=f"{loss:.4f}", dice=f"{summary['sample_dice']:.3f}")
    else:
        bar.set_postfix(loss=f"{loss:.4f}")
    run.log.append(row)
    bar.update(1)
    if run.main_process and (iteration % args.checkpoint_every == 0 or iteration == stop):
        save_checkpoint(run, iteration)


def run_training(args: argparse.Namespace) -> dict[str, Any]:
    """Run the training described by resolved ``args``; returns the final metrics (rank 0) or {}."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = select_device(args.device, int(os.environ.get("LOCAL_RANK", "0")))
    if args.batch_size % world:
        raise UsageError(f"--batch-size {args.batch_size} must be divisible by the {world} processes")
    out = prepare_out_folder(args, rank == 0)
    configure_runtime(args, processes=world if device.type == "cpu" else 1)
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = False
    check_crop(model_config(args.method, filters=args.filters), args.crop, args.batch_size, device)
    options, train_cases, test_cases, split = load_training_data(args, rank == 0)
    network, optimizer, scaler, criterion, meta = build_training(args, options, train_cases, device, world > 1)
    meta["options"] = recorded_options(args, options, split)
    run = Run(args, out, device, rank, world, train_cases, test_cases, split, network,
              DistributedDataParallel(network) if world > 1 else network, optimizer, scaler, criterion,
              amp_dtype(args.amp, device), meta)
    resume_or_start(run)
    finished = run.start == args.iterations and (out / "metrics.json").is_file()
    result: dict[str, Any] = {}
    if finished:
        if run.main_process:
            print(f"{out} is already finished with these options ({args.iterations} iterations): nothing to do")
    else:
        if run.main_process:
            out.mkdir(parents=True, exist_ok=True)
        stop = min(args.iterations, args.stop_at or args.iterations)
        # smoothing=0: the time to the end from the mean of all iterations so far, stable from the first few.
        bar = tqdm(total=args.iterations, initial=run.start, disable=args.no_progress or not run.main_process,
                   desc=args.method, dynamic_ncols=True, smoothing=0)
        network.train()
        for iteration in range(run.start + 1, stop + 1):
            tick = time.perf_counter()
            loss = train_step(run, iteration)
            run.elapsed += time.perf_counter() - tick
            if iteration == run.start + 3 and run.main_process:
                report_estimate(run, time.perf_counter() - tick, stop - iteration)
            on_iteration_end(run, iteration, loss, stop, bar)
        bar.close()
        if world > 1:
            dist.barrier()
        if run.main_process and stop == args.iterations:
            result = finish(run)
    if world > 1:
        dist.destroy_process_group()
    return result


def report_estimate(run: Run, seconds: float, remaining: int) -> None:
    """Print the expected training time once, from the third iteration (the first ones warm up)."""
    tqdm.write(f"{seconds:.2f} s per iteration: about {seconds * remaining / 60:.0f} min of training to go "
               f"({remaining} iterations{', plus validation' if run.args.val_every else ''})")


def finish(run: Run) -> dict[str, Any]:
    """Write the final model, the held-out metrics, the predictions and the figure; print where."""
    args, out = run.args, run.out
    peak, peak_kind = peak_memory_mb(run.device)
    model_path = out / "model.pt"
    save_atomically(model_path, lambda tmp: torch.save({**run.meta, "model": run.network.state_dict()}, tmp))
    write_json(out / "split.json", run.split)
    result: dict[str, Any] = {"method": args.method, "iterations": args.iterations, "train_seconds": run.elapsed,
                              "peak_memory_mb": peak, "peak_memory_kind": peak_kind, "r": run.meta["r"],
                              "loss_weights": args.loss_weights, "train": run.split["train"],
                              "test": run.split["test"], "options": run.meta["options"]}
    if run.test_cases:
        summary, rows, predictions = evaluate_cases(run.network, run.test_cases, args.crop, overlap=args.overlap,
                                                    device=run.device, amp_dtype=run.amp_dtype)
        result["summary"] = summary
        run.log[-1].update({f"val_{k}": f"{summary[k]:.4f}" for k in ("sample_dice", "voxel_dice", "voxel_lesion_f1")})
        write_csv(out / "cases.csv", rows)
        for case_id, mask in predictions.items():
            save_atomically(out / "predictions" / f"{case_id}.npz", lambda tmp, m=mask: np.savez_compressed(tmp, mask=m))
        shown = max(run.test_cases, key=lambda c: int(np.count_nonzero(c.label == 1)))
        flair = shown.modalities.index("flair") if "flair" in shown.modalities else 0
        save_comparison(out / "figure.png", shown.image[flair], shown.label, {args.method: predictions[shown.id]},
                        title=shown.id)
        if args.method.startswith("rsa"):
            steps, box = lesion_attention(run.network, shown, args.crop)
            save_attention_figure(out / "attention.png", shown.image[(flair, *box)], shown.label[box], steps,
                                  title=shown.id)
    write_log(out / "log.csv", run.log)
    write_json(out / "metrics.json", result)
    print(f"model:   {model_path}")
    if run.test_cases:
        s = result["summary"]
        print(f"metrics: {out / 'metrics.json'} (held-out subjects: sample Dice {s['sample_dice']:.3f}, "
              f"voxel Dice {s['voxel_dice']:.3f}, lesion F1 {s['voxel_lesion_f1']:.3f})")
        print(f"figure:  {out / 'figure.png'}")
    print(f"log:     {out / 'log.csv'}  ({run.elapsed:.0f} s of training)")
    return result


# ---------------------------------------------------------------------------------------------- helpers


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
