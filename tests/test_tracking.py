"""W&B: a real tiny training logged offline, read back from its .wandb files and checked
against the run's own history.json; resume keeps the run id; disabled writes nothing;
a failed online start falls back to offline; the sweep file's command really runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from dist_seg.config import load_config
from dist_seg.runtime import make_accelerator
from dist_seg.tracking import Tracker
from dist_seg.train import train

REPO = Path(__file__).resolve().parents[1]
WANDB = str(Path(sys.executable).parent / "wandb")
LOG_EVERY = 3
STEPS_PER_EPOCH = 7  # 28 train images, batch 4, one process


def tiny(packed: Path, out: Path, name: str, epochs: int, mode: str = "offline"):
    return load_config(None, [{
        "data": {"shards": str(packed), "size": 32, "num_workers": 0},
        "model": {"width": 0.0625},
        "train": {"batch_size": 4, "precision": "no", "log_every": LOG_EVERY, "epochs": epochs},
        "run": {"out_dir": str(out), "name": name},
        "wandb": {"mode": mode, "group": "g", "tags": ["t1", "t2"]},
    }])  # fmt: skip


def read_wandb(run: Path) -> dict:
    """One offline run directory read back with W&B's own reader (DESIGN.md 5)."""
    out = subprocess.run([WANDB, "leet", "inspect", "--json", str(run)], capture_output=True,
                         text=True, timeout=120, check=True).stdout  # fmt: skip
    records = [json.loads(line) for line in out.splitlines() if line.strip()]
    head = next(r["run"] for r in records if r["type"] == "run")
    config = dict(head.get("config", {}).get("update", {}))
    for r in records:
        if r["type"] == "config":
            config.update(r["config"]["update"])
    config.pop("_wandb", None)
    history = [r["history"]["item"] for r in records if r["type"] == "history"]
    artifacts = [r["artifact"] for r in records if r["type"] == "artifact"]
    return {"id": head["run_id"], "start": head["start_time"], "head": head, "dir": run,
            "config": config, "history": history, "artifacts": artifacts}  # fmt: skip


def offline_runs(run_dir: Path) -> list[dict]:
    runs = [read_wandb(d) for d in (run_dir / "wandb").glob("offline-run-*")]
    return sorted(runs, key=lambda r: r["start"])


@pytest.fixture(scope="module")
def wandb_home(tmp_path_factory):
    """W&B's own files (settings, cache, artifacts staging) in a temporary home."""
    home = tmp_path_factory.mktemp("wandb-home")
    with pytest.MonkeyPatch.context() as mp:
        for var in ("WANDB_API_KEY", "WANDB_RUN_ID", "WANDB_SWEEP_ID", "WANDB_BASE_URL"):
            mp.delenv(var, raising=False)
        for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
            mp.setenv(var, str(home))
        mp.setenv("NETRC", str(home / "netrc"))  # no API key from the user's ~/.netrc
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_SILENT", "true")
        yield home


@pytest.fixture(scope="module")
def resumed(packed, wandb_home, tmp_path_factory):
    """A 1-epoch run, then `--resume auto` of it extended to 2 epochs, both offline."""
    out = tmp_path_factory.mktemp("runs")
    first = tiny(packed, out, "tracked", epochs=1)
    first.wandb.log_checkpoint = True  # getattr-guarded until config.py has the field
    train(first)
    second = tiny(packed, out, "tracked", epochs=2)
    second.wandb.log_checkpoint = True
    summary = train(second, resume="auto")
    run_dir = out / "tracked"
    return {"dir": run_dir, "configs": [first, second], "summary": summary,
            "history": json.loads((run_dir / "history.json").read_text()),
            "wandb": offline_runs(run_dir)}  # fmt: skip


def epoch_item(run: dict, epoch: int) -> dict:
    items = [item for item in run["history"] if item.get("epoch") == epoch]
    assert len(items) == 1, f"epoch {epoch} logged {len(items)} times"
    return items[0]


def test_resumed_run_continues_the_same_wandb_id(resumed):
    assert resumed["summary"]["epochs_done"] == 2
    run_id = (resumed["dir"] / "wandb_id.txt").read_text().strip()
    assert [r["id"] for r in resumed["wandb"]] == [run_id, run_id]  # one per process start
    assert resumed["wandb"][1]["head"].get("resume") is True
    from dist_seg.checkpoint import load_checkpoint

    assert load_checkpoint(resumed["dir"] / "last.pt")["wandb_id"] == run_id
    assert [r["head"]["display_name"] for r in resumed["wandb"]] == ["tracked", "tracked"]
    assert {r["head"]["run_group"] for r in resumed["wandb"]} == {"g"}
    assert {tuple(r["head"]["tags"]) for r in resumed["wandb"]} == {("t1", "t2")}


