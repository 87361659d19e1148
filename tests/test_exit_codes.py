"""Which exit code a preempted run gives, per launcher (docs/fault_tolerance.md, "Exit codes").

Two stand-in workers under the real launchers: on SIGTERM or SIGUSR1 they "checkpoint"
(0.5 s) and exit 75, as dist-seg train does. SIGTERM goes to the launcher's process group,
as torchrun, srun and `kill -- -PGID` send it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

WRAPPER = Path(__file__).parents[1] / "launch" / "slurm" / "accelerate_launch.py"

WORKER = r"""
import os, signal, sys, time
from pathlib import Path

def stop(signum, frame):
    time.sleep(0.5)
    sys.exit(75)

for sig in (signal.SIGTERM, signal.SIGUSR1):
    signal.signal(sig, stop if sys.argv[1] == "saves" else signal.SIG_IGN)
Path(sys.argv[2], os.environ["RANK"]).write_text("started")
time.sleep(120)
sys.exit(1)
"""


def run(tmp_path: Path, launcher: list[str], behaviour: str, terms: int) -> tuple[int, str]:
    (tmp_path / "worker.py").write_text(WORKER)
    ready = tmp_path / behaviour
    ready.mkdir()
    cmd = [*launcher, "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), str(tmp_path / "worker.py"), behaviour,
           str(ready)]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "PET_"))}
    env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] = "5"
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while len(list(ready.iterdir())) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
            time.sleep(0.1)
        for _ in range(terms):
            os.killpg(proc.pid, signal.SIGTERM)
            time.sleep(1)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, out


def test_plain_accelerate_launch_turns_the_workers_75_into_1(tmp_path):
    code, out = run(tmp_path, [sys.executable, "-m", "accelerate.commands.launch"], "saves", 1)
    assert code == 1, out[-3000:]
    assert "SignalException" in out


def test_wrapper_passes_the_workers_75_on_after_sigterm_to_its_group(tmp_path):
    code, out = run(tmp_path, [sys.executable, str(WRAPPER)], "saves", 1)
    assert code == 75, out[-3000:]
    assert "stopped for preemption (exit 75" in out and "Traceback" not in out, out[-3000:]


def test_wrapper_stops_workers_that_do_not_stop_at_a_second_sigterm(tmp_path):
    code, out = run(tmp_path, [sys.executable, str(WRAPPER)], "ignores", 2)
    assert code == 128 + signal.SIGTERM, out[-3000:]
    assert "got SIGTERM and stopped the workers" in out and "Traceback" not in out, out[-3000:]
