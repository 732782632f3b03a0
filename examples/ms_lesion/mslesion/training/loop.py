"""Training as named steps: ``run_training`` reads the data, builds the model, then loops ``train_step``.

The shape of a run (nnU-Net's ``run_training`` without the class hierarchy)::

    lock --out -> prepare_out_folder -> load_training_data -> build_run -> resume_or_start
    -> (--overwrite: remove the old run) -> for each iteration: train_step, on_iteration_end (log, validate,
    checkpoint) -> finish

``run_training`` takes one ``TrainingConfig`` (config.py) and nothing else. The checkpoint (written and
read by ``checkpoint.py``) records that configuration, the split, a content hash of every input file and
the training subjects' voxel spacings; ``--resume`` refuses a command that differs in anything but
``config.RUN_FIELDS``, listing the differences.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import math
import os
import random
import sys
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
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from ..checkpoint import Checkpoint, ResumeState, RunRecord, read, write_checkpoint, write_model
from ..data.augment import augment, margin
from ..config import TrainingConfig
from ..data.sampling import mean_lesion_fraction, sample_crop
from ..data.reading import Case, CasePaths, check_lesion_masks
from ..evaluation.figures import save_attention_figure, save_comparison
from ..inference.sliding_window import evaluate_cases, lesion_attention
from ..model.loss import class_weights, make_loss
from ..model.unet import build_model, crop_divisor, set_output_prior, training_memory_bytes
from .monitor import (
    ALIVE_EFFECT, UNIFORM_PEAK, attention_blocks, attention_state, attention_summary, log_columns, stayed_identity,
    stayed_uniform, watch, with_recent_effect,
)
from ..run import (
    UsageError, changed_files, check_split, file_digest, locked, random_split, read_split, remove_run, run_files,
    save_atomically, write_csv, write_json,
)
from .runtime import amp_dtype, configure_runtime, describe_amp, peak_memory_mb, resolve_amp

DEMO_SUBJECTS = 12
LOG_FIELDS = ("iteration", "loss", "seconds", "val_sample_dice", "val_voxel_dice", "val_voxel_lesion_f1")


@dataclass
class TrainingData:
    """The subjects of a run: loaded cases, the split, and a content hash of each input file."""

    train_cases: list[Case]
    test_cases: list[Case]
    split: dict[str, list[str]]
    files: dict[str, dict[str, str]]


@dataclass
class Run:
    """Everything a training run holds while it goes."""

    config: TrainingConfig
    out: Path
    device: torch.device
    rank: int
    world: int
    data: TrainingData
    network: nn.Module
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    criterion: nn.Module
    amp_dtype: torch.dtype | None
    record: RunRecord                   # what model.pt and checkpoint.pt record beside the weights
    ema: AveragedModel | None = None    # --ema: the moving average of the weights
    start: int = 0
    saved: int = 0          # the iteration of the last checkpoint written
    elapsed: float = 0.0
    log: list[dict[str, Any]] = field(default_factory=list)

    @property
    def main_process(self) -> bool:
        return self.rank == 0

    @property
    def kept(self) -> nn.Module:
        """The weights the run saves and evaluates: the moving average with ``--ema``, else the network."""
        return self.ema.module if self.ema is not None else self.network


# ------------------------------------------------------------------------------------------------ setup


def prepare_out_folder(config: TrainingConfig) -> Path:
    """Check ``--out`` against ``--resume``/``--overwrite`` before any work (``--overwrite`` removes the old run
    only once the data, the split and the model are checked: ``run_training``).

    Raises:
        UsageError: the folder holds a run and neither flag says what to do with it.
    """
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a folder")
    existing = run_files(out)
    if existing and not (config.resume or config.overwrite):
        raise UsageError(f"--out {out} already holds a run ({', '.join(p.name for p in existing[:4])}); continue it "
                         "with --resume, replace it with --overwrite, or choose another --out")
    if config.resume and existing and not (out / "checkpoint.pt").is_file():
        raise UsageError(f"--resume: {out} holds run files but no checkpoint.pt to continue from; use --overwrite")
    return out


def check_crop(network_config: dict[str, Any], crop: Sequence[int], batch_size: int, device: torch.device) -> None:
    """Refuse a crop the U-Net cannot take, or one whose training step cannot fit in memory."""
    divisor = crop_divisor(network_config)
    if any(c % d for c, d in zip(crop, divisor)):
        raise UsageError(f"--crop {' '.join(map(str, crop))}: the sizes must be multiples of "
                         f"{' '.join(map(str, divisor))} for {len(network_config['filters'])} levels, e.g. "
                         f"{' '.join(str(max(d, c // d * d)) for c, d in zip(crop, divisor))}")
    need = training_memory_bytes(network_config, crop, batch_size)
    if device.type == "cuda":
        have, where = torch.cuda.get_device_properties(device).total_memory, f"{device} memory"
    else:
        have, where = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this machine's memory"
    if need > have:
        raise UsageError(f"--crop {' '.join(map(str, crop))} with --batch-size {batch_size} and filters "
                         f"{network_config['filters']} needs at least {need / 2**30:.1f} GiB for training, more than "
                         f"{where} ({have / 2**30:.1f} GiB); use a smaller --crop, --batch-size or --filters")


def make_demo_cohort(config: TrainingConfig, main_process: bool) -> None:
    """Generate the synthetic demo cohort in ``config.data`` on first use (rank 0; the others wait)."""
    if main_process:
        from ..synthetic.cohort import make_cohort  # only the demo needs the generator

        print(f"no --data: generating/using the synthetic demo cohort ({DEMO_SUBJECTS} subjects) in {config.data}")
        make_cohort(config.data, subjects=DEMO_SUBJECTS, preset="demo", seed=0, montage=False)
    if dist.is_initialized():
        dist.barrier()


def input_digests(paths: CasePaths) -> dict[str, str]:
    """A content hash of each of a subject's files, by role."""
    files = {**paths.images, "mask": paths.mask, "brain_mask": paths.brain_mask}
    return {role: file_digest(path) for role, path in files.items() if path is not None}


