"""`dist-seg compare` and the experiment configs it is meant for."""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from dist_seg import compare
from dist_seg.cli import add_plugin
from dist_seg.config import load_config
from dist_seg.errors import UserError

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = REPO / "configs" / "experiments"


def history(dices: list[float], start_loss: float = 0.7) -> list[dict]:
    return [
        {"epoch": e, "train_loss": start_loss / e, "val_loss": start_loss / e + 0.05,
         "val_dice_per_image": d, "val_dice_dataset": d + 0.01}
        for e, d in enumerate(dices, start=1)
    ]  # fmt: skip


def make_run(root: Path, name: str, rows: list[dict]) -> Path:
    run = root / name
    run.mkdir(parents=True)
    (run / "history.json").write_text(json.dumps(rows))
    return run


def test_best_numbers():
    rows = history([0.5, 0.8, 0.7, 0.8])  # a tie: the earliest epoch is the best
    assert compare.best_numbers(rows) == {
        "epochs": 4, "best_epoch": 2, "best_dice_per_image": 0.8,
        "dice_dataset_at_best": 0.8 + 0.01, "final_val_loss": 0.7 / 4 + 0.05,
    }  # fmt: skip
    rows[1]["val_dice_per_image"] = math.nan  # a diverged epoch is never the best
    assert compare.best_numbers(rows)["best_epoch"] == 4


def test_compare_draws_the_runs_and_tabulates_their_best_epochs(tmp_path, capsys):
    a = make_run(tmp_path, "lr_1e-4", history([0.6, 0.81234, 0.79]))
    b = make_run(tmp_path, "lr_1.5e-2", history([0.4, 0.5, 0.55, 0.66666], start_loss=0.9))
    out = tmp_path / "figs" / "lr.png"
    assert compare.run(argparse.Namespace(runs=[str(a), str(b)], out=str(out))) == 0
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size[0] > im.size[1]
    text = capsys.readouterr().out
    row_a = next(line for line in text.splitlines() if "lr_1e-4" in line)
    assert [c.strip() for c in row_a.strip("│┃ ").split("│")] == [
        "lr_1e-4", "3", "2", "0.8123", "0.8223", f"{0.7 / 3 + 0.05:.4f}"]  # fmt: skip
    row_b = next(line for line in text.splitlines() if "lr_1.5e-2" in line)
    assert "0.6667" in row_b and "0.6767" in row_b
    assert str(out) in text


def test_same_named_runs_keep_their_paths(tmp_path):
    a = make_run(tmp_path / "x", "unet", history([0.5]))
    b = make_run(tmp_path / "y", "unet", history([0.6]))
    assert compare.run_names([a, b]) == [str(a), str(b)]


def test_run_without_history_is_a_user_error_naming_it(tmp_path):
    good = make_run(tmp_path, "good", history([0.5]))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"empty: no history\.json"):
        compare.run(argparse.Namespace(runs=[str(good), str(tmp_path / "empty")],
                                       out=str(tmp_path / "c.png")))  # fmt: skip
    assert not (tmp_path / "c.png").exists()


def test_add_parser_sets_run_as_the_command(tmp_path):
    parser = argparse.ArgumentParser()
    add_plugin(parser.add_subparsers(dest="command"), "compare")
    args = parser.parse_args(["compare", "runs/a", "runs/b", "--out", "x.png"])
    assert args.func is compare.run and args.runs == ["runs/a", "runs/b"] and args.out == "x.png"


def test_cli_compare(tmp_path):
    a = make_run(tmp_path, "a", history([0.5, 0.6]))
    missing = tmp_path / "nope"
    cmd = [sys.executable, "-m", "dist_seg", "compare"]
    ok = subprocess.run(cmd + [str(a), "--out", str(tmp_path / "c.png")], capture_output=True,
                        text=True, timeout=120)  # fmt: skip
    assert ok.returncode == 0, ok.stderr  # needs "dist_seg.compare" in cli.PLUGINS
    assert (tmp_path / "c.png").exists()
    bad = subprocess.run(cmd + [str(a), str(missing)], capture_output=True, text=True,
                         timeout=120, cwd=tmp_path)  # fmt: skip
    assert bad.returncode == 2
    why = "no history.json (not a run directory, or no epoch finished)"
    assert bad.stderr.strip() == f"dist-seg: error: {missing}: {why}"


# --- the experiment configs ---------------------------------------------------------------
RUN_CONFIGS = sorted((REPO / "configs").glob("*.yaml")) + sorted(
    p for p in EXPERIMENTS.glob("*.yaml") if not p.name.startswith("sweep")
)
PAIRS = {  # experiment -> (config, config, the keys that differ), as the seed ran them
    "lr": ("lr_1e-4", "lr_1.5e-2", {"optim.lr": (1e-4, 1.5e-2)}),
    "flip": ("flip_on", "flip_off", {"data.flip": (True, False)}),
    "arch": ("arch_unet", "arch_resnet34_unet",
             {"model.name": ("unet", "resnet34_unet"), "train.batch_size": (20, 5)}),
}  # fmt: skip


def flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out |= flat(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_config_loads(path):
    cfg = load_config(path)
    assert cfg.name == path.stem  # runs/NAME differs per config


def test_experiment_files_are_the_pairs():
    names = {p.stem for p in EXPERIMENTS.glob("*.yaml") if not p.name.startswith("sweep")}
    assert names == {n for a, b, _ in PAIRS.values() for n in (a, b)}


@pytest.mark.parametrize("experiment", PAIRS)
def test_each_pair_differs_exactly_in_what_it_claims(experiment):
    a, b, claimed = PAIRS[experiment]
    ca, cb = (flat(load_config(EXPERIMENTS / f"{n}.yaml").to_dict()) for n in (a, b))
    differ = {k: (ca[k], cb[k]) for k in ca if ca[k] != cb[k]}
    assert differ == {"name": (a, b)} | claimed
    assert ca["wandb.group"] == experiment
    assert (ca["train.epochs"], ca["optim.lr"] if experiment != "lr" else 1e-4) == (40, 1e-4)


def test_experiments_are_the_seed_configs_apart_from_name_and_wandb():
    for name, base in (("arch_unet", "unet"), ("arch_resnet34_unet", "resnet34_unet"),
                       ("lr_1e-4", "unet"), ("flip_on", "unet")):  # fmt: skip
        exp = flat(load_config(EXPERIMENTS / f"{name}.yaml").to_dict())
        seed = flat(load_config(REPO / "configs" / f"{base}.yaml").to_dict())
        assert {k for k in exp if exp[k] != seed[k]} <= {"name", "wandb.mode", "wandb.group"}