def test_per_epoch_values_equal_history_json(resumed):
    history, runs = resumed["history"], resumed["wandb"]
    assert [row["epoch"] for row in history] == [1, 2]
    for row, run in zip(history, runs):  # epoch 1 in the first process, epoch 2 after resume
        item = epoch_item(run, row["epoch"])
        assert item["_step"] == row["epoch"] * STEPS_PER_EPOCH
        for key, value in row.items():
            if key.startswith("val_"):
                assert item[f"val/{key[4:]}"] == value, key
        assert item["epoch_seconds"] == row["epoch_seconds"]
        # the last step's running loss is the epoch's train loss, exactly
        assert item["train/loss"] == row["train_loss"]
        assert item["train/lr"] == row["lr"]


def test_train_steps_log_loss_lr_and_throughput(resumed):
    steps = []
    for run in resumed["wandb"]:
        for item in run["history"]:
            assert {"train/loss", "train/lr", "train/images_per_s"} <= item.keys()
            assert item["train/images_per_s"] > 0 and item["train/lr"] > 0
            steps.append(item["_step"])
    expected = [e * STEPS_PER_EPOCH + s for e in range(2)
                for s in range(1, STEPS_PER_EPOCH + 1)
                if s % LOG_EVERY == 0 or s == STEPS_PER_EPOCH]  # fmt: skip
    assert steps == expected


def test_resolved_config_is_logged(resumed):
    for run, cfg in zip(resumed["wandb"], resumed["configs"]):
        assert run["config"] == cfg.to_dict()
    assert resumed["wandb"][1]["config"]["train"]["epochs"] == 2


def test_examples_panel_has_predicted_and_true_masks(resumed):
    for run in resumed["wandb"]:
        item = next(i for i in run["history"] if "epoch" in i)
        assert item["val/examples._type"] == "images/separated"
        assert item["val/examples.count"] == 4  # the whole val split (log_images is 8)
        assert len(item["val/examples.captions"]) == 4
        masks = item["val/examples.all_masks"]
        assert len(masks) == 4 and all(m.keys() == {"prediction", "truth"} for m in masks)
        for mask in masks:
            for kind in ("prediction", "truth"):
                assert mask[kind]["_type"] == "mask"
                assert (run["dir"] / "files" / mask[kind]["path"]).is_file()


def test_learning_curves_logged_every_epoch(resumed):
    for run, row in zip(resumed["wandb"], resumed["history"]):
        item = epoch_item(run, row["epoch"])
        assert item.get("curves._type") == "image-file", "curves.png not logged this epoch"
        assert (run["dir"] / "files" / item["curves.path"]).is_file()


def test_best_checkpoint_as_artifact(resumed):
    for run in resumed["wandb"]:
        (artifact,) = run["artifacts"]
        assert artifact["type"] == "model" and artifact["name"] == "tracked-best"
        assert "best" in artifact["aliases"]


def test_disabled_writes_no_wandb_directory(packed, wandb_home, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "disabled")  # the environment beats the config's offline
    train(tiny(packed, tmp_path / "runs", "quiet", epochs=1, mode="offline"))
    run_dir = tmp_path / "runs" / "quiet"
    assert (run_dir / "history.json").exists()
    assert not (run_dir / "wandb").exists() and not (run_dir / "wandb_id.txt").exists()
    assert not (tmp_path / "wandb").exists()


def start_online(tmp_path: Path) -> tuple[Tracker, Path, float]:
    cfg = tiny(Path("unused"), tmp_path, "fallback", epochs=1, mode="online")
    run_dir = cfg.run_dir()
    run_dir.mkdir(parents=True)
    t0 = time.perf_counter()
    tracker = Tracker(make_accelerator("no", 1, "wandb"), cfg, run_dir)
    seconds = time.perf_counter() - t0
    tracker.log({"x": 1.5}, step=1)
    tracker.finish()
    return tracker, run_dir, seconds


def check_fell_back(run_dir: Path, capsys) -> None:
    assert "W&B online start failed" in capsys.readouterr().err
    (run,) = offline_runs(run_dir)
    assert run["id"] == (run_dir / "wandb_id.txt").read_text().strip()
    assert [i["x"] for i in run["history"]] == [1.5]


def test_online_without_api_key_falls_back_to_offline(wandb_home, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("WANDB_MODE")
    _, run_dir, _ = start_online(tmp_path)
    check_fell_back(run_dir, capsys)


@pytest.mark.slow
def test_unreachable_server_falls_back_within_the_timeout(
    wandb_home, tmp_path, monkeypatch, capsys
):
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "1")
    _, run_dir, seconds = start_online(tmp_path)
    assert seconds < 30  # 1 s init timeout, plus W&B's ~10 s resume-status deadline at most
    check_fell_back(run_dir, capsys)


