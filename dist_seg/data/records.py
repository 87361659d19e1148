"""The audit trail: which samples each rank trained, per epoch (docs/resume_and_audit.md).

``data.record_samples: true`` appends the keys of every batch a rank trains to
``RUN/samples/epoch-E/rank-R.txt`` (E 1-based, as in the history), one key a line, flushed
after each batch: a killed run leaves exactly what it trained, up to the batch it was in.
Each rank writes its own file (the one exception to "only the main process writes": the
record is per rank by nature); on node-local disks the files stay on each node.

Whether or not files are written, every epoch's history row carries ``train_samples`` and
``train_samples_digest`` (``summarize``): the sha256 of the sorted keys of the epoch, all
ranks, joined by newlines, so anyone can recompute it from the files:

    cat RUN/samples/epoch-3/rank-*.txt | LC_ALL=C sort | head -c -1 | sha256sum

(LC_ALL=C: byte order, as Python sorts UTF-8 keys; ``head -c -1`` drops the newline sort
puts after the last key.)
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def summarize(keys) -> tuple[int, str]:
    """(count, sha256 hex of the sorted keys joined by "\\n") of one epoch, all ranks.
    Keys sort as Python sorts strings (by code point: byte order for UTF-8)."""
    keys = sorted(keys)
    return len(keys), hashlib.sha256("\n".join(keys).encode()).hexdigest()


def epoch_dir(run_dir: Path, epoch: int) -> Path:
    """Where epoch ``epoch`` (0-based, as the trainer counts) keeps its files."""
    return Path(run_dir) / "samples" / f"epoch-{epoch + 1}"


def _keep_lines(path: Path, lines: int) -> None:
    """Cut ``path`` to its first ``lines`` lines, atomically; a file with fewer keeps all."""
    if not path.exists():
        return
    data = path.read_bytes()
    kept = data.split(b"\n")[:lines]
    out = b"".join(line + b"\n" for line in kept if line) if lines else b""
    if out == data:
        return
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(out)
    os.replace(tmp, path)


class SampleRecorder:
    """One rank's trained keys for the current epoch: in memory always (for the digest),
    in ``rank-R.txt`` when enabled. The trainer calls ``start_epoch`` before an epoch's
    first batch, ``add`` after each batch it trains, ``end_epoch`` at the epoch's end."""

    def __init__(self, run_dir: Path, rank: int, world_size: int, enabled: bool):
        self.run_dir, self.rank, self.world_size, self.enabled = run_dir, rank, world_size, enabled
        self.keys: list[str] = []
        self._file = None

    def start_epoch(self, epoch: int, trained_before: list[int] | tuple = ()) -> None:
        """``trained_before``: per rank index, the samples of this epoch trained before a
        resume (EpochLoader.trained_before); each file keeps that many lines and loses what
        a killed run trained after its checkpoint (those batches train again). Fresh epoch:
        empty files. Rank 0 also cuts the files of ranks this run does not have."""
        self.close()
        self.keys = []
        if not self.enabled:
            return
        folder = epoch_dir(self.run_dir, epoch)
        folder.mkdir(parents=True, exist_ok=True)
        counts = list(trained_before)
        mine = [self.rank]
        if self.rank == 0:  # another world size before: files of ranks that are gone
            mine += [
                int(p.stem.split("-")[1])
                for p in folder.glob("rank-*.txt")
                if p.stem.split("-")[1].isdigit() and int(p.stem.split("-")[1]) >= self.world_size
            ]
        for r in mine:
            _keep_lines(folder / f"rank-{r}.txt", counts[r] if r < len(counts) else 0)
        self._file = open(folder / f"rank-{self.rank}.txt", "a", encoding="utf-8")  # noqa: SIM115

    def add(self, keys: list[str]) -> None:
        """The keys of one trained batch; on disk (flushed) before this returns."""
        self.keys.extend(keys)
        if self._file is not None:
            self._file.write("".join(f"{k}\n" for k in keys))
            self._file.flush()

    def end_epoch(self) -> list[str]:
        """Closes the epoch's file; returns the keys this rank trained in this process."""
        self.close()
        return self.keys

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
