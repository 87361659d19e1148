"""`accelerate launch` for the SLURM scripts (and any job runner that acts on exit codes): the
same launcher and arguments, with a preemption reported in one line and its exit code 75
passed on, however the signal came.

    python launch/slurm/accelerate_launch.py --config_file X.yaml ... -m dist_seg train ...

What plain `accelerate launch` (1.15, torchrun's elastic agent) does under a real Slurm
22.05, and what this changes (launch/README.md, "Seen under a real Slurm"):
- Stopping the workers. Slurm signals every process of a job step, not one: USR1 kills
  Python's multiprocessing resource tracker (it ignores only INT and TERM: "resource_tracker:
  process died unexpectedly", KeyError tracebacks, leaked shared memory) and the agent
  itself (orphaned workers); TERM kills the W&B service process (the next wandb.log raises
  ConnectionResetError) and makes the agent raise. So the scripts send SIGWINCH
  (`scancel --signal=WINCH $SLURM_JOB_ID`), which every process ignores by default, and
  this launcher relays it as SIGUSR1 to its own workers (their pids, not their process
  groups); a USR1 sent to the launcher alone is relayed the same way.
- Workers that stop for preemption exit 75 (checkpoint saved, requeue me); the agent raises
  ChildFailedError (and SIGTERMs the workers still finishing: exit -15) and accelerate exits
  1 with a ~40-line traceback. Here: one line, and the first failed worker's exit code
  (75; 2 for a dist-seg usage error), which the scripts act on.
- SIGTERM to the launcher (`kill`, a container runtime's stop, torchrun's and srun's
  process-group signal, Slurm's SIGTERM to every process of a job: an admin's `scontrol
  requeue`, preemption, the time limit) made the agent stop the workers itself and raise
  SignalException: a ~30-line traceback and exit 1, whatever the workers returned (they had
  saved and exited 75). Here the agent is told not to handle SIGTERM (torchrun's own
  --signals-to-handle, as PET_SIGNALS_TO_HANDLE): the first SIGTERM is relayed to the
  workers like USR1, they save and exit 75, and 75 comes back. A second SIGTERM stops them
  the agent's way (SIGTERM, then SIGKILL after TORCH_ELASTIC_SHUTDOWN_TIMEOUT): one line,
  exit 128 + 15.
Anything else raises exactly as `accelerate launch` does.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from pathlib import Path

EX_TEMPFAIL = 75  # dist-seg train: stopped by a signal, checkpoint saved


def workers() -> list[int]:
    """This process's children: the workers torchrun started (Popen, one per rank)."""
    pids = []
    for task in Path("/proc/self/task").iterdir():
        with contextlib.suppress(OSError):
            pids += [int(p) for p in (task / "children").read_text().split()]
    return pids


def relay(signum, frame) -> None:
    for pid in workers():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGUSR1)  # dist_seg's handler: checkpoint at the next step


def on_term(signum, frame) -> None:
    """SIGTERM: relayed once (the workers save and exit 75); with no workers yet, or the
    second time, the launcher stops: the agent then stops its workers as torchrun does."""
    on_term.count = getattr(on_term, "count", 0) + 1
    if not workers():
        print("dist-seg: the launcher got SIGTERM before its workers ran", file=sys.stderr)
        raise SystemExit(128 + signum)
    if on_term.count > 1:
        from torch.distributed.elastic.multiprocessing.api import SignalException

        raise SignalException("SIGTERM", sigval=signal.Signals(signum))
    relay(signum, frame)


def main() -> int:
    # A caught signal is reset by exec: a worker that has not installed its own handler yet
    # dies of the relayed USR1 (the script then requeues from the last checkpoint).
    signal.signal(signal.SIGWINCH, relay)
    signal.signal(signal.SIGUSR1, relay)
    signal.signal(signal.SIGTERM, on_term)
    # torchrun's agent installs its handlers when it starts the workers; this keeps it off
    # SIGTERM: torchrun's --signals-to-handle (default SIGTERM,SIGINT,SIGHUP,SIGQUIT), which
    # accelerate does not pass on but torchrun also reads from PET_SIGNALS_TO_HANDLE.
    os.environ["PET_SIGNALS_TO_HANDLE"] = "SIGINT,SIGHUP,SIGQUIT"
    from accelerate.commands.accelerate_cli import main as accelerate
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    sys.argv = ["accelerate", "launch", *sys.argv[1:]]
    try:
        accelerate()
    except ChildFailedError as e:
        # The root cause is the first worker to fail; the agent then SIGTERMs the others
        # (exit -15). Its own report adds nothing to the workers' output above it.
        rank, first = e.get_first_failure()
        code = first.exitcode if first.exitcode > 0 else 128 - first.exitcode
        if code == EX_TEMPFAIL:
            print("dist-seg: the workers stopped for preemption (exit 75, checkpoint saved)",
                  file=sys.stderr, flush=True)  # fmt: skip
        else:
            print(f"dist-seg: rank {rank} failed first, exit {first.exitcode} "
                  f"({len(e.failures)} of the workers failed)", file=sys.stderr, flush=True)  # fmt: skip
        return code
    except SignalException as e:
        print(f"dist-seg: the launcher got {e.sigval.name} and stopped the workers",
              file=sys.stderr, flush=True)  # fmt: skip
        return 128 + int(e.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
