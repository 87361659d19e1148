"""Imported only in the forkserver that starts DataLoader workers under DDP (its preload).

On SIGTERM, torchrun and srun signal each rank's whole process group, and the forkserver is
in it. It died of the signal, and every worker it had started exited soon after (torch's
worker watchdog takes a changed parent pid for a dead rank): the next epoch, or a
validation after a signal that came too late for the current step, raised "DataLoader
worker exited unexpectedly" instead of checkpointing (tests/test_resume.py, two nodes).
The forkserver ignores the preemption signals; the rank's own handler decides when to stop.

The other side of that: a rank that dies alone (SIGKILL, the OOM killer, a segfault) left
its forkserver and workers running for good, orphans that ignore SIGTERM (seen: both,
and the resource tracker they keep open, still there minutes later; tests/test_orphans.py).
On Linux the kernel now kills them with their parent (PR_SET_PDEATHSIG): the forkserver
when the rank dies, each worker when the forkserver does.
"""

import ctypes
import os
import signal
import sys

for _name in ("SIGTERM", "SIGUSR1"):
    if hasattr(signal, _name):
        signal.signal(getattr(signal, _name), signal.SIG_IGN)

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(parent: int) -> None:
    """SIGKILL this process when ``parent`` ends; at once if it has ended already (the
    death signal is only armed for a parent that is still there). Linux only: elsewhere,
    nothing. The kernel ties the signal to the parent's *thread* that started this process;
    dist_seg starts its loaders, hence the forkserver, from the main thread."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            return
    except (OSError, AttributeError):  # no libc prctl (an unusual libc): as before
        return
    if os.getppid() != parent:
        os._exit(1)


# The forkserver: with the rank (its parent, which spawned it a moment ago).
die_with_parent(os.getppid())
# Every worker it forks: with the forkserver. The hook runs in the child right after fork.
os.register_at_fork(after_in_child=lambda server=os.getpid(): die_with_parent(server))
