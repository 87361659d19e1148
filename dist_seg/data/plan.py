"""The training data plan of one epoch, and what a run had trained of it after S batches.

Two numberings of a split's N samples:
  * *canonical* index: manifest order, shard after shard;
  * epoch *position*: the epoch's order, the same on every rank: the shard list shuffled and
    the concatenation rotated by an offset, both from (seed, epoch).
A plan takes the positions still to train in the epoch (all N for a plain epoch, what a
resumed run left otherwise) in epoch order and cuts them into world x steps batches of B:
rank r takes a contiguous run of steps x B, its loader worker parts contiguous runs of whole
batches within it (the DataLoader yields batch j from part j % parts), and each part's
samples go through a shuffle buffer seeded per (seed, epoch, rank, part).

Replay: webdataset's shuffle picks ``buf[rng.randint(0, len(buf) - 1)]`` and never looks at
a sample, so its output order depends only on how many samples come in and the rng. Fed
positions instead of samples, it yields the positions in the order the loader yields the
samples, without reading any data: what a run of any world size had trained after S
batches, on any rank, with no communication (``Plan.consumed``).

Elastic resume (``resume``): the samples trained before the interruption become the new
plan's ``base``; the rest of the epoch is planned again at the new world size, workers and
batch size, so every sample is trained at most once and fewer than one new global batch is
left out. Later epochs are plain again. Everything in a state is plain ints, strings, lists
and bytes: checkpoints load with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, replace
from itertools import islice

import numpy as np
import webdataset as wds

from dist_seg.errors import UserError

STATE_VERSION = 1


def train_steps(num_samples: int, world_size: int, batch_size: int) -> int:
    """Optimizer micro-steps per epoch on every rank: the same number everywhere."""
    return num_samples // (world_size * batch_size)


def shard_order(counts: tuple[int, ...], seed: int, epoch: int) -> tuple[list[int], int]:
    """Shard indices in the epoch's order and its rotation offset. random.shuffle draws
    depend only on the length, so this is the permutation stream.epoch_order applies."""
    rng = random.Random(f"{seed}/{epoch}")
    order = list(range(len(counts)))
    rng.shuffle(order)
    return order, rng.randrange(max(1, sum(counts)))


def to_bits(mask: np.ndarray) -> bytes:
    return np.packbits(mask.astype(bool), bitorder="little").tobytes()


def from_bits(bits: bytes | None, n: int) -> np.ndarray:
    if bits is None:
        return np.zeros(n, dtype=bool)
    return np.unpackbits(np.frombuffer(bits, np.uint8), count=n, bitorder="little").astype(bool)


def shards_digest(names: list[str], counts: tuple[int, ...]) -> str:
    """Which data a plan numbers: shard file names (not where they live) and their counts."""
    text = "\n".join(f"{n.rsplit('/', 1)[-1]} {c}" for n, c in zip(names, counts))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Plan:
    """Which positions every rank and worker part trains in one epoch, in what order."""

    counts: tuple[int, ...]  # samples per shard, manifest order
    seed: int
    epoch: int
    world_size: int
    parts: int  # loader worker parts: num_workers, at least 1
    batch_size: int
    shuffle_buffer: int
    base: bytes | None = None  # canonical bitmap: trained before this plan began (None: none)
    generation: int = 0  # plans before this one in the epoch: 0 for a plain epoch

    @property
    def num_total(self) -> int:
        return sum(self.counts)

    def epoch_to_canonical(self) -> np.ndarray:
        """perm[position] = canonical index."""
        starts = np.cumsum((0, *self.counts))
        order, offset = shard_order(self.counts, self.seed, self.epoch)
        if not order:
            return np.zeros(0, dtype=np.int64)
        concat = np.concatenate([np.arange(starts[i], starts[i + 1]) for i in order])
        return np.roll(concat, -offset)

    def remaining(self) -> np.ndarray:
        """Epoch positions this plan trains from, ascending: all of them for a plain epoch."""
        if self.base is None:
            return np.arange(self.num_total)
        done = from_bits(self.base, self.num_total)
        return np.flatnonzero(~done[self.epoch_to_canonical()])

    def num_remaining(self) -> int:
        if self.base is None:
            return self.num_total
        return self.num_total - int(from_bits(self.base, self.num_total).sum())

    def steps(self) -> int:
        return train_steps(self.num_remaining(), self.world_size, self.batch_size)

    def part_batches(self, part: int, steps: int) -> tuple[int, int]:
        """(first, count): part ``part`` owns batches part, part + parts, ... of its rank,
        held as one contiguous run of ``count`` batches from the rank's batch ``first``."""
        first = sum(len(range(p, steps, self.parts)) for p in range(part))
        return first, len(range(part, steps, self.parts))

    def part_positions(self, rank: int, part: int, remaining: np.ndarray | None = None):
        """Epoch positions part ``part`` of rank ``rank`` reads, ascending."""
        steps = self.steps()
        first, count = self.part_batches(part, steps)
        a = (rank * steps + first) * self.batch_size
        if self.base is None:  # no array: the plain plan is a range
            return np.arange(a, a + count * self.batch_size)
        remaining = self.remaining() if remaining is None else remaining
        return remaining[a : a + count * self.batch_size]

    def rng(self, rank: int, part: int) -> random.Random:
        tag = f"/resume-{self.generation}" if self.generation else ""
        return random.Random(f"{self.seed}/{self.epoch}/{rank}/{part}{tag}")

    def shuffle(self, rank: int, part: int):
        """The shuffle stage of one part, as the loader applies it to raw samples."""
        size = self.shuffle_buffer
        return wds.shuffle(size, size, rng=self.rng(rank, part))

    def consumed(self, batches: int) -> np.ndarray:
        """Canonical mask of what all ranks had trained after ``batches`` batches of this plan,
        base included: a replay of every part's shuffle over positions, no data read."""
        mask = from_bits(self.base, self.num_total)
        if batches <= 0:
            return mask
        perm, remaining, steps = self.epoch_to_canonical(), self.remaining(), self.steps()
        batches = min(batches, steps)
        for rank in range(self.world_size):
            for part in range(self.parts):
                n = len(range(part, batches, self.parts)) * self.batch_size
                if n:
                    positions = self.part_positions(rank, part, remaining).tolist()
                    taken = list(islice(self.shuffle(rank, part)(iter(positions)), n))
                    mask[perm[taken]] = True
        return mask


