"""Helpers shared by test modules: a tiny training config and real process launches.

Imported as ``from helpers import ...``: pytest's default import mode puts this folder on
``sys.path`` (tests/ is not a package), so the import works from ``pytest`` and
``python -m pytest`` alike, from any working directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from dist_seg.config import load_config

# A model and images small enough for a CPU step in milliseconds.
TINY_CONFIG = {
    "data": {"size": 32, "num_workers": 0},
    "model": {"width": 0.0625},
    "train": {"batch_size": 4, "precision": "no", "log_every": 1},
    "optim": {"lr": 3e-3},
}

# The same, as command-line overrides for runs in subprocesses (1 loader worker).
TINY = [
    "--set", "data.size=32",
    "--set", "data.num_workers=1",
    "--set", "model.width=0.0625",
    "--set", "train.batch_size=4",
    "--set", "train.precision=no",
    "--set", "optim.lr=0.003",
]  # fmt: skip


def tiny_config(packed: Path, out: Path, name: str, **sections):
    """TINY_CONFIG on the shards ``packed``, run ``out/name``; ``sections`` override it."""
    over = {k: dict(v) for k, v in TINY_CONFIG.items()}
    over["data"]["shards"] = str(packed)
    over["run"] = {"out_dir": str(out), "name": name}
    for section, values in sections.items():
        over.setdefault(section, {}).update(values)
    return load_config(None, [over])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(
    nproc: int, args: list[str], cwd: Path, timeout: int = 300, program=("-m", "dist_seg")
) -> subprocess.CompletedProcess:
    """`accelerate launch --multi_gpu --num_processes N -m dist_seg ...` with no CPU switch:
    dist_seg itself must ask for CPU processes when there is no CUDA. ``program``: what to
    launch instead of ``-m dist_seg`` (a script's path)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
           "--num_processes", str(nproc), "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--main_process_port", str(free_port()),
           *program, *args]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def run_cli(args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "dist_seg", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


def wandb_env(env: dict, home: Path) -> dict:
    """``env`` with W&B offline and its config, cache and data under ``home`` (tests set
    WANDB_MODE themselves: a user's environment may hold any value)."""
    env = {k: v for k, v in env.items() if not k.startswith("WANDB_")}
    return env | {"WANDB_MODE": "offline", "WANDB_SILENT": "true",
                  "WANDB_CONFIG_DIR": str(home), "WANDB_CACHE_DIR": str(home),
                  "WANDB_DATA_DIR": str(home), "NETRC": str(home / "netrc")}  # fmt: skip


def read_wandb(run_dir: Path) -> list[dict]:
    """Every offline W&B run of a run directory, oldest first, read with W&B's own reader
    (DESIGN.md 5): its id and history rows."""
    wandb = str(Path(sys.executable).parent / "wandb")
    runs = []
    for d in (run_dir / "wandb").glob("offline-run-*"):
        out = subprocess.run([wandb, "leet", "inspect", "--json", str(d)], capture_output=True,
                             text=True, timeout=120, check=True).stdout  # fmt: skip
        records = [json.loads(line) for line in out.splitlines() if line.strip()]
        rows = [r["history"]["item"] for r in records if r["type"] == "history"]
        # offline-run-<YYYYmmdd_HHMMSS>-<id>: a run killed early may hold no run record
        runs.append({"id": d.name.rsplit("-", 1)[1], "start": d.name, "rows": rows})
    return sorted(runs, key=lambda r: r["start"])


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc), children first."""
    out, todo = [], [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                kids = [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
            out += kids
            todo += kids
    return out


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and every process below it at once, as a node that dies does.
    Not os.killpg of the launcher: torchrun starts each rank in a session of its own, so
    that would kill the launcher alone and leave the ranks training to the end."""
    for p in [pid, *descendants(pid)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, 9)
