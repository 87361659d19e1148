"""Real multi-process runs on CPU (gloo): `accelerate launch --multi_gpu` of the CLI itself."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import TINY, free_port, launch, run_cli

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


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


@pytest.mark.parametrize("nproc", [1, 3])
def test_train_loss_is_the_global_mean_and_val_exact(packed, tmp_path, nproc):
    """With a vanishing learning rate the weights stay the initial ones, so the logged train
    loss can be recomputed from the loader plan: it must be the mean over every rank's
    pixels, not rank 0's. Validation must equal a single-process evaluation."""
    import torch

    from dist_seg.checkpoint import model_from_config
    from dist_seg.config import load_config
    from dist_seg.data.manifest import load_manifest
    from dist_seg.data.transforms import to_device
    from dist_seg.train import loss_fn

    args = ["train", *TINY, "--set", f"data.shards={packed}", "--set", "train.epochs=1",
            "--set", "optim.lr=1e-12", "--set", "data.flip=false",
            "--set", f"run.out_dir={tmp_path}", "--name", "gm"]  # fmt: skip
    proc = launch(nproc, args, tmp_path) if nproc > 1 else run_cli(args, tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    history = json.loads((tmp_path / "gm" / "history.json").read_text())

    cfg = load_config(tmp_path / "gm" / "config.yaml")
    torch.manual_seed(cfg.train.seed)
    model = model_from_config(cfg).train()
    manifest = load_manifest(packed)
    from dist_seg.data.stream import build_loader

    bce, pixels = 0.0, 0
    for rank in range(nproc):
        loader = build_loader(manifest, "train", batch_size=4, train=True, rank=rank,
                              world_size=nproc, num_workers=1, seed=cfg.train.seed, size=32)  # fmt: skip
        loader.set_epoch(0)
        for batch in loader:
            images, masks = to_device(batch, "cpu")
            with torch.no_grad():
                _, s = loss_fn(model(images), masks, "bce")
            bce, pixels = bce + s.item(), pixels + masks.numel()
    assert history[0]["train_loss"] == pytest.approx(bce / pixels, rel=1e-5)

    out = tmp_path / "eval"
    proc = run_cli(["evaluate", "--checkpoint", str(tmp_path / "gm" / "last.pt"), "--shards",
                    str(packed), "--split", "val", "--out", str(out), "--workers", "0"], tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    for key, hkey in (("dice_per_image", "val_dice_per_image"), ("loss", "val_loss")):
        assert metrics[key] == pytest.approx(history[0][hkey], abs=1e-6)


@pytest.mark.timeout(900)
def test_twenty_two_process_runs_all_exit_zero(packed, tmp_path):
    """The gloo abort at interpreter shutdown (DESIGN.md 3) must never fail a finished run."""
    codes = []
    for i in range(20):
        args = ["train", "--set", f"data.shards={packed}", "--set", "train.epochs=1",
                "--set", "data.num_workers=0", "--set", f"run.out_dir={tmp_path}",
                "--name", f"r{i}", *TINY]  # fmt: skip
        proc = launch(2, args, tmp_path)
        codes.append(proc.returncode)
        if proc.returncode:
            print(proc.stderr[-2000:])
    assert codes == [0] * 20


@pytest.mark.parametrize("model", ["unet", "resnet34_unet"])
def test_deepspeed_zero2_on_cpu_trains_identical_ranks_and_plain_checkpoints(
    packed, tmp_path, model
):
    pytest.importorskip("deepspeed")
    config = Path(__file__).parents[1] / "launch" / "accelerate" / "deepspeed_zero2.yaml"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
           "--num_processes", "2", "--main_process_port", str(free_port()), "-m", "dist_seg",
           "train", *TINY, "--set", f"model.name={model}", "--set", f"data.shards={packed}",
           "--set", "train.epochs=1", "--set", f"run.out_dir={tmp_path}", "--name", "ds"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "ds" / "summary.json").read_text())
    hashes = summary["weights_sha256_all_ranks"]
    assert len(hashes) == 2 and hashes[0] == hashes[1]
    history = json.loads((tmp_path / "ds" / "history.json").read_text())
    out = tmp_path / "eval"  # the same checkpoint format: evaluate reads it unchanged
    proc = run_cli(["evaluate", "--checkpoint", str(tmp_path / "ds" / "last.pt"), "--shards",
                    str(packed), "--split", "val", "--out", str(out), "--workers", "0"], tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["dice_per_image"] == pytest.approx(history[-1]["val_dice_per_image"], abs=1e-6)
