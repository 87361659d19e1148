"""Nothing lost: non-finite losses, a full disk, periodic checkpoints, a SIGKILL under DDP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import TINY, free_port, kill_tree, launch, read_wandb, run_cli, tiny_config, wandb_env

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


@pytest.fixture
def small_disk(tmp_path):
    """A real 8 MiB file system (tmpfs), mounted for the test and unmounted after it."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(disk)],
                           capture_output=True, text=True)  # fmt: skip
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mount.stderr.strip()}")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def fill(disk, leave: int) -> None:
    """Fill ``disk`` up to ``leave`` free bytes."""
    st = os.statvfs(disk)
    with open(disk / "filler", "wb") as f:
        f.write(b"\0" * max(0, st.f_bavail * st.f_frsize - leave))


@pytest.mark.slow
def test_full_disk_while_saving_is_one_line_and_keeps_the_previous_checkpoint(
    packed, tmp_path, small_disk
):
    args = ["train", *TINY, "--set", f"data.shards={packed}", "--set", f"run.out_dir={small_disk}",
            "--name", "full"]  # fmt: skip
    first = run_cli([*args, "--set", "train.epochs=1"], cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    last = small_disk / "full" / "last.pt"
    before = last.read_bytes()
    fill(small_disk, leave=256 << 10)  # room for config.yaml, not for a 1.5 MB last.pt
    proc = run_cli([*args, "--set", "train.epochs=2", "--resume", "auto"], cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"dist-seg: error: cannot write checkpoint {last}"), line
    assert "No space left on device" in line and "the previous one is intact" in line
    assert last.read_bytes() == before
    assert load_checkpoint(last)["epoch"] == 1
    assert not list(last.parent.glob(".*.tmp"))


def test_skipped_batch_leaves_batchnorm_statistics_as_if_it_never_came(
    packed, tmp_path, monkeypatch
):
    """Batch 3 of epoch 1 is all NaN: skipped, it must leave the model (running statistics
    included) exactly as a run that never saw it, which gets the same batches but that one."""
    import dist_seg.data.stream as stream

    real_iter = stream.EpochLoader.__iter__

    def batches(mode):
        def it(self):
            for i, batch in enumerate(real_iter(self)):
                if self.stream.train and i == 2:
                    if mode == "drop":
                        continue
                    nan = torch.full(batch["image"].shape, float("nan"))
                    batch = {**batch, "image": nan}
                yield batch

        return it

    over = dict(train={"epochs": 1, "nonfinite": "skip"}, data={"flip": False, "num_workers": 0})
    monkeypatch.setattr(stream.EpochLoader, "__iter__", batches("nan"))
    train(tiny_config(packed, tmp_path, "nan", **over))
    monkeypatch.setattr(stream.EpochLoader, "__iter__", batches("drop"))
    train(tiny_config(packed, tmp_path, "drop", **over))
    nan = load_checkpoint(tmp_path / "nan" / "last.pt")
    drop = load_checkpoint(tmp_path / "drop" / "last.pt")
    assert nan["skipped_batches"] == 1 and drop["skipped_batches"] == 0
    stats = [k for k in nan["model"] if "running_" in k or "num_batches" in k]
    assert stats and all(torch.isfinite(nan["model"][k].float()).all() for k in stats)
    for key, tensor in drop["model"].items():
        assert torch.equal(nan["model"][key], tensor), key


@pytest.mark.slow
@pytest.mark.distributed
def test_a_nan_batch_on_one_rank_is_skipped_by_every_rank(packed, tmp_path):
    """2 processes: rank 1's third batch is all NaN, rank 0's is fine. Every rank skips that
    step and puts its BatchNorm statistics back (DDP broadcasts rank 0's buffers), so the
    run ends as one where both ranks never got their third batch."""
    over = dict(train={"epochs": 1, "nonfinite": "skip"}, data={"flip": False, "num_workers": 2})
    worker = str(Path(__file__).with_name("skip_worker.py"))
    states = {}
    for mode in ("nan", "drop"):
        cfg = tiny_config(packed, tmp_path, mode, **over).to_dict()
        (tmp_path / f"{mode}.json").write_text(json.dumps(cfg))
        proc = launch(2, [str(tmp_path / f"{mode}.json"), mode], tmp_path, program=[worker])
        assert proc.returncode == 0, proc.stderr[-3000:]
        states[mode] = load_checkpoint(tmp_path / mode / "last.pt")
    assert states["nan"]["skipped_batches"] == 1 and states["drop"]["skipped_batches"] == 0
    for key, tensor in states["drop"]["model"].items():
        assert torch.equal(states["nan"]["model"][key], tensor), key


@pytest.mark.slow
def test_grad_accum_preempted_mid_epoch_resumes_bit_identical(packed, tmp_path, monkeypatch):
    """One process, grad_accum 2, 7 batches an epoch (windows 2, 2, 2, 1: the last closes
    at the epoch's end). SIGTERM during batch 3: the stop waits for the window to close."""
    over = dict(train={"epochs": 2}, optim={"grad_accum": 2}, data={"num_workers": 0})
    straight = train(tiny_config(packed, tmp_path, "straight", **over))
    real, calls = dist_seg.train.loss_fn, []

    def signalling(logits, masks, kind):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # the Trainer's handler only sets a flag
        return real(logits, masks, kind)

    monkeypatch.setattr(dist_seg.train, "loss_fn", signalling)
    assert train(tiny_config(packed, tmp_path, "cut", **over))["preempted"]
    state = load_checkpoint(tmp_path / "cut" / "last.pt")
    assert (state["epoch"], state["step"]) == (0, 4)  # batch 3 opened window 2: ends at 4
    assert state["accumulation"] == {"grad_accum": 2, "pending_micro_steps": 0}
    monkeypatch.setattr(dist_seg.train, "loss_fn", real)
    resumed = train(tiny_config(packed, tmp_path, "cut", **over), resume="auto")
    assert resumed["weights_sha256_all_ranks"] == straight["weights_sha256_all_ranks"]
    h1 = json.loads((tmp_path / "straight" / "history.json").read_text())
    h2 = json.loads((tmp_path / "cut" / "history.json").read_text())
    strip = [{k: v for k, v in r.items() if k != "epoch_seconds"} for r in h1]
    assert strip == [{k: v for k, v in r.items() if k != "epoch_seconds"} for r in h2]


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
    """The users' path: 2 processes, 2 persistent loader workers each, W&B offline, the whole
    process tree killed at once (a node that dies). The steps logged between the last
    checkpoint and the kill are trained again after the resume but not logged again."""
    base = ["train", *TINY, "--set", f"data.shards={packed}", "--set", "train.epochs=3",
            "--set", "train.batch_size=2", "--set", "data.num_workers=2",
            "--set", "run.checkpoint_every=2", "--set", "train.log_every=1",
            "--set", "wandb.mode=offline", "--set", "wandb.log_images=0",
            "--set", f"run.out_dir={tmp_path}"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    env = wandb_env(env, tmp_path / "wandb-home") | {"OMP_NUM_THREADS": "1",
                                                     "PYTHONUNBUFFERED": "1"}  # fmt: skip

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
    kill_tree(cut.pid)  # the launcher, both ranks and their loader workers, no warning
    cut.wait(timeout=60)
    time.sleep(0.5)
    state = load_checkpoint(tmp_path / "cut" / "last.pt")
    assert state["epoch"] == 0 and state["step"] > 0  # killed mid epoch 1: not vacuous
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
    runs = read_wandb(tmp_path / "cut")
    assert len(runs) == 2 and len({r["id"] for r in runs}) == 1  # the same W&B run, resumed
    steps = [r["_step"] for run in runs for r in run["rows"] if "train/loss" in r]
    # Each step at most once. What the killed W&B service had not written yet died with it
    # (steps before the checkpoint are not trained again, so not logged again); every
    # step from the checkpoint on is there.
    assert steps == sorted(set(steps))
    assert set(range(state["step"] + 1, 3 * 7 + 1)) <= set(steps)
    val = [r["_step"] for run in runs for r in run["rows"] if "val/dice_per_image" in r]
    assert val == [7, 14, 21]
    (ref,) = read_wandb(tmp_path / "ref")
    want = {r["_step"]: r["train/loss"] for r in ref["rows"] if "train/loss" in r}
    got = {r["_step"]: r["train/loss"] for run in runs for r in run["rows"] if "train/loss" in r}
    assert got == {s: want[s] for s in got}  # the values of the uninterrupted run
