"""Preemption and resume under DeepSpeed ZeRO-2 on the users' path: `accelerate launch` with
the shipped launch/accelerate/deepspeed_zero2.yaml, 2 CPU processes on gloo, 2 persistent
loader workers per rank, SIGTERM to the launcher's process group mid-epoch.

ZeRO keeps the fp32 master weights and Adam's moments only in per-rank slices, built in
`accelerator.prepare`. Weights loaded after prepare were overwritten by the masters at the
first step, and a checkpoint without the slices restarted Adam: either way the resumed run
ended with other weights than the uninterrupted one. Here they must be bit-identical.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import free_port

from dist_seg.checkpoint import load_checkpoint

pytestmark = [
    pytest.mark.slow,
    pytest.mark.distributed,
    pytest.mark.timeout(900),
    pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs deepspeed"),
]

CONFIG = Path(__file__).parents[1] / "launch" / "accelerate" / "deepspeed_zero2.yaml"
STEPS = 14  # 28 train samples / (2 ranks x batch 1)
EPOCHS = 2


def environment() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "WANDB_"))}
    return env | {"WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def accelerate(nproc: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIG),
            "--num_processes", str(nproc), "--main_process_port", str(free_port()), *args]  # fmt: skip


def start(packed: Path, cwd: Path, name: str, *extra: str, nproc: int = 2) -> subprocess.Popen:
    """A dist_seg run in a new session (its own process group), as a cluster job step runs."""
    cmd = accelerate(nproc, "-m", "dist_seg", "train", "--set", f"data.shards={packed}",
                     "--set", "data.size=32", "--set", "data.num_workers=2",
                     "--set", "data.persistent_workers=true", "--set", "model.width=0.0625",
                     "--set", "train.batch_size=1", "--set", "train.precision=no",
                     "--set", "optim.lr=0.003", "--set", f"train.epochs={EPOCHS}",
                     "--set", "train.log_every=1", "--set", "wandb.mode=disabled",
                     "--set", "run.out_dir=runs", "--name", name, *extra)  # fmt: skip
    return subprocess.Popen(cmd, cwd=cwd, env=environment(), start_new_session=True, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip


def finish(proc: subprocess.Popen, timeout: int = 400) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def digests(run_dir: Path) -> list[str]:
    return json.loads((run_dir / "summary.json").read_text())["weights_sha256_all_ranks"]


def history(run_dir: Path) -> list[dict]:
    rows = json.loads((run_dir / "history.json").read_text())
    return [{k: v for k, v in r.items() if k != "epoch_seconds"} for r in rows]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ds-resume")


@pytest.fixture(scope="module")
def reference(packed, runs) -> dict:
    code, out = finish(start(packed, runs, "ref"))
    return {"code": code, "out": out, "dir": runs / "runs" / "ref"}


@pytest.fixture(scope="module")
def cut(packed, runs) -> dict:
    """SIGTERM to the launcher's group during epoch 1, then `--resume auto`."""
    proc = start(packed, runs, "cut")
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("epoch 1 3/"):
            break
    os.killpg(proc.pid, signal.SIGTERM)
    code, out = finish(proc)
    run_dir = runs / "runs" / "cut"
    state = load_checkpoint(run_dir / "last.pt")  # weights_only=True: plain data only
    (runs / "runs" / "one").mkdir()  # the same last.pt, for a resume on 1 process
    shutil.copyfile(run_dir / "last.pt", runs / "runs" / "one" / "last.pt")
    code2, out2 = finish(start(packed, runs, "cut", "--resume", "auto"))
    return {"code": code, "out": "".join(seen) + out, "state": state, "resume_code": code2,
            "resume_out": out2, "dir": run_dir}  # fmt: skip


def test_zero2_reference_run_trains_identical_ranks(reference):
    assert reference["code"] == 0, reference["out"][-3000:]
    assert len(set(digests(reference["dir"]))) == 1


def test_zero2_preemption_saves_every_ranks_optimizer_slices(cut):
    assert "exiting 75" in cut["out"], cut["out"][-3000:]
    state = cut["state"]
    assert state["epoch"] == 0 and 3 <= state["step"] < STEPS, (state["epoch"], state["step"])
    zero = state["optimizer"]["zero"]
    assert zero["world_size"] == 2
    buffers = ("running_mean", "running_var", "num_batches_tracked")
    numel = sum(t.numel() for k, t in state["model"].items() if not k.endswith(buffers))
    assert sum(g["numel"] for g in zero["groups"]) == numel  # whole, without ZeRO's padding
    for group in zero["groups"]:  # both ranks' halves of the moments, not zeros
        half = group["numel"] // 2
        for key in ("exp_avg", "exp_avg_sq"):
            moments = group["state"][key]
            assert moments.shape == (group["numel"],)
            assert moments[:half].abs().sum() > 0 and moments[half:].abs().sum() > 0
        assert int(group["state"]["step"]) == state["step"]  # grad_accum 1: a step a batch


