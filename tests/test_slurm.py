"""The SLURM scripts on a real one-node Slurm (tests/slurm_cluster.py), as a user runs them.

Five jobs of one tiny training share the node (16 CPUs declared, 2 per job: one per process)
and run side by side, because every requeue waits about 120 s (Slurm's BeginTime):
  done      `sbatch --cpus-per-task=2 train_1node.sbatch`, left alone: the reference run
  usr1      the same, then `scancel --signal=USR1 --batch` mid-epoch (what --signal=B:USR1@N
            does before a time limit)
  timelimit `--time` shortened while it trains, with `--signal=B:USR1@60`
  requeue   an admin's `scontrol requeue` mid-epoch
  multinode train_multinode.sbatch on one node
Each interrupted job must save mid-epoch, exit 75, come back under the same job id, resume
where it stopped and end with the reference's weights and history. Defaults a user gets:
2 CPU processes, data.num_workers 2 (persistent), W&B offline, the shipped configs/unet.yaml.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

import pytest
from slurm_cluster import ClusterError, SlurmCluster, why_not

from dist_seg.data.pack import pack
from dist_seg.data.synth import make_synthetic

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.distributed]

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "launch" / "slurm"
EPOCHS = 5
# The time-limit job and its uninterrupted twin (the multinode job) train longer: Slurm's
# signal comes 60 to 90 s after the limit is set (minute limits, 30 s checks), and a
# 5-epoch job alone on the node had finished by then (45 s of training).
LONG_EPOCHS = 15
STEPS = 36  # per epoch and rank: 72 train images, batch 1, 2 processes


@pytest.fixture(scope="session")
def slurm():
    """A one-node cluster for the session, or a skip that says why not."""
    reason = why_not()
    if reason:
        pytest.skip(f"no Slurm cluster: {reason}")
    cluster = SlurmCluster(cpus=16)
    try:
        cluster.start()
    except (ClusterError, OSError) as e:
        cluster.stop()
        pytest.skip(f"no Slurm cluster: {e}")
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A user's working directory: the repository's configs and launch kit, a logs/ folder,
    and 64 px shards (72 train / 8 val images)."""
    root = tmp_path_factory.mktemp("slurm-project")
    for name in ("configs", "launch"):
        (root / name).symlink_to(REPO / name)
    (root / "logs").mkdir()
    make_synthetic(root / "pets", num_images=160, seed=0)
    pack(root / "pets", root / "shards", size=64, shard_size=8, workers=1, encoding="raw")
    return root


def job_env(project: Path, epochs: int = EPOCHS) -> dict:
    args = (f"--set data.shards={project / 'shards'} --set data.size=64 --set model.width=0.0625 "
            f"--set train.batch_size=1 --set train.epochs={epochs} --set train.precision=no "
            "--set data.num_workers=2 --set train.log_every=1")  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "ACCELERATE_"))}
    return env | {"CONFIG": "configs/unet.yaml", "EXTRA_ARGS": args,
                  "VENV": str(Path(sys.executable).parents[1]), "WANDB_MODE": "offline",
                  "CUDA_VISIBLE_DEVICES": ""}  # fmt: skip


def log_of(project: Path, job: str) -> Path:
    return project / "logs" / f"dist-seg-{job}.out"


def wait_for_line(project: Path, job: str, pattern: str, seconds: float) -> re.Match:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        path = log_of(project, job)
        m = re.search(pattern, path.read_text(errors="replace") if path.exists() else "", re.M)
        if m:
            return m
        time.sleep(0.3)
    raise AssertionError(f"job {job}: no line /{pattern}/ in {seconds} s:\n{tail(project, job)}")


