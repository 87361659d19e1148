"""The launch kit (launch/): accelerate configs and SLURM scripts, run without SLURM.

The sbatch scripts run under bash with fake SLURM_* variables and stand-ins written into
tmp_path: `srun` runs its command here, once per fake node with SLURM_NODEID set, and records
its pid (the launcher's: it execs); `scancel --signal=N` sends N to that launcher as Slurm
signals a job step; `scontrol` answers `show hostnames` and records the rest. CUDA is hidden,
so the REAL generated launcher line trains CPU processes. What only a real Slurm shows
(srun's own answer to signals, requeue, BeginTime) is tested in tests/test_slurm.py.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
ONE_NODE = LAUNCH / "slurm" / "train_1node.sbatch"
MULTI_NODE = LAUNCH / "slurm" / "train_multinode.sbatch"
JOB_ID = "4242"

SRUN = r"""#!/bin/bash
# srun stand-in: drop srun's own options (the scripts write them --opt=value), then run the
# command once per node (SLURM_NNODES) here, with SLURM_NODEID set.
printf '%s\0' "$@" >> "$FAKE_DIR/srun.argv"
while [[ $# -gt 0 && $1 == --* ]]; do shift; done
if ((${SLURM_NNODES:-1} == 1)); then echo $$ > "$FAKE_DIR/step.pid"; SLURM_NODEID=0 exec "$@"; fi
pids=()
trap 'kill -TERM "${pids[@]}" 2>/dev/null' TERM
for ((i = 0; i < SLURM_NNODES; i++)); do SLURM_NODEID=$i "$@" & pids+=($!); done
status=0
for p in "${pids[@]}"; do
    while :; do
        wait "$p" && s=0 || s=$?
        if ((s > 128)) && kill -0 "$p" 2>/dev/null; then continue; fi
        break
    done
    ((s)) && status=$s
done
exit "$status"
"""

SCONTROL = r"""#!/bin/bash
# scontrol stand-in: `show hostnames` prints FAKE_HOSTS; anything else is recorded; with
# FAKE_REQUEUED set, `requeue` fails as it does when Slurm has requeued the job itself.
if [[ $1 == show && $2 == hostnames ]]; then printf '%s\n' ${FAKE_HOSTS:-localhost}; exit 0; fi
echo "$*" >> "$FAKE_DIR/scontrol.log"
if [[ $1 == requeue && -n ${FAKE_REQUEUED:-} ]]; then
    echo "scontrol: error: Requeue of JobId=$2 failed: Job is pending execution" >&2; exit 1
fi
"""

SCANCEL = r"""#!/bin/bash
# scancel stand-in: `--signal=N JOBID` sends N to the job step (the 1-node launcher).
echo "$*" >> "$FAKE_DIR/scancel.log"
kill -s "${1#--signal=}" "$(cat "$FAKE_DIR/step.pid")"
"""

# A training-command stand-in: a worker under the real launcher that waits for SIGUSR1 (what
# the launcher relays), "checkpoints" (1 s) and exits 75, leaving a marker per rank.
WORKER = r"""
import json, os, signal, sys, time
from pathlib import Path

out = Path(os.environ["FAKE_DIR"])
rank = os.environ.get("RANK", "0")


def write(name, text):
    (out / f".{name}.tmp").write_text(text)
    os.replace(out / f".{name}.tmp", out / name)


def on_stop(signum, frame):
    time.sleep(1)
    write(f"rank{rank}.stopped", f"{signal.Signals(signum).name}, exit 75")
    sys.exit(75)


signal.signal(signal.SIGUSR1, on_stop)
write(f"rank{rank}.argv", json.dumps(sys.argv[1:]))
time.sleep(120)
write(f"rank{rank}.stopped", "no signal, exit 1")
sys.exit(1)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny(packed: Path, out: Path, epochs: int = 1) -> str:
    """EXTRA_ARGS for a seconds-long CPU run on the session's packed shards."""
    return (
        f"--set data.shards={packed} --set data.size=32 --set model.width=0.0625 "
        f"--set train.batch_size=4 --set train.epochs={epochs} --set train.precision=no "
        f"--set data.num_workers=0 --set run.out_dir={out}"
    )


@pytest.fixture
def fake(tmp_path) -> Path:
    """A directory with the srun/scontrol stand-ins in bin/; their records land beside it."""
    bin_dir = tmp_path / "fake" / "bin"
    bin_dir.mkdir(parents=True)
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL), ("scancel", SCANCEL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    (bin_dir.parent / "worker.py").write_text(WORKER)
    return bin_dir.parent


def slurm_env(fake: Path, **extra: str) -> dict:
    """The environment of a batch script on a fake 1-node, 2-GPU allocation (no SLURM, no
    CUDA, no nvidia-smi): PATH holds the stand-ins, this Python's bin, and the system's."""
    keep = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "ACCELERATE_"))}
    keep.pop("GPUS_PER_NODE", None)
    keep.pop("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", None)
    return (
        keep
        | {
            "PATH": f"{fake / 'bin'}:{Path(sys.executable).parent}:/usr/bin:/bin",
            "FAKE_DIR": str(fake),
            "SLURM_JOB_ID": JOB_ID,
            "SLURM_NNODES": "1",
            "SLURM_JOB_NODELIST": "localhost",
            "SLURM_GPUS_ON_NODE": "2",
            "CUDA_VISIBLE_DEVICES": "",
            "OMP_NUM_THREADS": "1",
            "WANDB_MODE": "disabled",
        }
        | extra
    )


