"""The trainer end to end in one process, its config and command line, resume and preemption."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import tiny_config

from dist_seg.checkpoint import load_checkpoint, model_from_checkpoint
from dist_seg.cli import _legacy_overrides, build_parser
from dist_seg.config import load_config, parse_set
from dist_seg.errors import UserError
from dist_seg.train import EXIT_PREEMPTED, train


# --- config and command line --------------------------------------------------------------------
def test_seed_command_line_maps_onto_the_config(tmp_path):
    args = build_parser().parse_args(
        ["train", "--model", "resnet34", "--data_path", str(tmp_path / "oxford-iiit-pet"),
         "--epochs", "40", "--batch_size", "5", "--learning-rate", "0.0001", "--flip", "No"]
    )  # fmt: skip
    cfg = load_config(None, [_legacy_overrides(args)])
    assert cfg.model.name == "resnet34_unet"
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.optim.lr) == (40, 5, 1e-4)
    assert cfg.data.flip is False
    assert cfg.data.root == str(tmp_path / "oxford-iiit-pet")  # raw root: packed once
    assert cfg.data.shards == "shards/oxford-iiit-pet-256"


def test_toolkit_spellings_and_set_overrides():
    args = build_parser().parse_args(
        ["train", "--config", "configs/unet.yaml", "--lr", "0.01", "--batch-size", "3",
         "--no-flip", "--set", "model.width=0.5", "--set", "wandb.tags=a,b"]
    )  # fmt: skip
    cfg = load_config(args.config, [_legacy_overrides(args), parse_set(args.overrides)])
    assert (cfg.optim.lr, cfg.train.batch_size, cfg.data.flip) == (0.01, 3, False)
    assert cfg.model.width == 0.5 and cfg.wandb.tags == ["a", "b"]
    assert cfg.name == "unet"


@pytest.mark.parametrize(
    "item, message",
    [
        ("train.nope=1", "unknown config key 'train.nope'"),
        ("train.batch_size=two", "train.batch_size must be int"),
        ("optim.lr=0", "optim.lr: 0.0 must be > 0"),
        ("train.batch_size=0", "train.batch_size: 0 must be >= 1"),
        ("data.size=100", "data.size: 100 must be a multiple of 16"),
        ("model.name=vgg", "model.name: 'vgg' is not one of"),
        ("data.flip=maybe", "data.flip must be bool"),
    ],
)
def test_bad_config_values_are_one_clear_error(item, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(".", r"\.")):
        load_config(None, [parse_set([item])])


def test_cli_error_is_one_line_and_exit_2(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "dist_seg", "train", "--set", "optim.lr=-1"],
        capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "dist-seg: error: config optim.lr: -1.0 must be > 0"
    ]


def test_precision_and_sync_bn_refused_on_cpu(packed, tmp_path):
    with pytest.raises(UserError, match="fp16 needs a GPU"):
        train(tiny_config(packed, tmp_path, "fp16", train={"precision": "fp16"}))
    with pytest.raises(UserError, match="SyncBatchNorm does not run on CPU"):
        train(tiny_config(packed, tmp_path, "sbn", train={"sync_bn": True}))


# --- a whole run ---------------------------------------------------------------------------------
def test_run_leaves_history_curves_and_the_best_checkpoint(packed, tmp_path):
    summary = train(tiny_config(packed, tmp_path, "run", train={"epochs": 3}))
    run = tmp_path / "run"
    history = json.loads((run / "history.json").read_text())
    assert [r["epoch"] for r in history] == [1, 2, 3]
    assert all(r["val_images"] == 4 for r in history)
    assert (run / "history.csv").read_text().splitlines()[0].startswith("epoch,train_loss,val_loss")
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    dices = [r["val_dice_per_image"] for r in history]
    best_epoch = dices.index(max(dices)) + 1
    assert summary["best_epoch"] == best_epoch
    best = load_checkpoint(run / "best.pt")
    assert best["epoch"] == best_epoch and best["metrics"]["val_dice_per_image"] == max(dices)
    last = load_checkpoint(run / "last.pt")
    assert last["epoch"] == 3 and last["step"] == 0 and "optimizer" in last
    # The best checkpoint rebuilds the model it was saved from, with no pickle involved.
    model, cfg, _ = model_from_checkpoint(run / "best.pt")
    assert cfg.model.width == 0.0625
    assert torch.equal(model.state_dict()["head.weight"], best["model"]["head.weight"])


def test_resume_after_an_epoch_gives_the_same_weights(packed, tmp_path):
    straight = train(tiny_config(packed, tmp_path, "straight", train={"epochs": 2}))
    train(tiny_config(packed, tmp_path, "split", train={"epochs": 1}))
    resumed = train(tiny_config(packed, tmp_path, "split", train={"epochs": 2}), resume="auto")
    assert resumed["weights_sha256_all_ranks"] == straight["weights_sha256_all_ranks"]
    h1 = json.loads((tmp_path / "straight" / "history.json").read_text())
    h2 = json.loads((tmp_path / "split" / "history.json").read_text())
    strip = [{k: v for k, v in r.items() if k != "epoch_seconds"} for r in h1]
    assert strip == [{k: v for k, v in r.items() if k != "epoch_seconds"} for r in h2]


def test_resume_refuses_another_architecture(packed, tmp_path):
    train(tiny_config(packed, tmp_path, "a", train={"epochs": 1}))
    other = tiny_config(packed, tmp_path, "a", model={"width": 0.125})
    with pytest.raises(UserError, match="resume with the same model"):
        train(other, resume="auto")


@pytest.mark.slow
def test_sigterm_mid_epoch_checkpoints_exits_75_and_resumes_exactly(packed, tmp_path):
    args = ["--set", f"data.shards={packed}", "--set", "data.size=32", "--set", "data.num_workers=0",
            "--set", "model.width=0.0625", "--set", "train.batch_size=2", "--set", "train.precision=no",
            "--set", "train.log_every=1", "--set", "train.epochs=2", "--set", f"run.out_dir={tmp_path}"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "dist_seg", "train", *args]
    ref = subprocess.run([*cmd, "--name", "ref"], env=env, capture_output=True, text=True)
    assert ref.returncode == 0, ref.stderr[-2000:]

    proc = subprocess.Popen([*cmd, "--name", "cut"], env=env, stdout=subprocess.PIPE, text=True)
    for line in proc.stdout:  # plain lines: stdout is a pipe
        if line.startswith("epoch 1 3/"):
            proc.send_signal(signal.SIGTERM)
            break
    rest = proc.stdout.read()
    assert proc.wait(timeout=120) == EXIT_PREEMPTED, rest
    state = load_checkpoint(tmp_path / "cut" / "last.pt")
    assert state["epoch"] == 0 and 3 <= state["step"] < 14  # stopped mid-epoch 1
    time.sleep(0.1)
    again = subprocess.run(
        [*cmd, "--name", "cut", "--resume", "auto"], env=env, capture_output=True, text=True
    )
    assert again.returncode == 0, again.stderr[-2000:]
    s_ref = json.loads((tmp_path / "ref" / "summary.json").read_text())
    s_cut = json.loads((tmp_path / "cut" / "summary.json").read_text())
    assert s_cut["weights_sha256_all_ranks"] == s_ref["weights_sha256_all_ranks"]
    h_ref = json.loads((tmp_path / "ref" / "history.json").read_text())
    h_cut = json.loads((tmp_path / "cut" / "history.json").read_text())
    for a, b in zip(h_ref, h_cut, strict=True):
        assert (
            a["train_loss"] == b["train_loss"]
            and a["val_dice_per_image"] == b["val_dice_per_image"]
        )


def test_a_raw_root_is_packed_once_then_reused(synth_root, tmp_path):
    shards = tmp_path / "shards"
    over = {"data": {"root": str(synth_root), "shards": str(shards)}, "train": {"epochs": 1}}
    cfg = tiny_config(shards, tmp_path, "raw", **over)
    train(cfg)
    manifest = shards / "manifest.json"
    first = manifest.stat().st_mtime_ns
    assert json.loads(manifest.read_text())["image_size"] == 32
    train(cfg)
    assert manifest.stat().st_mtime_ns == first  # reused, not repacked


def test_yaml_floats_without_a_dot_parse(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 1e-4\ntrain:\n  epochs: 3\n")
    cfg = load_config(path)
    assert cfg.optim.lr == 1e-4 and cfg.train.epochs == 3 and cfg.name == "c"


def test_ema_is_evaluated_saved_and_resumed(packed, tmp_path):
    over = {"train": {"epochs": 2, "ema_decay": 0.9, "select": "ema"}}
    straight = train(tiny_config(packed, tmp_path, "ema", **over))
    history = json.loads((tmp_path / "ema" / "history.json").read_text())
    assert all("val_ema_dice_per_image" in r for r in history)
    assert history[0]["val_ema_loss"] != history[0]["val_loss"]  # a different set of weights
    best = load_checkpoint(tmp_path / "ema" / "best.pt")
    last = load_checkpoint(tmp_path / "ema" / "last.pt")
    picked = max(history, key=lambda r: r["val_ema_dice_per_image"])
    assert best["epoch"] == picked["epoch"] == straight["best_epoch"]
    if best["epoch"] == 2:  # best.pt holds the EMA weights, not the raw ones
        ema_head = last["ema"]["module.head.weight"]
        assert torch.equal(best["model"]["head.weight"], ema_head)
        assert not torch.equal(best["model"]["head.weight"], last["model"]["head.weight"])
    one = {"train": {"epochs": 1, "ema_decay": 0.9, "select": "ema"}}
    train(tiny_config(packed, tmp_path, "ema2", **one))
    resumed = train(tiny_config(packed, tmp_path, "ema2", **over), resume="auto")
    assert resumed["weights_sha256_all_ranks"] == straight["weights_sha256_all_ranks"]
    h2 = json.loads((tmp_path / "ema2" / "history.json").read_text())
    assert [r["val_ema_dice_per_image"] for r in h2] == [
        r["val_ema_dice_per_image"] for r in history
    ]


def test_early_stopping_stops_after_patience(packed, tmp_path):
    summary = train(tiny_config(packed, tmp_path, "es", train={"epochs": 30, "early_stop_patience": 1},
                                optim={"lr": 1e-9}))  # fmt: skip
    history = json.loads((tmp_path / "es" / "history.json").read_text())
    assert summary["early_stopped"] == len(history) < 30
    dices = [r["val_dice_per_image"] for r in history]
    assert max(dices[:-1]) >= dices[-1]  # the last epoch did not improve


def test_ema_of_a_bf16_model_moves_by_a_small_lerp():
    """The EMA is kept in fp32: a lerp by 0.001 from 1.0 to 2.0 gives 1.001, which bf16
    (step 2**-7 near 1) would round back to 1.0, so a bf16 average would never move."""
    from dist_seg.config import load_config
    from dist_seg.train import make_ema

    model = torch.nn.Linear(1, 1, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        model.weight.fill_(1.0)
    cfg = load_config(None, [{"train": {"ema_decay": 0.999, "ema_warmup": False}}])
    ema = make_ema(model, cfg)
    ema.update_parameters(model)  # the first update copies the weights
    with torch.no_grad():
        model.weight.fill_(2.0)
    ema.update_parameters(model)
    assert ema.module.weight.dtype == torch.float32
    assert ema.module.weight.item() == pytest.approx(1.001, abs=1e-6)
    assert torch.tensor(1.001).to(torch.bfloat16).item() == 1.0  # what bf16 would have kept


def test_resume_from_a_foreach_adam_checkpoint_steps_fused(packed, tmp_path):
    """Checkpoints of earlier versions hold foreach Adam's groups on CPU; loading them must
    not turn the optimizer back into foreach Adam, which refuses the device-side skip."""
    cfg = tiny_config(packed, tmp_path, "old", train={"epochs": 1})
    train(cfg)
    path = tmp_path / "old" / "last.pt"
    state = torch.load(path, weights_only=True)
    for group in state["optimizer"]["param_groups"]:
        group["fused"], group["foreach"] = None, True  # as written before
    torch.save(state, path)
    cfg = tiny_config(packed, tmp_path, "old", train={"epochs": 2})
    summary = train(cfg, resume="auto")
    assert summary["epochs_done"] == 2 and summary["ranks_agree"]