def wait_for_first_half(project: Path, job: str, seconds: float) -> None:
    """Until the job logs, from now on, a step in the first half of an epoch before the last:
    a signal sent then lands mid-epoch. (A pattern searched in the whole log matched lines
    long past: the job had reached the epoch's end by the time the signal came.)"""
    path, deadline = log_of(project, job), time.monotonic() + seconds
    start = path.stat().st_size if path.exists() else 0
    while time.monotonic() < deadline:
        text = path.read_bytes()[start:].decode(errors="replace") if path.exists() else ""
        for epoch, step in re.findall(rf"^epoch (\d+) (\d+)/{STEPS} ", text, re.M):
            if int(epoch) < EPOCHS and 1 <= int(step) <= STEPS // 2:
                return
        time.sleep(0.2)
    raise AssertionError(f"job {job}: no first-half step in {seconds} s:\n{tail(project, job)}")


def run_minutes(run_time: str) -> int:
    """Whole minutes, rounded up, of Slurm's RunTime ([D-]HH:MM:SS)."""
    days, _, clock = run_time.rpartition("-")
    seconds = sum(int(x) * 60**i for i, x in enumerate(reversed(clock.split(":"))))
    return -(-(int(days or 0) * 86400 + seconds) // 60)


def tail(project: Path, job: str, chars: int = 6000) -> str:
    path = log_of(project, job)
    return path.read_text(errors="replace")[-chars:] if path.exists() else "(no log)"


@pytest.fixture(scope="module")
def jobs(slurm, project) -> dict:
    """Submits the five jobs, interrupts three of them mid-epoch, waits for all to end."""
    env, long = job_env(project), job_env(project, LONG_EPOCHS)
    one, multi = str(SCRIPTS / "train_1node.sbatch"), str(SCRIPTS / "train_multinode.sbatch")
    ids = {
        "done": slurm.sbatch(["--cpus-per-task=2", one], env, project),
        "usr1": slurm.sbatch(["--cpus-per-task=2", one], env | {"GPUS_PER_NODE": "2"}, project),
        "timelimit": slurm.sbatch(
            ["--cpus-per-task=2", "--time=30", "--signal=B:USR1@60", one], long, project
        ),  # fmt: skip
        "requeue": slurm.sbatch(["--cpus-per-task=2", one], env, project),
        "multinode": slurm.sbatch(["--nodes=1", "--cpus-per-task=2", multi], long, project),
    }
    wait_for_first_half(project, ids["usr1"], 400)
    slurm.run("scancel", "--signal=USR1", "--batch", ids["usr1"])
    wait_for_first_half(project, ids["requeue"], 300)
    slurm.run("scontrol", "requeue", ids["requeue"])
    # The time limit: the job's run time rounded up to a minute, plus one: 60 to 120 s from
    # now. Slurm sends B:USR1 60 s before it, at its next 30 s check. The requeued job gets
    # its 30 minutes back.
    wait_for_line(project, ids["timelimit"], rf"^epoch 1 [1-9]/{STEPS} ", 300)
    ran = run_minutes(slurm.job(ids["timelimit"]).get("RunTime", "0:00"))
    slurm.run("scontrol", "update", f"JobId={ids['timelimit']}", f"TimeLimit={ran + 1}")
    wait_for_line(project, ids["timelimit"], r"requeueing job", 240)
    deadline = time.monotonic() + 60
    while slurm.job(ids["timelimit"]).get("JobState") != "PENDING":
        assert time.monotonic() < deadline, tail(project, ids["timelimit"])
        time.sleep(1)
    slurm.run("scontrol", "update", f"JobId={ids['timelimit']}", "TimeLimit=30")
    final = {}
    deadline = time.monotonic() + 600
    while len(final) < len(ids) and time.monotonic() < deadline:
        for name, job in ids.items():
            info = slurm.job(job)
            if name not in final and info.get("JobState") in ("COMPLETED", "FAILED", "TIMEOUT",
                                                               "CANCELLED", "NODE_FAIL"):  # fmt: skip
                final[name] = info
        time.sleep(2)
    return {name: {"id": job, "info": final.get(name) or slurm.job(job),
                   "log": log_of(project, job).read_text(errors="replace"),
                   "run": project / "runs" / job} for name, job in ids.items()}  # fmt: skip


def summary(job: dict) -> dict:
    path = job["run"] / "summary.json"
    assert path.exists(), f"no {path}:\n{job['log'][-6000:]}"
    return json.loads(path.read_text())


def history(job: dict) -> list[dict]:
    rows = json.loads((job["run"] / "history.json").read_text())
    return [{k: v for k, v in r.items() if "seconds" not in k} for r in rows]  # timings aside


def assert_completed(job: dict, restarts: int) -> None:
    state = (job["info"].get("JobState"), job["info"].get("Restarts"))
    assert state == ("COMPLETED", str(restarts)), f"job {job['id']}: {state}\n{job['log'][-8000:]}"


def assert_resumed_mid_epoch(job: dict) -> None:
    """Saved mid-epoch, exited 75, requeued, resumed at the saved epoch and step."""
    log = job["log"]
    saved = re.findall(r"preempted: saved \S+ at epoch (\d+) step (\d+); exiting 75", log)
    resumed = re.findall(r"resumed from \S+last\.pt at epoch (\d+) step (\d+)", log)
    assert len(saved) == 1 and resumed == saved, f"saved {saved}, resumed {resumed}\n{log[-8000:]}"
    assert 0 < int(saved[0][1]) < STEPS, f"not mid-epoch: {saved}"


def test_a_job_completes_with_two_synchronized_processes(jobs):
    job = jobs["done"]
    assert_completed(job, 0)
    digests = summary(job)["weights_sha256_all_ranks"]
    assert len(digests) == 2 and digests[0] == digests[1]
    assert [r["epoch"] for r in history(job)] == list(range(1, EPOCHS + 1))
    assert "2 processes, run dir runs/" in job["log"]
    assert (job["run"] / "curves.png").stat().st_mode & 0o777 == 0o644


def test_usr1_mid_epoch_saves_requeues_and_resumes_to_the_same_weights(jobs):
    job, ref = jobs["usr1"], jobs["done"]
    assert_completed(job, 1)
    assert_resumed_mid_epoch(job)
    assert "got SIGUSR1" in job["log"] and "stopped (exit 75); requeueing" in job["log"]
    # one line for the preemption, not a launcher's traceback
    assert "Traceback" not in job["log"], job["log"][-8000:]
    assert summary(job)["weights_sha256_all_ranks"] == summary(ref)["weights_sha256_all_ranks"]
    assert history(job) == history(ref)


def test_time_limit_signal_saves_requeues_and_resumes_to_the_same_weights(jobs):
    job, ref = jobs["timelimit"], jobs["multinode"]  # both LONG_EPOCHS
    assert_completed(job, 1)
    assert "got SIGUSR1" in job["log"] and "stopped (exit 75); requeueing" in job["log"]
    assert re.search(r"resumed from \S+last\.pt at epoch \d+ step \d+", job["log"]), job["log"]
    assert summary(job)["weights_sha256_all_ranks"] == summary(ref)["weights_sha256_all_ranks"]
    assert history(job) == history(ref)


def test_admin_requeue_ends_completed_with_the_same_weights(jobs):
    job, ref = jobs["requeue"], jobs["done"]
    assert_completed(job, 1)  # not FAILED: the script's own requeue finds the job pending
    assert_resumed_mid_epoch(job)
    assert summary(job)["weights_sha256_all_ranks"] == summary(ref)["weights_sha256_all_ranks"]
    assert history(job) == history(ref)


def test_multinode_script_on_one_node(jobs):
    """Uninterrupted, LONG_EPOCHS: the time-limit job's twin. Its first epochs are the
    5-epoch job's (a constant LR: nothing depends on the epoch count)."""
    job, ref = jobs["multinode"], jobs["done"]
    assert_completed(job, 0)
    assert "1 nodes x 2 processes = 2 processes" in job["log"], job["log"][-8000:]
    assert history(job)[:EPOCHS] == history(ref)
