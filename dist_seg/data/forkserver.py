"""Imported only in the forkserver that starts DataLoader workers under DDP (its preload).

On SIGTERM, torchrun and srun signal each rank's whole process group, and the forkserver is
in it. It died of the signal, and every worker it had started exited soon after (torch's
worker watchdog takes a changed parent pid for a dead rank): the next epoch, or a
validation after a signal that came too late for the current step, raised "DataLoader
worker exited unexpectedly" instead of checkpointing (tests/test_resume.py, two nodes).
The forkserver ignores the preemption signals; the rank's own handler decides when to stop.
"""

import signal

for _name in ("SIGTERM", "SIGUSR1"):
    if hasattr(signal, _name):
        signal.signal(getattr(signal, _name), signal.SIG_IGN)