def test_zero2_resume_after_sigterm_ends_bit_identical(reference, cut):
    assert cut["resume_code"] == 0, cut["resume_out"][-3000:]
    step = cut["state"]["step"]
    assert f"resumed from runs/cut/last.pt at epoch 1 step {step}\n" in cut["resume_out"]
    assert "zero" in cut["state"]["optimizer"]  # DeepSpeed's ZeRO ran (not plain DDP)
    assert "Adam restarts" not in cut["resume_out"], cut["resume_out"][-3000:]
    assert digests(cut["dir"]) == digests(reference["dir"])
    assert history(cut["dir"]) == history(reference["dir"])


def test_zero2_resume_on_one_process_restores_the_optimizer_and_finishes(packed, runs, cut):
    """Another world size: ZeRO's slices are cut anew (exactness of that: the round trip
    below); the data plan replans the rest of the epoch (docs/resume_and_audit.md)."""
    code, out = finish(start(packed, runs, "one", "--resume", "auto", nproc=1))
    assert code == 0, out[-3000:]
    step = cut["state"]["step"]
    assert f"resumed from runs/one/last.pt at epoch 1 step {step}\n" in out
    assert "Adam restarts" not in out, out[-3000:]
    assert json.loads((runs / "runs" / "one" / "summary.json").read_text())["epochs_done"] == 2


ROUND_TRIP = textwrap.dedent("""
    import sys, torch
    from dist_seg.checkpoint import gather_zero_state, load_zero_state
    from dist_seg.models import build_model
    from dist_seg.runtime import make_accelerator

    mode, path = sys.argv[1], sys.argv[2]
    acc = make_accelerator()  # as the trainer makes it: DeepSpeed on gloo on CPU
    acc.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = 2
    torch.manual_seed(0)
    model = build_model("unet", width=0.0625)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4, foreach=True)
    if mode == "load":
        held = torch.load(path, weights_only=True)
        model.load_state_dict(held["model"])
    model, optimizer = acc.prepare(model, optimizer)
    if mode == "load":
        assert load_zero_state(optimizer, held["optimizer"], path) is None
    else:
        for step in range(3):
            torch.manual_seed(100 + 10 * step + acc.process_index)
            x = torch.randn(2, 3, 32, 32)
            acc.backward(model(x).float().square().mean())
    state = gather_zero_state(optimizer, acc.is_main_process)
    if acc.is_main_process:
        weights = acc.unwrap_model(model).state_dict()
        torch.save({"model": weights, "optimizer": state}, sys.argv[3])
    acc.wait_for_everyone()
    torch.distributed.destroy_process_group()
""")


def test_zero_state_round_trips_across_world_sizes(tmp_path):
    """Saved by 2 ranks, loaded by 1, saved again; loaded by 2, saved again: the same fp32
    master weights, moments and step each time (ZeRO cuts its slices at another place)."""
    script = tmp_path / "round_trip.py"
    script.write_text(ROUND_TRIP)
    env = environment()
    trips = [("train", 2, "w2.pt", "w2.pt"), ("load", 1, "w2.pt", "w1.pt"),
             ("load", 2, "w1.pt", "w2b.pt")]  # fmt: skip
    for mode, nproc, src, dst in trips:
        proc = subprocess.run(accelerate(nproc, str(script), mode, src, dst), cwd=tmp_path,
                              env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    saved = [
        torch_load(tmp_path / name)["optimizer"]["zero"] for name in ("w2.pt", "w1.pt", "w2b.pt")
    ]
    assert [z["world_size"] for z in saved] == [2, 1, 2]
    for zero in saved[1:]:
        assert len(zero["groups"]) == len(saved[0]["groups"])
        for got, want in zip(zero["groups"], saved[0]["groups"], strict=True):
            assert got["numel"] == want["numel"]
            assert got["fp32"].equal(want["fp32"])
            assert set(got["state"]) == set(want["state"]) == {"step", "exp_avg", "exp_avg_sq"}
            for key, value in want["state"].items():
                assert got["state"][key].equal(value), key
        assert zero["param_groups"] == saved[0]["param_groups"]
    assert int(saved[0]["groups"][0]["state"]["step"]) == 3


def torch_load(path: Path) -> dict:
    import torch

    return torch.load(path, weights_only=True)
