"""DistributedDataParallel training with 2 CPU processes (torchrun, gloo) matches one process."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mslesion import train
from mslesion.checkpoint import read
from mslesion.synthetic.cohort import make_cohort

TRAIN = Path(__file__).resolve().parents[2] / "examples" / "ms_lesion" / "train.py"


@pytest.mark.parametrize("loss", ["ce", "dice-ce"])
def test_two_process_ddp_matches_one_process(loss: str, tmp_path: Path) -> None:
    cohort = make_cohort(tmp_path / "cohort", subjects=2, preset="small", seed=0, montage=False)
    # The weighted loss: its weighted mean's denominator is summed over both processes, so DDP's
    # gradient average equals the single-process gradient (up to rounding). Dividing by each
    # process's own weight sum instead moved the weights by 6e-3 after 6 steps. dice-ce: the batch
    # Dice's sums run over both processes' crops (a differentiable all-reduce). The RSA logits are
    # scaled ("auto"): unscaled, the softmax is nearly one-hot and a rounding difference can flip it
    # (1.5e-3 apart after 6 steps, with or without DDP's reduction order).
    args = ["--data", str(cohort), "--method", "rsa-010", "--filters", "tiny", "--crop", "16", "32", "32",
            "--batch-size", "2", "--iterations", "6", "--test-fraction", "0", "--lesion-crop-fraction", "0.5",
            "--val-every", "0", "--no-progress", "--device", "cpu", "--lr-schedule", "constant",
            "--attention-scale", "auto", "--loss", loss]
    ddp = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(TRAIN),
         *args, "--out", str(tmp_path / "ddp")],
        capture_output=True, text=True, timeout=120,
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    single = subprocess.run([sys.executable, str(TRAIN), *args, "--out", str(tmp_path / "single")],
                            capture_output=True, text=True, timeout=120)
    assert single.returncode == 0, single.stderr[-3000:]
    a = read(tmp_path / "ddp" / "model.pt").weights
    b = read(tmp_path / "single" / "model.pt").weights
    assert read(tmp_path / "ddp" / "checkpoint.pt").state.iteration == 6
    for name, value in a.items():
        torch.testing.assert_close(value, b[name], rtol=0, atol=1e-4, msg=name)


def test_batch_must_split_evenly(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                 capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert train.main(["--data", str(tmp_path), "--batch-size", "3", "--out", str(tmp_path / "run")]) == 2
    assert "error: --batch-size 3 must be divisible by the 2 processes" in capsys.readouterr().err
