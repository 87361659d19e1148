"""A real one-node Slurm cluster on localhost for tests (Debian's slurm-wlm 22.05 and munge).

Everything is private to one temporary directory: its own munge key and socket, its own
slurm.conf (SLURM_CONF points every client and daemon at it), free ports, state, spool and
logs, so a cluster left over from an earlier session does not interfere. `stop()` ends only
what `start()` started: the jobs of this cluster, then the daemons by the PIDs they recorded,
then any process still carrying this cluster's SLURM_CONF (a job step's leftovers).

What works on these machines is in DESIGN.md section 7: slurmd needs a cgroup plugin
(`cgroup/v1`; 22.05 has no "disabled"), processes are tracked by `proctrack/linuxproc`, and
`SlurmdParameters=config_overrides` lets the node declare more CPUs than it has, so that
several 2-process jobs run side by side (1 CPU per process).
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

NEEDED = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "scancel", "squeue")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def why_not() -> str | None:
    """Why no cluster can start here, or None."""
    if os.geteuid() != 0:
        return "needs root (munged and slurmd run as system users)"
    missing = [name for name in NEEDED if not shutil.which(name, path=_path())]
    if missing:
        return f"missing {', '.join(missing)}: run .ci/install-slurm.sh (slurm-wlm, munge)"
    try:
        pwd.getpwnam("munge")
    except KeyError:
        return "no munge user: run .ci/install-slurm.sh"
    return None


def _path() -> str:
    return f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin"


class ClusterError(RuntimeError):
    """The cluster could not start; the message ends with the failing daemon's last log line."""


class SlurmCluster:
    """One node (this host) with ``cpus`` CPUs declared, partition ``debug``."""

    def __init__(self, cpus: int = 16):
        self.root = Path(tempfile.mkdtemp(prefix="dist-seg-slurm-"))
        self.root.chmod(0o755)  # the munge user must reach its own folder below
        self.conf = self.root / "etc" / "slurm.conf"
        self.cpus = cpus
        self.node = socket.gethostname().split(".")[0]
        self.pid_files = {
            "munged": self.root / "munge" / "munged.pid",
            "slurmctld": self.root / "run" / "slurmctld.pid",
            "slurmd": self.root / "run" / "slurmd.pid",
        }
        self.logs = {
            "munged": self.root / "munge" / "munged.log",
            "slurmctld": self.root / "log" / "slurmctld.log",
            "slurmd": self.root / "log" / "slurmd.log",
        }
        self.pids: dict[str, int] = {}

    # --- environment ---------------------------------------------------------------------
    @property
    def env(self) -> dict:
        """os.environ for clients of this cluster: SLURM_CONF, PATH with the sbin tools, no
        SLURM_* from an enclosing job."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_"))}
        return env | {"SLURM_CONF": str(self.conf), "PATH": _path()}

    def run(self, *args: str, check: bool = True, timeout: float = 30) -> str:
        proc = subprocess.run(args, env=self.env, capture_output=True, text=True,
                              timeout=timeout)  # fmt: skip
        if check and proc.returncode != 0:
            raise ClusterError(f"{' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()}")
        return proc.stdout

    # --- start and stop ------------------------------------------------------------------
    def start(self, timeout: float = 60) -> None:
        for d in ("etc", "run", "log", "state", "spool"):
            (self.root / d).mkdir()
        self._start_munge()
        self._write_conf()
        self._daemon("slurmctld", ["slurmctld", "-f", str(self.conf)])
        self._wait(lambda: "UP" in self.run("scontrol", "ping", check=False), "slurmctld", timeout)
        self._daemon("slurmd", ["slurmd", "-f", str(self.conf), "-N", self.node])
        self._wait(lambda: self.node_state() in ("idle", "mixed", "allocated"), "slurmd", timeout)

    def _start_munge(self) -> None:
        munge = pwd.getpwnam("munge")
        folder = self.root / "munge"
        folder.mkdir()
        folder.chmod(0o755)  # munged: "execute permissions for all required" on the socket
        key = folder / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        for path in (folder, key):
            os.chown(path, munge.pw_uid, munge.pw_gid)
        self.socket = folder / "munge.socket"
        self._daemon("munged", [
            "runuser", "-u", "munge", "--", "munged", f"--socket={self.socket}",
            f"--key-file={key}", f"--pid-file={self.pid_files['munged']}",
            f"--log-file={self.logs['munged']}", f"--seed-file={folder / 'munged.seed'}",
        ])  # fmt: skip

    def _write_conf(self) -> None:
        port = free_port()
        r = self.root
        self.conf.write_text(
            f"""# dist_seg test cluster ({r})
