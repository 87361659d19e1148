"""scripts/gpu_check.sh's plumbing on the CPU (its --dry-run): stage selection and order,
per-stage timeouts, the JSON and the log, so the first GPU session measures instead of
debugging the script. Every stage runs the real command at tiny sizes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "gpu_check.sh"
STAGES = ["tests", "bench_train", "max_batch", "bench_data", "train_2ep"]


def gpu_check(tmp_path: Path, *args: str, timeout: int = 900, **env: str):
    out = tmp_path / "out"
    full = {**os.environ, "PYTHON": sys.executable, "OUT": str(out), "OMP_NUM_THREADS": "1",
            "GPU_CHECK_WORK": str(tmp_path / "work"), **env}  # fmt: skip
    proc = subprocess.run([str(SCRIPT), *args], cwd=tmp_path, env=full, capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip
    result = json.loads((out / "gpu_check.json").read_text()) if (out / "gpu_check.json").exists() else None  # fmt: skip
    return proc, result, out


def test_the_script_is_executable_and_lists_its_stages(tmp_path):
    assert os.access(SCRIPT, os.X_OK)
    proc, result, _ = gpu_check(tmp_path, "--help")
    assert proc.returncode == 0 and all(s in proc.stdout for s in STAGES)
    assert "pip download --no-deps -d .whl" in proc.stdout and result is None


def test_an_unknown_stage_is_one_line_and_runs_nothing(tmp_path):
    proc, result, out = gpu_check(tmp_path, "--dry-run", "tests", "bench")
    assert proc.returncode == 2 and result is None and not out.exists()
    assert proc.stderr.strip().count("\n") == 0 and "unknown stage 'bench'" in proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal without CUDA")
def test_without_cuda_it_refuses_unless_a_dry_run(tmp_path):
    proc, result, _ = gpu_check(tmp_path, "tests", GPU_CHECK_ALLOW_CPU="0")
    assert proc.returncode == 2 and result is None
    assert "no CUDA device" in proc.stderr and "--dry-run" in proc.stderr


@pytest.mark.slow
def test_chosen_stages_run_in_order_and_a_timeout_does_not_stop_the_next(tmp_path):
    # named out of order; `tests` gets 1 s: killed, recorded, and max_batch still runs
    proc, result, out = gpu_check(tmp_path, "max_batch", "tests", GPU_CHECK_ALLOW_CPU="1",
                                  GPU_CHECK_TIMEOUT_tests="1")  # fmt: skip
    assert proc.returncode == 1, proc.stdout + proc.stderr  # a stage did not pass
    assert list(result["stages"]) == ["tests", "max_batch"] and result["dry_run"] is True
    tests, max_batch = result["stages"]["tests"], result["stages"]["max_batch"]
    assert tests["status"] == "timeout" and tests["exit"] == 137 and tests["seconds"] < 30
    assert max_batch["status"] == "ok" and max_batch["figures"] == {"refused": "no CUDA"}
    assert "needs CUDA" in (out / "max_batch.log").read_text()  # the bench's one-line refusal
    log = (out / "gpu_check.log").read_text()
    assert log.index("== tests") < log.index("== max_batch") and "tests: timeout" in log


@pytest.mark.slow
def test_a_dry_run_of_every_stage_writes_every_figure(tmp_path):
    proc, result, out = gpu_check(tmp_path, "--dry-run")
    assert proc.returncode == 0, proc.stdout + proc.stderr + (out / "gpu_check.log").read_text()
    stages = result["stages"]
    assert list(stages) == STAGES and result["device"] == "cpu"
    assert all(s["status"] == "ok" and s["exit"] == 0 and s["seconds"] > 0 for s in stages.values())
    assert all((out / s["log"]).stat().st_size > 0 for s in stages.values())
    t = stages["tests"]["figures"]
    assert t["tests"] >= 8 and t["failures"] == t["errors"] == 0
    assert t["skipped"] == t["tests"]  # no CUDA here: every gpu test skips, with its reason
    unet, r34 = stages["bench_train"]["figures"]["unet"], stages["bench_train"]["figures"]["resnet34_unet"]  # fmt: skip
    assert set(unet["variants"]) == {"seed", "bare", "trainer"} and "trainer_overhead_pct" in unet
    assert set(r34["variants"]) == {"seed", "bare"} and r34["flops_per_image"] > 0
    assert unet["variants"]["bare"]["images_per_s"] > 0 and unet["variants"]["bare"]["mfu"] is None
    data = stages["bench_data"]["figures"]["cpu"]
    assert set(data["workers"]) == {"0", "1"}
    assert data["workers"]["0"]["wds raw"]["toolkit_ratio"] > 0
    epochs = stages["train_2ep"]["figures"]["epochs"]
    assert [e["epoch"] for e in epochs] == [1, 2]
    assert stages["train_2ep"]["figures"]["summary"]  # the run's summary.json, copied