def load_training_data(config: TrainingConfig, main_process: bool) -> TrainingData:
    """Read the subjects, draw or read the split, hash the input files and check the masks."""
    if config.demo_cohort:
        make_demo_cohort(config, main_process)
    found = config.data_options.find(config.data)
    ids = [p.id for p in found]
    split = read_split(config.split_file) if config.split_file else random_split(ids, config.test_fraction, config.seed)
    check_split(split, ids, config.split_file or "drawn with --test-fraction")
    used = [p for p in found if p.id in set(split["train"]) | set(split["test"])]
    cases = {p.id: config.data_options.load(p) for p in used}
    train_cases = [cases[i] for i in split["train"]]
    check_lesion_masks(train_cases)
    check_lesion_masks([cases[i] for i in split["test"]], training=False)
    return TrainingData(train_cases, [cases[i] for i in split["test"]], split, {p.id: input_digests(p) for p in used})


def parameter_groups(network: nn.Module, weight_decay: float, attention_weight_decay: float) -> list[dict[str, Any]]:
    """Adam parameter groups: the attention blocks' parameters get their own weight decay.

    An RSA block starts as the identity (gates ``alpha = 0``), so its projections get exactly zero
    gradient until a gate moves. Adam's weight decay is an L2 term added to the gradient, which Adam
    then normalises: a parameter whose only gradient is ``wd * w`` moves by about the learning rate
    per step towards 0 whatever ``wd`` is. With the paper's 1e-5 the projections collapsed from 0.06 to
    about 1e-8 within 300 steps and the gates never left 0: the block stayed the identity.
    """
    attention = {id(p) for block in attention_blocks(network).values() for p in block.parameters()}
    rest = [p for p in network.parameters() if id(p) not in attention]
    blocks = [p for p in network.parameters() if id(p) in attention]
    return [{"params": rest, "weight_decay": weight_decay},
            {"params": blocks, "weight_decay": attention_weight_decay}]


def build_network(config: TrainingConfig, network_config: dict[str, Any], r: float) -> nn.Module:
    """The seeded network, its output layer started at the weighted lesion prior (``--no-prior-start``: 0.5)."""
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    random.seed(config.seed)
    network = build_model(**network_config)
    if config.prior_start:
        # The constant prediction that minimises the weighted loss: p = w_l r / (w_l r + w_b (1 - r)).
        background, lesion = class_weights(r, config.loss_weights)
        set_output_prior(network, lesion * r / (lesion * r + background * (1 - r)))
    return network


