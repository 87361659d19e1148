"""Preemption and exact resume on the path users run: 2 processes under `accelerate launch`,
2 persistent loader workers per rank, W&B offline, gradient accumulation 2; SIGTERM sent
the way torchrun and srun send it (to the launcher's whole process group).

One uninterrupted reference run is shared by every scenario: a run cut mid-epoch and
resumed, and the same on two simulated nodes with node-local run directories, must both
end with its weights (summary.json digests of every rank) and its history.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import free_port, read_wandb, wandb_env

from dist_seg.checkpoint import load_checkpoint

pytestmark = [pytest.mark.slow, pytest.mark.distributed, pytest.mark.timeout(900)]

STEPS = 14  # 28 train samples / (2 ranks x batch 1)
EPOCHS = 2
ACCUM = 2


def settings(packed: Path, out: str) -> list[str]:
    return ["train", "--set", f"data.shards={packed}", "--set", "data.size=32",
            "--set", "data.num_workers=2", "--set", "data.persistent_workers=true",
            "--set", "model.width=0.0625", "--set", "train.batch_size=1",
            "--set", "train.precision=no", "--set", f"optim.grad_accum={ACCUM}",
            "--set", "optim.lr=0.003", "--set", f"train.epochs={EPOCHS}",
            "--set", "train.log_every=1", "--set", f"run.out_dir={out}",
            "--set", "wandb.mode=offline", "--set", "wandb.log_images=0"]  # fmt: skip


def start(packed, out, name, cwd, *extra, machines=None, **popen) -> subprocess.Popen:
    """`accelerate launch` of 2 processes in a new session (its own process group), as a
    cluster job step runs; ``machines=(rank, port)``: one process on each of 2 machines."""
    if machines is None:
        topology = ["--num_machines", "1", "--main_process_port", str(free_port())]
    else:
        topology = ["--num_machines", "2", "--machine_rank", str(machines[0]),
                    "--main_process_ip", "127.0.0.1", "--main_process_port", str(machines[1])]  # fmt: skip
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
           "--num_processes", "2", *topology, "--mixed_precision", "no",
           "--dynamo_backend", "no", "--gradient_accumulation_steps", str(ACCUM),
           "-m", "dist_seg", *settings(packed, out), "--name", name, *extra]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    env = wandb_env(env, Path(cwd) / "wandb-home") | {"OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, cwd=cwd, env=env, start_new_session=True, text=True, **popen)


def finish(proc: subprocess.Popen, timeout: int = 400) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def signal_at(procs: list[subprocess.Popen], marker: str) -> tuple[float, str]:
    """SIGTERM to every launcher's process group once the main process prints ``marker``."""
    seen = []
    for line in procs[0].stdout:
        seen.append(line)
        if line.startswith(marker):
            break
    t0 = time.perf_counter()
    for p in procs:
        os.killpg(p.pid, signal.SIGTERM)
    return t0, "".join(seen)


def history(run_dir: Path) -> list[dict]:
    rows = json.loads((run_dir / "history.json").read_text())
    return [{k: v for k, v in r.items() if k != "epoch_seconds"} for r in rows]


def digests(run_dir: Path) -> list[str]:
    return json.loads((run_dir / "summary.json").read_text())["weights_sha256_all_ranks"]