def fingerprint(plan: Plan, workers: int, grad_accum: int, shards: str) -> dict:
    return {
        "seed": plan.seed,
        "world_size": plan.world_size,
        "workers": workers,
        "batch_size": plan.batch_size,
        "shuffle_buffer": plan.shuffle_buffer,
        "num_samples": plan.num_total,
        "shards": shards,
        "grad_accum": grad_accum,
    }


def make_state(plan: Plan, fp: dict, batches: int, trained_before: list[int]) -> dict:
    """The loader's part of a checkpoint: plain values only."""
    return {
        "version": STATE_VERSION,
        "fingerprint": dict(fp),
        "epoch": plan.epoch,
        "batches": int(batches),
        "generation": plan.generation,
        "base": plan.base,
        "trained_before": [int(t) for t in trained_before],
    }


@dataclass
class Resumed:
    """Where a loader stands after ``resume``."""

    plan: Plan
    skip: int  # batches of ``plan`` already trained
    trained_before: list[int]  # per rank index: samples trained in the epoch before ``plan``
    consumed: np.ndarray | None  # canonical mask of what was trained in the epoch (mid-epoch)
    message: str


_NAMES = {
    "world_size": "world size",
    "workers": "workers",
    "batch_size": "batch size",
    "shuffle_buffer": "shuffle buffer",
    "seed": "seed",
    "grad_accum": "grad accumulation",
}
PLAN_KEYS = ("seed", "world_size", "batch_size", "shuffle_buffer", "num_samples", "shards")


