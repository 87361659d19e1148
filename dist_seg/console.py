"""What the user sees: rich progress in a terminal, plain periodic lines elsewhere, and W&B.

Only the main process prints or tracks; every other rank gets a Console that is silent.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager

from rich.console import Console as RichConsole
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table


class Console:
    def __init__(self, enabled: bool = True, log_every: int = 20, force_plain: bool = False):
        self.enabled = enabled
        self.log_every = max(1, log_every)
        self.rich = RichConsole(highlight=False)
        # With stdout not a terminal a rich bar prints once, at its end (DESIGN.md 6):
        # SLURM logs and CI get plain lines every `log_every` steps instead.
        self.live = self.rich.is_terminal and not force_plain
        self.rich.soft_wrap = not self.live  # a log line stays one line, not cut at 80 columns

    def print(self, *args, **kwargs) -> None:
        if self.enabled:
            self.rich.print(*args, **kwargs)

    def line(self, msg: str) -> None:
        """A plain log line (flushed: SLURM logs are read while the job runs)."""
        if self.enabled:
            print(msg, flush=True)

    @contextmanager
    def progress(self, description: str, total: int):
        """Yields ``update(advance=1, **fields)``; fields (loss, img/s) show in the bar or line."""
        if not self.enabled:
            yield lambda advance=1, **fields: None
            return
        if not self.live:
            start, done, last = time.perf_counter(), 0, {}

            def update(advance=1, **fields):
                nonlocal done
                done += advance
                last.update(fields)  # a line shows the latest values, even from earlier steps
                if done % self.log_every == 0 or done == total:
                    elapsed = time.perf_counter() - start
                    eta = elapsed / done * (total - done) if done else 0.0
                    extra = "".join(f" {k}={_fmt(v)}" for k, v in last.items())
                    self.line(f"{description} {done}/{total}{extra} eta={eta:.0f}s")

            yield update
            return
        columns = (
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeRemainingColumn(),
        )
        with Progress(*columns, console=self.rich, transient=True) as bar:
            task = bar.add_task(description, total=total, info="")

            def update(advance=1, **fields):
                info = " ".join(f"{k}={_fmt(v)}" for k, v in fields.items())
                if info:
                    bar.update(task, advance=advance, info=info)
                else:
                    bar.advance(task, advance)

            yield update

    def table(self, title: str, row: dict) -> None:
        if not self.enabled:
            return
        if not self.live:
            self.line(f"{title}: " + " ".join(f"{k}={_fmt(v)}" for k, v in row.items()))
            return
        table = Table(title=title, title_justify="left")
        for key in row:
            table.add_column(key, justify="right")
        table.add_row(*(_fmt(v) for v in row.values()))
        self.rich.print(table)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}"
    return str(v)


def wandb_mode(configured: str) -> str:
    """WANDB_MODE in the environment overrides the config (online | offline | disabled)."""
    return os.environ.get("WANDB_MODE", configured).lower()