@pytest.fixture(scope="module")
def runs(packed, tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("resume")


@pytest.fixture(scope="module")
def reference(packed, runs) -> dict:
    """The uninterrupted run."""
    code, out = finish(start(packed, "runs", "ref", runs, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT))  # fmt: skip
    return {"code": code, "out": out, "dir": runs / "runs" / "ref"}


@pytest.fixture(scope="module")
def cut(packed, runs, reference) -> dict:
    """SIGTERM mid-epoch 1, then `--resume auto`; last.pt as the preempted run left it."""
    proc = start(packed, "runs", "cut", runs, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    t0, before = signal_at([proc], "epoch 1 3/")
    code, out = finish(proc)
    seconds = time.perf_counter() - t0
    run_dir = runs / "runs" / "cut"
    state = load_checkpoint(run_dir / "last.pt")
    summary = json.loads((run_dir / "summary.json").read_text())
    t1 = time.perf_counter()
    again = start(packed, "runs", "cut", runs, "--resume", "auto", stdout=subprocess.PIPE,
                  stderr=subprocess.STDOUT)  # fmt: skip
    code2, out2 = finish(again)
    return {"code": code, "out": before + out, "seconds": seconds, "state": state,
            "summary": summary, "resume_code": code2, "resume_out": out2,
            "resume_seconds": time.perf_counter() - t1, "dir": run_dir}  # fmt: skip


def test_two_process_wandb_run_exits_0_and_its_offline_run_reads_back(reference):
    assert reference["code"] == 0, reference["out"][-3000:]
    (run,) = read_wandb(reference["dir"])
    assert run["id"] == (reference["dir"] / "wandb_id.txt").read_text().strip()
    steps = [r["_step"] for r in run["rows"]]
    assert steps == list(range(1, EPOCHS * STEPS + 1))  # log_every 1: every step, once
    rows = history(reference["dir"])
    for row in rows:  # the epoch's last row carries the history's values
        item = next(r for r in run["rows"] if r.get("epoch") == row["epoch"])
        assert item["val/dice_per_image"] == row["val_dice_per_image"]
        assert item["train/loss"] == row["train_loss"]


def test_sigterm_to_the_group_saves_mid_epoch_at_a_window_boundary_and_exits_75(cut):
    assert "preempted: saved" in cut["out"] and "exiting 75" in cut["out"], cut["out"][-3000:]
    assert "DataLoader worker" not in cut["out"], cut["out"][-3000:]
    state = cut["state"]
    assert state["epoch"] == 0 and 3 <= state["step"] < STEPS, (state["epoch"], state["step"])
    assert state["step"] % ACCUM == 0  # a window boundary: no gradients needed
    assert state["accumulation"] == {"grad_accum": ACCUM, "pending_micro_steps": 0}
    assert state["train_sums"].shape == (2, 2)  # every rank's share
    assert cut["summary"]["preempted"] is True
    # torchrun's agent answers its own SIGTERM with SignalException and exit 1, whatever
    # its workers returned; the workers' 75 survives in summary.json and the log line.
    assert cut["code"] in (75, 1), cut["out"][-3000:]
    assert cut["seconds"] < 30


def test_resume_after_sigterm_ends_bit_identical_with_the_same_history(reference, cut):
    assert cut["resume_code"] == 0, cut["resume_out"][-3000:]
    step = cut["state"]["step"]
    assert f"resumed from runs/cut/last.pt at epoch 1 step {step}\n" in cut["resume_out"]
    assert "data plan unchanged" in cut["resume_out"]
    assert digests(cut["dir"]) == digests(reference["dir"])
    assert len(set(digests(cut["dir"]))) == 1
    assert history(cut["dir"]) == history(reference["dir"])  # train_loss of epoch 1 too


def test_wandb_logs_every_step_once_across_the_preemption(reference, cut):
    runs = read_wandb(cut["dir"])
    assert len(runs) == 2 and len({r["id"] for r in runs}) == 1
    steps = [r["_step"] for run in runs for r in run["rows"] if "train/loss" in r]
    assert steps == list(range(1, EPOCHS * STEPS + 1))
    (ref,) = read_wandb(reference["dir"])
    want = {r["_step"]: r["train/loss"] for r in ref["rows"]}
    got = {r["_step"]: r["train/loss"] for run in runs for r in run["rows"] if "train/loss" in r}
    assert got == want


def test_two_nodes_with_local_run_dirs_resume_from_the_main_node(packed, runs, reference):
    """Two launchers (one process each, machine ranks 0 and 1), each in its own working
    directory with a relative run dir: only node 0 has last.pt. The signal comes during
    epoch 1's validation, so the ranks stop in epoch 2, after their persistent train workers
    (children of the forkserver, which got the signal too) have been asked for batches again."""
    nodes = [runs / "node0", runs / "node1"]
    for d in nodes:
        d.mkdir()

    def both(*extra):
        port = free_port()
        return [start(packed, "runs", "mn", d, *extra, machines=(i, port),
                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
                for i, d in enumerate(nodes)]  # fmt: skip

    procs = both()
    signal_at(procs, f"epoch 1/{EPOCHS}")  # the epoch's table line, before its save
    outs = [finish(p) for p in procs]
    assert "exiting 75" in outs[0][1], outs[0][1][-3000:]
    assert not (nodes[1] / "runs" / "mn" / "last.pt").exists()  # node-local: only node 0
    state = load_checkpoint(nodes[0] / "runs" / "mn" / "last.pt")
    assert state["epoch"] == 1 and 0 < state["step"] < STEPS, (state["epoch"], state["step"])
    procs = both("--resume", "auto")
    outs = [finish(p) for p in procs]
    assert [c for c, _ in outs] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    assert digests(nodes[0] / "runs" / "mn") == digests(reference["dir"])
    assert history(nodes[0] / "runs" / "mn") == history(reference["dir"])