def _bad_state(why: str) -> UserError:
    return UserError(
        f"the checkpoint's data-plan state is unreadable ({why}); resume with the dist_seg "
        "version that wrote it, or start a new run (--set run.name=NEW)"
    )


def resume(state: dict, new: Plan, fp: dict) -> Resumed:
    """Position a loader of plan ``new`` (epoch and base ignored) from a saved ``state``."""
    try:
        if state.get("version") != STATE_VERSION:
            raise _bad_state(f"version {state.get('version')!r}, expected {STATE_VERSION}")
        old_fp, epoch, batches = (
            dict(state["fingerprint"]),
            int(state["epoch"]),
            int(state["batches"]),
        )
        generation, base = int(state["generation"]), state["base"]
        trained_before = [int(t) for t in state["trained_before"]]
        old = replace(
            new,
            seed=int(old_fp["seed"]),
            epoch=epoch,
            world_size=int(old_fp["world_size"]),
            parts=max(1, int(old_fp["workers"])),
            batch_size=int(old_fp["batch_size"]),
            shuffle_buffer=int(old_fp["shuffle_buffer"]),
            base=None if base is None else bytes(base),
            generation=generation,
        )
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise _bad_state(f"{type(e).__name__}: {e}") from None
    changes = [f"{_NAMES[k]} {old_fp.get(k)} -> {fp[k]}" for k in _NAMES if old_fp.get(k) != fp[k]]
    same_data = all(old_fp.get(k) == fp[k] for k in ("num_samples", "shards"))
    same_plan = old_fp.get("workers") is not None and old.parts == new.parts
    same_plan = same_plan and all(old_fp.get(k) == fp[k] for k in PLAN_KEYS)
    mid_epoch = batches > 0 or base is not None
    what = ", ".join(changes) if changes else "data plan unchanged"
    if not mid_epoch:
        if not same_data:
            what = ", ".join([*changes, f"training split {old_fp.get('num_samples')} -> "
                              f"{fp['num_samples']} samples"])  # fmt: skip
        start = replace(new, epoch=epoch, base=None, generation=0)
        return Resumed(start, 0, [], None, f"{what}: epoch {epoch + 1} starts from its beginning")
    if not same_data:
        raise UserError(
            f"the training split changed since the checkpoint ({old_fp.get('num_samples')} -> "
            f"{fp['num_samples']} samples or other shards) in the middle of epoch {epoch + 1}: "
            "what was trained cannot be carried over; resume with the shards it was trained "
            "on, or start a new run (--set run.name=NEW)"
        )
    if old.num_total != new.num_total or (base is not None and len(base) * 8 < old.num_total):
        raise _bad_state("its sample bitmap does not match the split")
    steps = old.steps()
    if batches > steps:
        raise _bad_state(f"batch {batches} of an epoch of {steps} batches")
    consumed = old.consumed(batches)
    done = [*trained_before, *[0] * max(0, old.world_size - len(trained_before))]
    for r in range(old.world_size):
        done[r] += batches * old.batch_size
    if same_plan:
        kept = replace(new, epoch=epoch, base=old.base, generation=generation)
        return Resumed(
            kept, batches, trained_before, consumed,
            f"{what}: epoch {epoch + 1} continues at batch {batches} of {steps}, "
            "the same batches in the same order",
        )  # fmt: skip
    plan = replace(new, epoch=epoch, base=to_bits(consumed), generation=generation + 1)
    trained, left = int(consumed.sum()), plan.num_remaining()
    steps_new = plan.steps()
    out = left - steps_new * plan.world_size * plan.batch_size
    return Resumed(
        plan, 0, done, consumed,
        f"{what}: the rest of epoch {epoch + 1} is replanned: {trained} samples already "
        f"trained are skipped, {left - out} train in {steps_new} batches per rank, "
        f"{out} left out",
    )  # fmt: skip
