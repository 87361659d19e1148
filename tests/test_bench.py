"""`dist-seg bench data | train` on tiny inputs: they run, and their JSON is complete and
self-consistent. No speed is asserted: timings on a shared CPU prove nothing in a test."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from dist_seg import bench
from dist_seg.cli import add_plugin
from dist_seg.data import pets
from dist_seg.errors import UserError


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="dist-seg")
    add_plugin(parser.add_subparsers(dest="command", required=True), "bench")
    return parser.parse_args(argv)


def run_bench(argv: list[str], out: Path) -> dict:
    args = parse(["bench", *argv, "--json", str(out)])
    assert args.func is bench.run
    assert bench.run(args) == 0
    return json.loads(out.read_text())


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bench-work")


@pytest.fixture
def one_thread():
    """Tiny models on a busy 2-core machine: a second intra-op thread only adds waiting
    (3x slower here), and timings are not under test."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TINY_DATA = ["--num-images", "20", "--size", "32", "--batch", "2", "--epoch-samples", "18", "--repeats", "1"]  # fmt: skip
TINY_TRAIN = ["--num-images", "20", "--size", "32", "--width", "0.0625", "--batch", "2",
              "--warmup", "1", "--workers", "0"]  # fmt: skip


def test_bench_data_json_is_complete_and_consistent(work, tmp_path, capsys):
    out = tmp_path / "data.json"
    r = run_bench(["data", "--work", str(work), "--workers", "0,1", *TINY_DATA], out)
    assert "x seed" in capsys.readouterr().out  # the table was printed
    assert r["bench"] == "data" and r["command"].startswith("dist-seg bench data ")
    assert r["machine"]["cores"] >= 1 and r["machine"]["cpu"]
    assert {"torch", "numpy", "pillow", "webdataset", "dist_seg"} <= r["versions"].keys()
    assert r["config"]["workers"] == [0, 1] and r["config"]["train_samples"] == 9
    assert r["config"]["epoch_samples"] == 18  # the train split twice
    assert [row["workers"] for row in r["results"]] == [0, 1]
    for row in r["results"]:
        cores = max(1, row["workers"])
        assert row["cores_counted"] == cores
        for kind in ("seed", "raw", "jpeg"):
            got = row[kind]
            assert got["samples_per_s"] > 0 and got["first_batch_s"] > 0
            assert got["samples_per_cpu_s"] > 0
            assert close(got["per_core"], got["samples_per_s"] / cores)
        assert (bench.RESTART in row) == (row["workers"] > 0)  # persistent workers off
        for enc in ("raw", "jpeg") + ((bench.RESTART,) if row["workers"] else ()):
            assert close(row[enc]["ratio"], row[enc]["per_core"] / row["seed"]["per_core"])
            assert close(
                row[enc]["ratio"], row[enc]["samples_per_s"] / row["seed"]["samples_per_s"]
            )
    for enc in ("raw", "jpeg"):
        ratios = [row[enc]["ratio"] for row in r["results"]]
        assert r["goal_met"][enc] == (min(ratios) >= r["goal_ratio"])
    assert set(r["bytes_per_sample"]) == {"seed_files", "raw", "jpeg"}
    assert all(b > 0 for b in r["bytes_per_sample"].values())
    assert r["bytes_per_sample"]["raw"] > 32 * 32 * 4  # image + trimap arrays, plus tar headers
    for enc in ("raw", "jpeg"):
        assert len(r["profile_us_per_sample"][enc]) == 7
        assert all(us > 0 for us in r["profile_us_per_sample"][enc].values())


def test_bench_data_reuses_its_work_directory(work, tmp_path):
    run_bench(["data", "--work", str(work), "--workers", "0", *TINY_DATA], tmp_path / "a.json")
    manifest = work / "synth-20-32-raw-s256" / "manifest.json"
    created = json.loads(manifest.read_text())["created"]
    mtime = manifest.stat().st_mtime_ns
    run_bench(["data", "--work", str(work), "--workers", "0", *TINY_DATA], tmp_path / "b.json")
    assert manifest.stat().st_mtime_ns == mtime
    assert json.loads(manifest.read_text())["created"] == created