def sweep_command(value: float) -> list[str]:
    """The command a wandb 0.31 agent starts for one trial (wandb_agent.Agent._command_run)."""
    from wandb.sdk.launch.sweeps import utils

    sweep = utils.load_sweep_config(str(REPO / "configs/experiments/sweep_lr.yaml"))
    assert set(sweep["parameters"]) == {"lr"}
    command = utils.create_sweep_command(sweep["command"])
    macros = utils.create_sweep_command_args({"args": {"lr": {"value": value}}})
    macros |= {"env": ["/usr/bin/env"], "interpreter": ["python"]}
    out = []
    for item in map(str, command):
        is_macro = item.startswith("${") and item.endswith("}")
        out += (macros.get(item[2:-1]) or []) if is_macro else [item]
    return out


@pytest.mark.slow
def test_sweep_command_trains_with_the_swept_lr_under_the_agents_run_id(
    packed, wandb_home, tmp_path
):
    command = sweep_command(0.0031)
    assert "--lr=0.0031" in command
    tiny_run = ["--set", f"data.shards={packed}", "--set", "data.size=32",
                "--set", "data.num_workers=0", "--set", "model.width=0.0625",
                "--set", "train.batch_size=4", "--set", "train.precision=no",
                "--set", "train.epochs=1", "--set", f"run.out_dir={tmp_path}"]  # fmt: skip
    env = dict(os.environ, WANDB_RUN_ID="trial123", WANDB_MODE="offline",
               PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")  # fmt: skip
    proc = subprocess.run(command + tiny_run, cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    run_dir = tmp_path / "sweep-lr-trial123"
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["optim"]["lr"] == 0.0031 and saved["name"] == "lr_1e-4"
    assert saved["wandb"]["group"] == "sweep-lr"
    (run,) = offline_runs(run_dir)
    assert run["id"] == "trial123" and run["config"]["optim"]["lr"] == 0.0031


def test_a_run_killed_after_its_checkpoint_logs_no_step_twice(wandb_home, tmp_path):
    """A requeued job trains again the steps between its last checkpoint and the kill; W&B
    already holds them, so they are not logged again, and the first step it lacks is."""
    cfg = tiny(Path("unused"), tmp_path, "killed", epochs=1)
    run_dir = cfg.run_dir()
    run_dir.mkdir(parents=True)
    first = Tracker(make_accelerator("no", 1, "wandb"), cfg, run_dir)
    for step in (1, 2, 3, 4, 5):  # the checkpoint was at step 2: 3 to 5 come again
        first.log({"train/loss": float(step)}, step=step)
    first.log({"val/loss": 0.5}, step=5)
    first.finish()
    second = Tracker(make_accelerator("no", 1, "wandb"), cfg, run_dir)
    assert (second.seen_step, second.seen_keys) == (5, {"train/loss", "val/loss"})
    for step in (3, 4, 5, 6, 7):
        second.log({"train/loss": 10.0 + step}, step=step)
        if step == 5:  # the end of the epoch: only `epoch` is new at this step
            second.log({"val/loss": 0.25, "epoch": 1}, step=5)
    second.finish()
    runs = offline_runs(run_dir)
    assert len(runs) == 2 and runs[0]["id"] == runs[1]["id"]
    rows = [(i["_step"], i.get("train/loss"), i.get("val/loss"), i.get("epoch"))
            for run in runs for i in run["history"]]  # fmt: skip
    assert rows == [(1, 1.0, None, None), (2, 2.0, None, None), (3, 3.0, None, None),
                    (4, 4.0, None, None), (5, 5.0, 0.5, None), (5, None, None, 1),
                    (6, 16.0, None, None), (7, 17.0, None, None)]  # fmt: skip


def test_wandb_failing_mid_run_costs_no_checkpoint(wandb_home, tmp_path, capsys):
    """Slurm's SIGTERM to every process of a job also ends W&B's service: the next log
    raises. It warns once and training goes on (so the workers still save)."""
    cfg = tiny(Path("unused"), tmp_path, "dead", epochs=1)
    run_dir = cfg.run_dir()
    run_dir.mkdir(parents=True)
    tracker = Tracker(make_accelerator("no", 1, "wandb"), cfg, run_dir)
    tracker.log({"x": 1.0}, step=1)
    services = [pid for pid in children(os.getpid()) if b"wandb" in cmdline(pid)]
    assert services, "no W&B service process found"
    for pid in services:  # as Slurm does: SIGTERM to every process of the job
        os.kill(pid, signal.SIGTERM)
    for pid in services:
        while Path(f"/proc/{pid}").exists() and b"zombie" not in status(pid):
            time.sleep(0.05)
    tracker.log({"x": 2.0}, step=2)
    tracker.log({"x": 3.0}, step=3)
    tracker.finish()
    err = capsys.readouterr().err
    assert err.count("W&B stopped working") == 1, err
    assert tracker.enabled is False


def children(pid: int) -> list[int]:
    return [int(c) for t in Path(f"/proc/{pid}/task").iterdir()
            for c in (t / "children").read_text().split()]  # fmt: skip


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def status(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/status").read_bytes().lower()
    except OSError:
        return b"zombie"