def run_script(script: Path, env: dict, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(script)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


def requeues(fake: Path) -> list[str]:
    log = fake / "scontrol.log"
    return log.read_text().splitlines() if log.exists() else []


def start_script(script: Path, env: dict, logs: Path) -> subprocess.Popen:
    """The batch script in the background, its output in files (a pipe could fill up), in
    its own session so that a failing test can end what it started."""
    with (logs / "out.log").open("w") as out, (logs / "err.log").open("w") as err:
        return subprocess.Popen(["bash", str(script)], cwd=REPO, env=env, stdout=out,
                                stderr=err, start_new_session=True)  # fmt: skip


def output(logs: Path) -> str:
    return (logs / "out.log").read_text()[-3000:] + (logs / "err.log").read_text()[-3000:]


def wait_for(paths: list[Path], proc: subprocess.Popen, logs: Path, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not all(p.exists() for p in paths):
        if proc.poll() is not None:
            pytest.fail(f"the batch script ended early ({proc.returncode}):\n{output(logs)}")
        if time.monotonic() > deadline:
            pytest.fail(f"not all of {paths} appeared in {seconds} s:\n{output(logs)}")
        time.sleep(0.2)


def finish(proc: subprocess.Popen, logs: Path, timeout: int = 120) -> str:
    """Waits for the batch script; returns its stderr."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        pytest.fail(f"the batch script did not end in {timeout} s:\n{output(logs)}")
    return (logs / "err.log").read_text()


# --- the accelerate configs ---------------------------------------------------------------


YAMLS = sorted((LAUNCH / "accelerate").glob("*.yaml"))


def test_every_config_is_there():
    assert {p.name for p in YAMLS} >= {
        "cpu_2proc.yaml", "gpu_1.yaml", "node_ngpu.yaml", "multi_node.yaml",
        "deepspeed_zero1.yaml", "deepspeed_zero2.yaml",
    }  # fmt: skip


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.name)
def test_config_loads_with_accelerates_own_loader(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# Use "), f"{path.name} must open with one line saying when to use it"
    cfg = load_config_from_file(str(path))
    assert cfg.compute_environment.value == "LOCAL_MACHINE"
    assert cfg.use_cpu is False  # use_cpu does not reach the workers (DESIGN.md section 3)
    assert cfg.mixed_precision == "no"  # train.precision decides
    kind = cfg.distributed_type.value
    expected = {
        "cpu_2proc.yaml": ("MULTI_GPU", 2),
        "gpu_1.yaml": ("NO", 1),
        "node_ngpu.yaml": ("MULTI_GPU", 8),
        "multi_node.yaml": ("MULTI_GPU", -1),  # -1: accelerate insists on --num_processes
        "deepspeed_zero1.yaml": ("DEEPSPEED", 8),
        "deepspeed_zero2.yaml": ("DEEPSPEED", 8),
    }[path.name]
    assert (kind, cfg.num_processes) == expected
    if kind == "DEEPSPEED":
        ds = cfg.deepspeed_config
        assert ds["zero_stage"] == int(path.stem[-1])
        assert ds["gradient_accumulation_steps"] == 1
        assert ds["offload_optimizer_device"] == ds["offload_param_device"] == "none"
        assert "pip install -e .[deepspeed]" in first


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_cpu_2proc_config_starts_two_synchronized_processes(packed, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    env |= {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(LAUNCH / "accelerate" / "cpu_2proc.yaml"), "-m", "dist_seg", "train",
           "--config", "configs/unet.yaml", "--name", "cpu2",
           *tiny(packed, tmp_path).split()]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    hashes = json.loads((tmp_path / "cpu2" / "summary.json").read_text())[
        "weights_sha256_all_ranks"
    ]
    assert len(hashes) == 2 and hashes[0] == hashes[1]


# --- the SLURM scripts: text and logic, no training ---------------------------------------


@pytest.mark.parametrize("script", [ONE_NODE, MULTI_NODE], ids=lambda p: p.name)
def test_script_syntax_and_directives(script):
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = script.read_text()
    for line in ("#SBATCH --signal=B:USR1@90", "#SBATCH --requeue", "#SBATCH --ntasks-per-node=1",
                 "#SBATCH --output=logs/%x-%j.out", "#SBATCH --open-mode=append"):  # fmt: skip
        assert line in text
    if shutil.which("shellcheck"):
        check = subprocess.run(["shellcheck", "-s", "bash", str(script)], capture_output=True,
                               text=True)  # fmt: skip
        assert check.returncode == 0, check.stdout


def test_multinode_command_has_every_node_expand_its_own_rank(fake):
    """2 fake nodes x 2 GPUs; `echo` stands in for the launcher, so each node prints the
    command it would run."""
    env = slurm_env(fake, SLURM_NNODES="2", SLURM_JOB_NODELIST="gpu[17-18]",
                    FAKE_HOSTS="gpu17 gpu18", ACCELERATE="echo accelerate launch",
                    EXTRA_ARGS="--set 'run.name=two words'")  # fmt: skip
    proc = run_script(MULTI_NODE, env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    argv = (fake / "srun.argv").read_text().split("\0")[:-1]
    assert argv[:3] == ["--nodes=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    assert argv[-3:-1] == ["bash", "-c"]
    line = argv[-1]  # what srun hands to every node: its rank still unexpanded
    port = 20000 + int(JOB_ID) % 20000
    for part in ("--config_file launch/accelerate/multi_node.yaml", "--num_machines 2",
                 "--machine_rank $SLURM_NODEID", "--main_process_ip gpu17",
                 f"--main_process_port {port}", "--num_processes 4",
                 "-m dist_seg train --config configs/unet.yaml --resume auto"):  # fmt: skip
        assert part in line, (part, line)
    printed = sorted(proc.stdout.splitlines())
    assert len(printed) == 2
    for rank, node_line in enumerate(printed):
        assert f"--machine_rank {rank} " in node_line
        assert node_line.endswith("--resume auto --set run.name=two words")
    assert requeues(fake) == []
    assert "2 nodes x 2 processes = 4 processes, head gpu17" in proc.stderr


@pytest.mark.parametrize(
    ("gpu_env", "expected"),
    [
        ({"SLURM_GPUS_ON_NODE": "2"}, "2"),
        ({"SLURM_GPUS_ON_NODE": "", "SLURM_GPUS_PER_NODE": "a100:3"}, "3"),
        ({"SLURM_GPUS_ON_NODE": "", "SLURM_GPUS_PER_NODE": "4"}, "4"),
        ({"SLURM_GPUS_ON_NODE": "2", "GPUS_PER_NODE": "5"}, "5"),
        ({"SLURM_GPUS_ON_NODE": "", "SLURM_CPUS_PER_TASK": "3"}, "3"),  # CPU node
        ({"SLURM_GPUS_ON_NODE": ""}, "1"),  # CPU node, no --cpus-per-task
        ({"SLURM_GPUS_ON_NODE": "", "GPUS_PER_NODE": "two"}, None),
    ],
)
def test_processes_per_node_from_gpus_then_cpus(fake, gpu_env, expected):
    env = slurm_env(fake, ACCELERATE="echo", **gpu_env)
    proc = run_script(ONE_NODE, env, timeout=60)
    if expected is None:
        assert proc.returncode == 2
        assert "cannot tell the processes per node (got 'two')" in proc.stderr
        assert not (fake / "srun.argv").exists()
    else:
        assert proc.returncode == 0, proc.stderr
        assert f"--num_processes {expected} " in proc.stdout


def test_a_requeue_slurm_already_made_is_not_a_failure(fake):
    """An admin's `scontrol requeue` (or preemption) requeues the job before the script's own
    `scontrol requeue`, which then fails "Job is pending execution": the script exits 0."""
    launcher = fake / "bin" / "launcher"
    launcher.write_text("#!/bin/bash\nexit 75\n")
    launcher.chmod(0o755)
    proc = run_script(ONE_NODE, slurm_env(fake, ACCELERATE=str(launcher), FAKE_REQUEUED="1"))
    assert proc.returncode == 0, proc.stderr
    assert requeues(fake) == [f"requeue {JOB_ID}"]
    assert "already requeued" in proc.stderr


@pytest.mark.parametrize(("code", "requeued"), [(75, True), (3, False), (0, False)])
def test_exit_code_75_alone_requeues(fake, code, requeued):
    """No signal: only EX_TEMPFAIL requeues; other codes pass through. (A launcher that
    passes the worker's code on is stood in for: accelerate launch reports 1.)"""
    launcher = fake / "bin" / "launcher"
    launcher.write_text(f"#!/bin/bash\nexit {code}\n")
    launcher.chmod(0o755)
    proc = run_script(ONE_NODE, slurm_env(fake, ACCELERATE=str(launcher)), timeout=60)
    assert requeues(fake) == ([f"requeue {JOB_ID}"] if requeued else [])
    assert proc.returncode == (0 if requeued else code), proc.stderr


def test_requeues_stop_after_max_requeues(fake):
    launcher = fake / "bin" / "launcher"
    launcher.write_text("#!/bin/bash\nexit 75\n")
    launcher.chmod(0o755)
    env = slurm_env(fake, ACCELERATE=str(launcher), SLURM_RESTART_COUNT="3", MAX_REQUEUES="3")
    proc = run_script(ONE_NODE, env, timeout=60)
    assert proc.returncode == 75
    assert requeues(fake) == []
    assert "not requeued" in proc.stderr


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("sig", ["USR1", "TERM"])
def test_signal_to_batch_script_stops_workers_and_requeues(fake, sig):
    """The real launcher with 2 stand-in workers: a signal to the batch script becomes
    `scancel --signal=28 JOBID` (WINCH, to the job step, never `kill srun`), the launcher
    relays it to its workers as USR1, they exit 75, 75 comes back, the job is requeued."""
    env = slurm_env(fake, DIST_SEG=str(fake / "worker.py"), EXTRA_ARGS="--set train.epochs=7")
    proc = start_script(ONE_NODE, env, fake)
    try:
        wait_for([fake / "rank0.argv", fake / "rank1.argv"], proc, fake)
        os.kill(proc.pid, getattr(signal, f"SIG{sig}"))
        err = finish(proc, fake)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, err[-3000:]
    assert (fake / "scancel.log").read_text().splitlines() == [f"--signal=28 {JOB_ID}"]
    for rank in (0, 1):
        argv = json.loads((fake / f"rank{rank}.argv").read_text())
        assert argv == ["train", "--config", "configs/unet.yaml", "--resume", "auto",
                        "--set", "train.epochs=7"]  # fmt: skip
        assert (fake / f"rank{rank}.stopped").read_text() == "SIGUSR1, exit 75"
    assert requeues(fake) == [f"requeue {JOB_ID}"]
    assert f"got SIG{sig}" in err and "stopped (exit 75)" in err
    assert "Traceback" not in err, err[-3000:]


# --- the SLURM scripts: real training ----------------------------------------------------


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_one_node_script_trains_two_synchronized_processes(packed, tmp_path, fake):
    env = slurm_env(fake, EXTRA_ARGS=tiny(packed, tmp_path / "runs"))
    proc = run_script(ONE_NODE, env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = tmp_path / "runs" / JOB_ID  # the job id names the run
    assert (run / "best.pt").exists() and (run / "last.pt").exists()
    history = json.loads((run / "history.json").read_text())
    assert [r["val_images"] for r in history] == [4]
    hashes = json.loads((run / "summary.json").read_text())["weights_sha256_all_ranks"]
    assert len(hashes) == 2 and hashes[0] == hashes[1]
    assert requeues(fake) == []


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_multinode_script_trains_on_two_fake_nodes(packed, tmp_path, fake):
    """2 "nodes" on localhost, 1 process each: two accelerate launches meet at the head's
    address and port, with machine ranks 0 and 1 from each node's own SLURM_NODEID."""
    env = slurm_env(fake, SLURM_NNODES="2", SLURM_JOB_NODELIST="localhost,localhost",
                    SLURM_GPUS_ON_NODE="1", MAIN_PROCESS_PORT=str(free_port()),
                    EXTRA_ARGS=tiny(packed, tmp_path / "runs"))  # fmt: skip
    proc = run_script(MULTI_NODE, env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = tmp_path / "runs" / JOB_ID
    assert [r["val_images"] for r in json.loads((run / "history.json").read_text())] == [4]
    hashes = json.loads((run / "summary.json").read_text())["weights_sha256_all_ranks"]
    assert len(hashes) == 2 and hashes[0] == hashes[1]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_preempted_job_is_requeued_and_resumes(packed, tmp_path, fake):
    """The whole cycle with the real trainer: SIGUSR1 to the batch script mid-training ->
    last.pt saved, `scontrol requeue`; the same script again (as the requeued job) with
    --resume auto continues runs/<job id>/ instead of starting over."""
    out = tmp_path / "runs"
    run = out / JOB_ID
    env = slurm_env(fake, EXTRA_ARGS=f"{tiny(packed, out, epochs=500)} --set train.log_every=1")
    proc = start_script(ONE_NODE, env, fake)
    try:
        wait_for([run / "history.json"], proc, fake)  # an epoch is done: training is under way
        os.kill(proc.pid, signal.SIGUSR1)
        err = finish(proc, fake)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, err[-3000:]
    assert requeues(fake) == [f"requeue {JOB_ID}"]
    before = json.loads((run / "history.json").read_text())
    done = len(before)
    assert 1 <= done < 500, "the signal did not stop the training"

    env = slurm_env(fake, SLURM_RESTART_COUNT="1",
                    EXTRA_ARGS=f"{tiny(packed, out, epochs=done + 1)} --set train.log_every=1")  # fmt: skip
    proc = run_script(ONE_NODE, env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    after = json.loads((run / "history.json").read_text())
    assert [r["epoch"] for r in after] == list(range(1, done + 2))
    assert after[:done] == before  # carried over from last.pt (timings included), not retrained
    summary = json.loads((run / "summary.json").read_text())
    assert summary["weights_sha256_all_ranks"][0] == summary["weights_sha256_all_ranks"][1]
    assert requeues(fake) == [f"requeue {JOB_ID}"]  # no second requeue
