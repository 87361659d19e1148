"""A rank that dies alone (SIGKILL: the OOM killer, a segfault) must not leave its loader
processes behind: its forkserver and DataLoader workers ignore SIGTERM (they must survive
a preemption, dist_seg.data.forkserver), so nothing else would ever end them."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import TINY, descendants, free_port, kill_tree

pytestmark = [
    pytest.mark.slow,
    pytest.mark.distributed,
    pytest.mark.timeout(300),
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux: /proc, prctl"),
]


def alive(pid: int) -> bool:
    """Running, not a zombie (an orphan's zombie waits for PID 1, which may never reap it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def ppid(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except OSError:
        return None


def rank_of(pid: int) -> int | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    ranks = [int(e.split(b"=", 1)[1]) for e in env if e.startswith(b"RANK=")]
    return ranks[0] if ranks else None


def describe(pids: list[int]) -> str:
    lines = []
    for pid in pids:
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            cmd = "?"
        lines.append(f"{pid}: {cmd[:150]}")
    return "\n".join(lines)


def test_sigkill_of_one_rank_ends_its_forkserver_and_loader_workers(packed, tmp_path):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
           "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--main_process_port", str(free_port()),
           "-m", "dist_seg", "train", *TINY, "--set", f"data.shards={packed}",
           "--set", "data.num_workers=2", "--set", "data.persistent_workers=true",
           "--set", "train.batch_size=1", "--set", "train.epochs=100",
           "--set", "train.log_every=1", "--set", "wandb.mode=disabled",
           "--set", f"run.out_dir={tmp_path}", "--name", "orphans"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "WANDB_"))}
    env |= {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, start_new_session=True, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    below: list[int] = []
    try:
        seen = []
        for line in proc.stdout:  # the loader workers run once batches come
            seen.append(line)
            if line.startswith("epoch 1 3/"):
                break
        else:
            pytest.fail("".join(seen)[-3000:])
        # the rank itself: a child of the launcher (its loader processes inherit RANK too)
        (rank1,) = [p for p in descendants(proc.pid) if rank_of(p) == 1 and ppid(p) == proc.pid]
        below = descendants(rank1)  # its forkserver, the workers it forked, the resource tracker
        assert len(below) >= 3, describe(below)  # not vacuous: forkserver + 2 train workers
        os.kill(rank1, signal.SIGKILL)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(alive(p) for p in below):
            time.sleep(0.2)
        left = [p for p in below if alive(p)]
        assert not left, "still running after the rank's SIGKILL:\n" + describe(left)
    finally:
        kill_tree(proc.pid)
        for pid in below:  # orphans are no longer below the launcher (and hold its stdout)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.communicate(timeout=60)