ClusterName=distsegtest
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={port}
SlurmdPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.socket}
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={self.pid_files["slurmctld"]}
SlurmdPidFile={self.pid_files["slurmd"]}
SlurmctldLogFile={self.logs["slurmctld"]}
SlurmdLogFile={self.logs["slurmd"]}
PlugStackConfig={r}/etc/plugstack.conf
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
JobRequeue=1
ReturnToService=2
SlurmdParameters=config_overrides
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
KillWait=30
MinJobAge=600
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} Boards=1 SocketsPerBoard=1 \
CoresPerSocket={self.cpus} ThreadsPerCore=1 RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes={self.node} Default=YES MaxTime=INFINITE State=UP
"""
        )
        (r / "etc" / "cgroup.conf").write_text("CgroupPlugin=cgroup/v1\n")
        (r / "etc" / "plugstack.conf").write_text("")

    def _daemon(self, name: str, argv: list[str]) -> None:
        """Starts a daemon that forks; waits for its pid file."""
        proc = subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=30)
        if proc.returncode != 0:
            raise ClusterError(f"{name} exited {proc.returncode}: {proc.stderr.strip()} "
                               f"| {self.last_log_line(name)}")  # fmt: skip
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            text = self.pid_files[name].read_text().strip() if self.pid_files[name].exists() else ""
            if text.isdigit() and _alive(int(text)):
                self.pids[name] = int(text)
                return
            time.sleep(0.2)
        raise ClusterError(f"{name} did not start: {self.last_log_line(name)}")

    def _wait(self, ready, name: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready():
                return
            if not _alive(self.pids.get(name, 0)):
                break
            time.sleep(0.5)
        raise ClusterError(f"{name} is not ready after {timeout:.0f} s: {self.last_log_line(name)}")

    def last_log_line(self, name: str) -> str:
        path = self.logs[name]
        lines = path.read_text(errors="replace").splitlines() if path.exists() else []
        return lines[-1] if lines else f"(no log in {path})"

    def stop(self) -> None:
        if self.pids.get("slurmctld"):
            subprocess.run(["scancel", "--full", "--user", "root"], env=self.env,
                           capture_output=True, timeout=30)  # fmt: skip
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and self.run("squeue", "-h", check=False).strip():
                time.sleep(1)
        for name in ("slurmd", "slurmctld", "munged"):
            pid = self.pids.pop(name, 0)
            if pid and _alive(pid):
                os.kill(pid, signal.SIGTERM)
                _wait_gone(pid, 15)
        for pid in self._leftovers():
            os.kill(pid, signal.SIGKILL)

    def _leftovers(self) -> list[int]:
        """Processes whose environment holds this cluster's SLURM_CONF (slurmstepd, job
        processes) that are still running."""
        marker = f"SLURM_CONF={self.conf}".encode()
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                if marker in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
            except OSError:
                continue
        return found

    # --- jobs ----------------------------------------------------------------------------
    def node_state(self) -> str:
        return self.run("sinfo", "-h", "-n", self.node, "-o", "%T", check=False).strip()

    def sbatch(self, args: list[str], env: dict, cwd: Path) -> str:
        """Submits as a user would (sbatch in ``cwd`` with ``env``); returns the job id."""
        proc = subprocess.run(["sbatch", "--parsable", *args], cwd=cwd, env=env | {
            "SLURM_CONF": str(self.conf), "PATH": f"{env.get('PATH', '')}:{_path()}"},
            capture_output=True, text=True, timeout=30)  # fmt: skip
        if proc.returncode != 0:
            raise ClusterError(f"sbatch {' '.join(args)} exited {proc.returncode}: {proc.stderr}")
        return proc.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict:
        """`scontrol show job -o` as a dict (JobState, Restarts, Reason, ExitCode, ...)."""
        out = self.run("scontrol", "-o", "show", "job", job_id, check=False)
        return dict(re.findall(r"(\w+)=(\S*)", out))


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = Path(f"/proc/{pid}/stat")  # a zombie counts as gone
    try:
        return state.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _wait_gone(pid: int, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if _alive(pid):
        os.kill(pid, signal.SIGKILL)