def build_run(config: TrainingConfig, data: TrainingData, out: Path, device: torch.device, rank: int,
              world: int) -> Run:
    """The network, optimiser, gradient scaler and loss of a run, and the record its checkpoints hold."""
    r = mean_lesion_fraction(data.train_cases)
    network = build_network(config, config.network_config, r).to(device)
    watch(network)  # each block keeps its last (small) maps and its effect, for the log
    optimizer = torch.optim.Adam(parameter_groups(network, config.weight_decay, config.attention_weight_decay),
                                 lr=config.lr)
    dtype = amp_dtype(config.amp, device)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    criterion = make_loss(config.loss, r, config.loss_weights, distributed=world > 1).to(device)
    record = RunRecord(config, r, data.split, data.files, {case.id: case.spacing for case in data.train_cases})
    ema = AveragedModel(network, multi_avg_fn=get_ema_multi_avg_fn(config.ema), use_buffers=True) if config.ema else None
    return Run(config, out, device, rank, world, data, network,
               DistributedDataParallel(network) if world > 1 else network, optimizer, scaler, criterion, dtype, record, ema)


def resume_or_start(run: Run) -> None:
    """Load ``<out>/checkpoint.pt`` with ``--resume`` after checking it was made with the same options and files."""
    path = run.out / "checkpoint.pt"
    if not (run.config.resume and path.is_file()):
        if run.config.resume and run.main_process:
            print(f"--resume: no {path} yet, starting from scratch")
        return
    saved = read(path)
    state = check_resumable(run, saved)
    run.network.load_state_dict(state.network)
    run.optimizer.load_state_dict(state.optimizer)
    run.scaler.load_state_dict(state.scaler)
    if run.ema is not None:
        run.ema.load_state_dict(state.ema)
    set_rng_state(state.rng)
    run.start = run.saved = state.iteration
    run.elapsed = state.seconds
    run.log = read_log(run.out / "log.csv", run.start)
    if run.main_process:
        print(f"resuming {path} at iteration {run.start}")


def check_resumable(run: Run, saved: Checkpoint) -> ResumeState:
    """Refuse to continue ``saved`` with another configuration, split or input files, listing what differs;
    return its resume state."""
    path, recorded, state = saved.path, saved.record, saved.state
    if state is None:
        raise UsageError(f"--resume: {path} holds no training state to continue (a model.pt?); start a new run "
                         "(--overwrite)")
    changed = run.config.resume_differences(recorded.training)
    if recorded.split != run.record.split:
        changed.append(f"the split: recorded {recorded.split}, now {run.record.split}")
    files = changed_files(recorded.files, run.record.files)
    if files:
        changed.append(f"input files changed on disk since the run started: {', '.join(files)}")
    if changed:
        raise UsageError(f"--resume: the command differs from the run in {path}: " + "; ".join(changed)
                         + ". Resume with the recorded options and files, or start a new run (another --out, or "
                         "--overwrite)")
    before, now = recorded.training.iterations, run.config.iterations
    if run.config.lr_schedule == "poly" and now != before:
        raise UsageError(f"--resume: --iterations {now} differs from the run's {before}, and the poly "
                         f"learning-rate schedule depends on it; give --iterations {before}")
    if now < state.iteration:
        raise UsageError(f"--resume: --iterations {now} is below the {state.iteration} iterations {path} "
                         f"already trained; give --iterations {state.iteration} or more")
    return state


# ------------------------------------------------------------------------------------------------- steps