def test_bench_train_json_is_complete_and_consistent(work, tmp_path, capsys, one_thread):
    out = tmp_path / "train.json"
    r = run_bench(["train", "--work", str(work), *TINY_TRAIN, "--steps", "4"], out)
    assert "real trainer vs bare step" in capsys.readouterr().out
    assert r["bench"] == "train" and r["command"].startswith("dist-seg bench train ")
    cfg = r["config"]
    assert (cfg["model"], cfg["size"], cfg["batch"], cfg["device"]) == ("unet", 32, 2, "cpu")
    assert cfg["precision"] == "no" and cfg["channels_last"] is True
    assert r["flops_per_image"] > 0
    assert set(r["variants"]) == {"seed", "bare", "trainer"}
    for v in r["variants"].values():
        assert v["step_s"] > 0 and v["cpu_step_s"] > 0
        assert v["step_s"] == min(v["rounds_step_s"]) and len(v["rounds_step_s"]) == 3
        assert close(v["images_per_s"], cfg["batch"] / v["step_s"])
        assert close(v["ms_per_image"], 1e3 * v["step_s"] / cfg["batch"])
        assert close(v["tflops"], r["flops_per_image"] * cfg["batch"] / v["step_s"] / 1e12)
        assert v["mfu"] is None and v["peak_mem_gib"] is None  # CPU: no peak table, no CUDA
    seed, bare, trainer = (r["variants"][k]["step_s"] for k in ("seed", "bare", "trainer"))
    assert close(r["speedup_vs_seed"], seed / bare)
    assert close(r["trainer_overhead_pct"], 100 * (trainer / bare - 1))
    cpu = r["variants"]["trainer"]["cpu_step_s"] / r["variants"]["bare"]["cpu_step_s"]
    assert close(r["trainer_overhead_cpu_pct"], 100 * (cpu - 1))
    assert r["overhead_goal_met"] == (r["trainer_overhead_pct"] <= r["overhead_goal_pct"])
    assert (work / "runs" / "bench-train" / "config.yaml").exists()  # a real Trainer ran


def test_bench_train_other_model_bf16_without_trainer(work, tmp_path, one_thread):
    r = run_bench(["train", "--work", str(work), *TINY_TRAIN, "--steps", "1",
                   "--model", "resnet34_unet", "--stem-pool", "--precision", "bf16",
                   "--no-channels-last", "--no-trainer"], tmp_path / "t.json")  # fmt: skip
    assert set(r["variants"]) == {"seed", "bare"} and "trainer_overhead_pct" not in r
    assert r["config"]["precision"] == "bf16" and r["config"]["channels_last"] is False
    assert r["config"]["stem_pool"] is True and r["flops_per_image"] > 0


@pytest.mark.slow  # one torch.compile
def test_bench_train_switches_flip_one_switch_each(work, tmp_path, one_thread):
    r = run_bench(["train", "--work", str(work), *TINY_TRAIN, "--steps", "1", "--switches",
                   "--no-trainer", "--repeats", "1"], tmp_path / "t.json")  # fmt: skip
    assert r["config"]["switches"] is True
    assert set(r["variants"]) == {
        "seed",
        "bare",
        "bare, precision bf16",
        "bare, channels_last False",
        "bare, compile True",
        "bare + flips on the device",
    }  # CPU: no fp16 and no cudnn variants
    assert all(v["step_s"] > 0 for v in r["variants"].values())


@pytest.mark.parametrize(
    "argv",
    [
        ["data", "--size", "48", "--workers", "2", "--batch", "8"],
        ["train", "--model", "resnet34_unet", "--no-channels-last", "--compile", "--no-trainer",
         "--precision", "bf16", "--width", "0.5"],
    ],
)  # fmt: skip
def test_command_line_reproduces_the_arguments(argv):
    args = parse(["bench", *argv])
    again = parse(bench.command_line(args).split()[1:])
    assert vars(again) == vars(args)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["data", "--size", "40"], "multiple of 16"),
        (["data", "--workers", "one"], "--workers"),
        (["train", "--steps", "0"], "at least 1"),
    ],
)
def test_bad_arguments_are_one_clear_error(argv, message, tmp_path):
    with pytest.raises(UserError, match=message):
        bench.run(parse(["bench", *argv, "--work", str(tmp_path)]))


def test_seed_style_dataset_is_the_course_template(synth_root):
    names = [r.name for r in pets.read_split(synth_root, "train")][:3]
    sample = bench.SeedStyleDataset(synth_root, names, 48)[0]
    assert sample["image"].shape == (3, 48, 48) and sample["image"].dtype == np.uint8
    assert sample["mask"].shape == (1, 48, 48) and sample["mask"].dtype == np.float32
    assert set(np.unique(sample["mask"])) <= {0.0, 1.0}
    assert sample["trimap"].shape == (1, 48, 48)
    # the template's mask is the trimap under the seed's policy (border = foreground)
    np.testing.assert_array_equal(sample["mask"], (sample["trimap"] != 2).astype(np.float32))


def test_timed_loader_cuts_and_chains_epochs():
    class FakeLoader:
        def __init__(self):
            self.epochs = []

        def set_epoch(self, epoch, skip_batches=0):
            self.epochs.append(epoch)

        def __iter__(self):
            e = self.epochs[-1]
            return (f"{e}/{i}" for i in range(3))

    inner = FakeLoader()
    timed = bench.TimedLoader(inner, 5, torch.device("cpu"), sync_at=())
    timed.set_epoch(7)
    assert len(timed) == 5
    assert list(timed) == ["7/0", "7/1", "7/2", "1000007/0", "1000007/1"]
    assert sorted(timed.ends) == [-1, 0, 1, 2, 3, 4]
    assert all(timed.ends[k][0] <= timed.ends[k + 1][0] for k in range(-1, 4))  # wall
    assert all(timed.ends[k][1] <= timed.ends[k + 1][1] for k in range(-1, 4))  # CPU
