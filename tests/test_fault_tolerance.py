"""Nothing lost: non-finite losses, a full disk, periodic checkpoints, a SIGKILL under DDP."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import TINY, free_port, tiny_config

import dist_seg.checkpoint
import dist_seg.train
from dist_seg.checkpoint import load_checkpoint
from dist_seg.errors import UserError
from dist_seg.train import train


def nan_on_call(monkeypatch, n: int):
    """loss_fn returns NaN on its n-th call (1-based), as a diverging run would."""
    real, calls = dist_seg.train.loss_fn, []

    def fake(logits, masks, kind):
        calls.append(1)
        loss, bce = real(logits, masks, kind)
        return (loss * float("nan"), bce) if len(calls) == n else (loss, bce)

    monkeypatch.setattr(dist_seg.train, "loss_fn", fake)


def test_nonfinite_loss_stops_naming_the_step_and_keeps_the_checkpoint(
    packed, tmp_path, monkeypatch
):
    cfg = tiny_config(packed, tmp_path, "nan", train={"epochs": 2})  # 7 steps per epoch
    nan_on_call(monkeypatch, 10)  # epoch 2, step 3
    with pytest.raises(UserError, match=r"non-finite loss at epoch 2 step 3 \(global step 10\)"):
        train(cfg)
    state = load_checkpoint(tmp_path / "nan" / "last.pt")
    assert state["epoch"] == 1 and state["step"] == 0
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())


def test_nonfinite_loss_skip_mode_counts_and_goes_on(packed, tmp_path, monkeypatch):
    cfg = tiny_config(packed, tmp_path, "skip", train={"epochs": 2, "nonfinite": "skip"})
    nan_on_call(monkeypatch, 4)
    train(cfg)
    history = json.loads((tmp_path / "skip" / "history.json").read_text())
    assert [r["skipped_batches"] for r in history] == [1, 1]
    assert all(r["train_loss"] == r["train_loss"] for r in history)  # not NaN
    state = load_checkpoint(tmp_path / "skip" / "last.pt")
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())


def test_full_disk_while_saving_keeps_the_previous_checkpoint(packed, tmp_path, monkeypatch):
    cfg = tiny_config(packed, tmp_path, "full", train={"epochs": 3})
    real, saves = torch.save, []

    def fake_save(obj, f, *args, **kwargs):
        saves.append(f)
        if len(saves) == 4:  # epoch 1 wrote last.pt and best.pt; epoch 2's last.pt fails
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(dist_seg.checkpoint.torch, "save", fake_save)
    with pytest.raises(UserError, match="No space left on device.*previous one is intact"):
        train(cfg)
    assert load_checkpoint(tmp_path / "full" / "last.pt")["epoch"] in (1, 2)
    assert not list((tmp_path / "full").glob(".*.tmp"))


def test_checkpoint_every_n_steps_keeps_the_last_k(packed, tmp_path):
    cfg = tiny_config(packed, tmp_path, "every", train={"epochs": 1},
                      run={"name": "every", "checkpoint_every": 2, "keep_last": 2})  # fmt: skip
    train(cfg)
    kept = sorted(p.name for p in (tmp_path / "every" / "checkpoints").glob("*.pt"))
    assert kept == ["step-000000006.pt", "step-000000007.pt"]  # saved at 2, 4, 6 and the end
    assert load_checkpoint(tmp_path / "every" / "checkpoints" / kept[0])["step"] == 6


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(600)
def test_sigkill_under_two_processes_then_resume_is_bit_identical(packed, tmp_path):
    base = ["train", *TINY, "--set", f"data.shards={packed}", "--set", "train.epochs=3",
            "--set", "train.batch_size=2", "--set", "data.num_workers=0",
            "--set", "run.checkpoint_every=2", "--set", "train.log_every=1",
            "--set", f"run.out_dir={tmp_path}"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    env["OMP_NUM_THREADS"] = "1"

    def launch(name, *extra, **popen):
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
               "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
               "--dynamo_backend", "no", "--main_process_port", str(free_port()),
               "-m", "dist_seg", *base, "--name", name, *extra]  # fmt: skip
        return subprocess.Popen(cmd, cwd=tmp_path, env=env, start_new_session=True, **popen)

    ref = launch("ref", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert ref.wait(timeout=300) == 0
    cut = launch("cut", stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in cut.stdout:  # 7 steps of ~40 ms per epoch: kill early in epoch 1
        if line.startswith("epoch 1 3/7"):
            break
    os.killpg(cut.pid, signal.SIGKILL)  # the launcher and both workers, no warning at all
    cut.wait(timeout=60)
    time.sleep(0.5)
    state = load_checkpoint(tmp_path / "cut" / "last.pt")
    assert (state["epoch"], state["step"]) < (3, 0)  # killed before the end, resumed below
    again = launch(
        "cut", "--resume", "auto", stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    _, err = again.communicate(timeout=300)
    assert again.returncode == 0, err[-3000:]
    s_ref = json.loads((tmp_path / "ref" / "summary.json").read_text())
    s_cut = json.loads((tmp_path / "cut" / "summary.json").read_text())
    assert s_cut["weights_sha256_all_ranks"] == s_ref["weights_sha256_all_ranks"]
    h_ref = json.loads((tmp_path / "ref" / "history.json").read_text())
    h_cut = json.loads((tmp_path / "cut" / "history.json").read_text())
    keys = ("train_loss", "val_loss", "val_dice_per_image", "val_dice_dataset")
    assert [[r[k] for k in keys] for r in h_ref] == [[r[k] for k in keys] for r in h_cut]