def batch_for(iteration: int, cases: Sequence[Case], config: TrainingConfig, rank: int, world: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """This process's share of the global batch of ``iteration``.

    The crops of an iteration (and their augmentation, ``--augment``) depend only on (seed, iteration):
    a resumed run sees the same data as an uninterrupted one, and the processes of a DDP run split one
    global batch.
    """
    rng = np.random.default_rng([config.seed, iteration])
    # Rotation and scaling read around the crop: cut a larger one, which augment() resamples to the crop.
    sampled = tuple(c + 2 * m for c, m in zip(config.crop, margin(config.augment, config.crop)))
    crops = []
    for _ in range(config.batch_size):
        case = cases[int(rng.integers(len(cases)))]
        image, label = sample_crop(case, sampled, rng, lesion_fraction=config.lesion_crop_fraction,
                                   centre=config.crop_centre)
        crops.append(augment(image, label, rng, config.augment, config.crop))
    share = crops[rank * config.batch_size // world:(rank + 1) * config.batch_size // world]
    return (torch.from_numpy(np.stack([c[0] for c in share])), torch.from_numpy(np.stack([c[1] for c in share])))


def train_step(run: Run, iteration: int) -> float:
    """One optimiser step on this iteration's crops; returns the loss of the whole global batch."""
    for group in run.optimizer.param_groups:
        group["lr"] = run.config.learning_rate(iteration)
    image, label = batch_for(iteration, run.data.train_cases, run.config, run.rank, run.world)
    image, label = image.to(run.device, non_blocking=True), label.to(run.device, non_blocking=True)
    with torch.autocast(run.device.type, dtype=run.amp_dtype, enabled=run.amp_dtype is not None):
        logits = run.model(image)
    loss = run.criterion(logits, label)
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    run.scaler.step(run.optimizer)
    run.scaler.update()
    if run.ema is not None:
        run.ema.update_parameters(run.network)
    value = loss.detach()
    if run.world > 1:  # each process holds world * its share of the global loss
        dist.all_reduce(value)
        value /= run.world
    return float(value)


def validate(run: Run) -> dict[str, float]:
    """Score the held-out subjects with the current weights."""
    scores, _, _ = evaluate_cases(run.kept, run.data.test_cases, run.config.crop, overlap=run.config.overlap,
                                  device=run.device, amp_dtype=run.amp_dtype)
    run.network.train()
    return scores


def save_checkpoint(run: Run, iteration: int) -> None:
    """The resumable state, atomically, and the log so far; weights that are not finite are never saved."""
    if not finite_weights(run.network):
        raise diverged(run, iteration, "the weights are not finite")
    state = ResumeState(iteration, run.elapsed, run.network.state_dict(), run.optimizer.state_dict(),
                        run.scaler.state_dict(), rng_state(), run.ema.state_dict() if run.ema is not None else None)
    write_checkpoint(run.out / "checkpoint.pt", run.record, state)
    write_log(run.out / "log.csv", run.log)
    run.saved = iteration


def on_iteration_end(run: Run, iteration: int, loss: float, stop: int, bar: tqdm) -> None:
    """Log the loss and the attention gates, validate every ``--val-every`` iterations, checkpoint every
    ``--checkpoint-every``."""
    config = run.config
    row: dict[str, Any] = {"iteration": iteration, "loss": f"{loss:.6f}", "seconds": f"{run.elapsed:.2f}",
                           **log_columns(attention_state(run.network))}
    if (run.main_process and run.data.test_cases and config.val_every and iteration % config.val_every == 0
            and iteration < config.iterations):
        scores = validate(run)
        row.update({f"val_{k}": f"{scores[k]:.4f}" for k in ("sample_dice", "voxel_dice", "voxel_lesion_f1")})
        bar.set_postfix(loss=f"{loss:.4f}", dice=f"{scores['sample_dice']:.3f}")
    else:
        bar.set_postfix(loss=f"{loss:.4f}")
    run.log.append(row)
    bar.update(1)
    if run.main_process and (iteration % config.checkpoint_every == 0 or iteration == stop):
        save_checkpoint(run, iteration)


def train_loop(run: Run, stop: int) -> None:
    """Iterations ``start + 1 .. stop``; Ctrl-C ends it with one line saying where the last checkpoint is."""
    bar = tqdm(total=run.config.iterations, initial=run.start, disable=not (run.config.progress and run.main_process),
               desc=run.config.method, dynamic_ncols=True, smoothing=0)  # smoothing=0: time to go from the mean
    run.network.train()
    try:
        for iteration in range(run.start + 1, stop + 1):
            tick = time.perf_counter()
            loss = train_step(run, iteration)
            if not math.isfinite(loss):  # every process sees the same global loss: all stop here
                raise diverged(run, iteration, f"the loss is {loss}")
            run.elapsed += time.perf_counter() - tick
            if iteration == run.start + 3 and run.main_process:
                report_estimate(run, time.perf_counter() - tick, stop - iteration)
            on_iteration_end(run, iteration, loss, stop, bar)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(interrupted_message(run)) from None
    finally:
        bar.close()


def finite_weights(network: nn.Module) -> bool:
    """Whether every floating-point weight and buffer of ``network`` is finite."""
    return all(bool(torch.isfinite(t).all()) for t in network.state_dict().values() if t.is_floating_point())


def diverged(run: Run, iteration: int, what: str) -> UsageError:
    """The one-line error that stops a run whose loss or weights stopped being finite (nothing more is saved)."""
    kept = (f"the last good checkpoint is {run.out / 'checkpoint.pt'} (iteration {run.saved})" if run.saved
            else "no checkpoint was written")
    amp = ", or train without autocast (--amp none)" if run.amp_dtype is not None else ""
    return UsageError(f"training diverged: {what} at iteration {iteration} of {run.config.iterations}; {kept} and no "
                      f"model.pt; lower --lr (now {run.config.lr:g}){amp}, then start again (--overwrite)")


def interrupted_message(run: Run) -> str:
    """Where a Ctrl-C leaves the run, and how to continue it."""
    if not run.saved:
        return (f"interrupted before the first checkpoint (every {run.config.checkpoint_every} iterations): nothing "
                "to resume; run the command again")
    return (f"interrupted: the last checkpoint is {run.out / 'checkpoint.pt'} (iteration {run.saved} of "
            f"{run.config.iterations}); continue with the same command and --resume")


def run_training(config: TrainingConfig) -> dict[str, Any]:
    """Run the training ``config`` describes; returns the final metrics (rank 0) or {}.

    Rank 0 holds the lock of ``--out`` (``run.locked``) from before the first check to the end: a second
    training into the same folder is refused naming this one. ``config.amp`` is resolved for the device first (``runtime.resolve_amp``: ``auto`` becomes bf16 on a CPU
    that executes it natively, else float32), and the run records the resolved choice.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = torch.device(config.device)
    config = dataclasses.replace(config, amp=resolve_amp(config.amp, device))  # the run records what it used
    if config.batch_size % world:
        raise UsageError(f"--batch-size {config.batch_size} must be divisible by the {world} processes")
    check_crop(config.network_config, config.crop, config.batch_size, device)
    with locked(config.out) if rank == 0 else contextlib.nullcontext():
        out = prepare_out_folder(config)
        configure_runtime(config.threads, config.malloc_tuning, processes=world if device.type == "cpu" else 1)
        if world > 1:
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            torch.cuda.set_device(device)
            torch.backends.cudnn.benchmark = False
        if rank == 0:
            print(describe_amp(config.amp, device))
        run = build_run(config, load_training_data(config, rank == 0), out, device, rank, world)
        resume_or_start(run)
        if config.overwrite and run.main_process:  # the data, split and model are checked: now the old run goes
            remove_run(out)
        result = train_and_finish(run)
        if world > 1:
            dist.destroy_process_group()
    return result


def train_and_finish(run: Run) -> dict[str, Any]:
    """Train up to ``--stop-at`` or the end, then (rank 0, at the end) ``finish``; a finished run does nothing."""
    config, out = run.config, run.out
    if run.start == config.iterations and (out / "metrics.json").is_file():
        if run.main_process:
            print(f"{out} is already finished with these options ({config.iterations} iterations): nothing to do")
        return {}
    stop = min(config.iterations, config.stop_at or config.iterations)
    train_loop(run, stop)
    if run.world > 1:
        dist.barrier()
    return finish(run) if run.main_process and stop == config.iterations else {}


def report_estimate(run: Run, seconds: float, remaining: int) -> None:
    """Print the expected training time once, from the third iteration (the first ones warm up)."""
    tqdm.write(f"{seconds:.2f} s per iteration: about {seconds * remaining / 60:.0f} min of training to go "
               f"({remaining} iterations{', plus validation' if run.config.val_every else ''})")


# ------------------------------------------------------------------------------------------------ finish


def finish(run: Run) -> dict[str, Any]:
    """Write the final model, the held-out metrics, the predictions and the figures; print where."""
    config, out = run.config, run.out
    peak, peak_kind = peak_memory_mb(run.device)
    if not finite_weights(run.kept):
        raise diverged(run, config.iterations, "the final weights are not finite")
    write_model(out / "model.pt", run.record, run.kept.state_dict())
    write_json(out / "split.json", run.data.split)
    state = with_recent_effect(attention_state(run.network), run.log)
    result: dict[str, Any] = {"method": config.method, "iterations": config.iterations,
                              "train_seconds": run.elapsed, "peak_memory_mb": peak, "peak_memory_kind": peak_kind,
                              "r": run.record.r, "train": run.data.split["train"], "test": run.data.split["test"],
                              "training": config.record(), **attention_summary(state)}
    if run.data.test_cases:
        result["summary"] = evaluate_and_draw(run)
    write_log(out / "log.csv", run.log)
    write_json(out / "metrics.json", result)
    warn_identity_blocks(run, state)
    warn_uniform_blocks(state)
    print(f"model:   {out / 'model.pt'}")
    if run.data.test_cases:
        s = result["summary"]
        print(f"metrics: {out / 'metrics.json'} (held-out subjects: sample Dice {s['sample_dice']:.3f}, "
              f"voxel Dice {s['voxel_dice']:.3f}, lesion F1 {s['voxel_lesion_f1']:.3f}, lesion precision "
              f"{s['voxel_lesion_precision']:.3f}, predicted/reference volume {s['voxel_volume_ratio']:.2f})")
        print(f"figure:  {out / 'figure.png'}")
    print(f"log:     {out / 'log.csv'}  ({run.elapsed:.0f} s of training)")
    return result


def evaluate_and_draw(run: Run) -> dict[str, float]:
    """Score the held-out subjects, write ``cases.csv``, their masks and the figures; return the summary."""
    config, out = run.config, run.out
    scores, rows, predictions = evaluate_cases(run.kept, run.data.test_cases, config.crop, overlap=config.overlap,
                                               device=run.device, amp_dtype=run.amp_dtype)
    run.log[-1].update({f"val_{k}": f"{scores[k]:.4f}" for k in ("sample_dice", "voxel_dice", "voxel_lesion_f1")})
    write_csv(out / "cases.csv", rows)
    for case_id, mask in predictions.items():
        save_atomically(out / "predictions" / f"{case_id}.npz", lambda tmp, m=mask: np.savez_compressed(tmp, mask=m))
    shown = max(run.data.test_cases, key=lambda c: int(np.count_nonzero(c.label == 1)))
    flair = shown.modalities.index("flair") if "flair" in shown.modalities else 0
    save_comparison(out / "figure.png", shown.image[flair], shown.label, {config.method: predictions[shown.id]},
                    title=shown.id)
    if config.attention == "rsa" and (shown.label == 1).any():
        steps, box = lesion_attention(run.kept, shown, config.crop)
        save_attention_figure(out / "attention.png", shown.image[(flair, *box)], shown.label[box], steps, title=shown.id)
    return scores


def warn_identity_blocks(run: Run, state: dict[str, dict[str, float]]) -> None:
    """Warn about attention blocks whose gates never left zero: the network trained without them."""
    for name in stayed_identity(state):
        print(f"warning: the attention block {name} stayed the identity (it changes its input by "
              f"{state[name].get('effect', 0.0):.1e} < {ALIVE_EFFECT:g} over the last tenth of {run.config.iterations} "
              "iterations): "
              "this run is a plain U-Net; check --attention-weight-decay "
              f"(now {run.config.attention_weight_decay:g}) and docs/ms_lesion_training.md", file=sys.stderr)


def warn_uniform_blocks(state: dict[str, dict[str, float]]) -> None:
    """Warn about attention blocks whose maps stayed uniform: they add the mean of the slices, attending to nothing."""
    for name in stayed_uniform(state):
        weights = ", ".join(f"{k[len('max_weight_'):] or 'map'} {v:.3f}" for k, v in state[name].items()
                            if k.startswith("max_weight"))
        print(f"warning: the attention block {name} attends to nothing: every map stayed within {UNIFORM_PEAK:g} "
              f"of uniform (largest weights {weights}); it adds the mean of the slices; see 'Does RSA attend?' "
              "in docs/ms_lesion_training.md", file=sys.stderr)


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


def read_log(path: Path, up_to: int) -> list[dict[str, str]]:
    """The log rows up to iteration ``up_to`` (a resumed run drops what it will redo)."""
    if not path.is_file():
        return []
    with path.open(newline="") as handle:
        return [row for row in csv.DictReader(handle) if int(row["iteration"]) <= up_to]


def write_log(path: Path, log: Sequence[dict[str, Any]]) -> None:
    """The CSV log: one row per iteration, validation columns empty where not evaluated, then the attention
    columns (``monitor.log_columns``)."""
    attention = [k for k in (log[0] if log else {}) if k not in LOG_FIELDS]
    write_csv(path, [{k: row.get(k, "") for k in (*LOG_FIELDS, *attention)} for row in log])
