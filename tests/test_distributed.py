"""Real multi-process runs on CPU (gloo): `accelerate launch --multi_gpu` of the CLI itself."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

TINY = [
    "--set", "data.size=32",
    "--set", "data.num_workers=1",
    "--set", "model.width=0.0625",
    "--set", "train.batch_size=4",
    "--set", "train.precision=no",
    "--set", "optim.lr=0.003",
]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(
    nproc: int, args: list[str], cwd: Path, timeout: int = 300
) -> subprocess.CompletedProcess:
    """`accelerate launch --multi_gpu --num_processes N -m dist_seg ...` with no CPU switch:
    dist_seg itself must ask for CPU processes when there is no CUDA."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
           "--num_processes", str(nproc), "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--main_process_port", str(free_port()),
           "-m", "dist_seg", *args]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def run_cli(args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "dist_seg", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


def test_two_process_train_matches_single_process_evaluate(packed, tmp_path):
    proc = launch(2, ["train", "--set", f"data.shards={packed}", "--set", "train.epochs=2",
                      "--set", f"run.out_dir={tmp_path}", "--name", "ddp", *TINY], tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = tmp_path / "ddp"
    summary = json.loads((run / "summary.json").read_text())
    hashes = summary["weights_sha256_all_ranks"]
    assert len(hashes) == 2 and hashes[0] == hashes[1], "ranks ended with different weights"
    history = json.loads((run / "history.json").read_text())
    assert [r["epoch"] for r in history] == [1, 2]
    assert all(r["val_images"] == 4 for r in history)  # every val image once, over both ranks

    out = tmp_path / "eval"
    proc = run_cli(["evaluate", "--checkpoint", str(run / "last.pt"), "--shards", str(packed),
                    "--split", "val", "--out", str(out), "--workers", "0"], tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_images"] == 4
    assert metrics["dice_per_image"] == pytest.approx(history[-1]["val_dice_per_image"], abs=1e-6)
    assert metrics["dice_dataset"] == pytest.approx(history[-1]["val_dice_dataset"], abs=1e-6)
    assert metrics["loss"] == pytest.approx(history[-1]["val_loss"], abs=1e-6)


def test_evaluate_under_three_processes_equals_one(packed, tmp_path):
    proc = run_cli(["train", "--set", f"data.shards={packed}", "--set", "train.epochs=1",
                    "--set", f"run.out_dir={tmp_path}", "--name", "one", *TINY], tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = tmp_path / "one" / "best.pt"
    results = {}
    for nproc in (1, 3):
        out = tmp_path / f"eval{nproc}"
        args = ["evaluate", "--checkpoint", str(ckpt), "--shards", str(packed), "--split", "test",
                "--out", str(out), "--workers", "1", "--batch-size", "5"]  # fmt: skip
        proc = launch(nproc, args, tmp_path) if nproc > 1 else run_cli(args, tmp_path)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        results[nproc] = json.loads((out / "metrics.json").read_text())
    assert results[1]["num_images"] == results[3]["num_images"] == 32
    for key in ("dice_per_image", "dice_dataset", "iou_per_image", "iou_dataset", "loss"):
        assert results[3][key] == pytest.approx(results[1][key], abs=1e-6), key
