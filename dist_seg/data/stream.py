"""The streaming loader: manifest -> this rank's batches, for any rank, world size and workers.

How samples are assigned (DESIGN.md section 2 has the traps this avoids):
  * Every rank derives the same epoch order from (seed, epoch) in its main process: the
    shard list is shuffled and the concatenated sample sequence is rotated by a random
    offset. Nothing asks the process group from inside a DataLoader worker.
  * Ranks and then workers take contiguous *sample* ranges of that sequence (not whole
    shards), so any shard count works for any world size x workers.
  * Train: an epoch is floor(N / (world x batch)) steps on every rank, so DDP never waits
    on a rank that ran dry; each sample is used at most once per epoch and the remainder
    differs from epoch to epoch (new shard order and offset).
  * Eval: the fixed order is cut into ``world`` near-equal ranges, so every sample is seen
    exactly once at any world size, with no padding duplicates; a rank may get nothing.
"""

from __future__ import annotations

import ctypes
import functools
import multiprocessing
import os
import random
import tarfile
from collections import deque
from dataclasses import dataclass
from itertools import islice

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dist_seg.data import pets, tarread
from dist_seg.data.manifest import Manifest, Shard, is_url
from dist_seg.data.pack import decode_sample
from dist_seg.errors import DataError, UserError


@dataclass(frozen=True)
class Segment:
    """Samples [start, stop) of one shard, in the order the shard stores them."""

    shard: Shard
    start: int
    stop: int


def train_steps(num_samples: int, world_size: int, batch_size: int) -> int:
    """Optimizer micro-steps per epoch on every rank: the same number everywhere."""
    return num_samples // (world_size * batch_size)


def split_evenly(total: int, parts: int, index: int) -> tuple[int, int]:
    """[start, stop) of part ``index`` when ``total`` items are cut into ``parts`` near-equal runs."""
    return total * index // parts, total * (index + 1) // parts


def segments(shards: list[Shard], start: int, length: int) -> list[Segment]:
    """Segments covering ``length`` samples from position ``start`` of the circular
    concatenation of ``shards``."""
    total = sum(s.num_samples for s in shards)
    out: list[Segment] = []
    if length <= 0 or total == 0:
        return out
    bounds = np.cumsum([0] + [s.num_samples for s in shards])
    pos = start % total
    while length > 0:
        i = int(np.searchsorted(bounds, pos, side="right")) - 1
        first = pos - int(bounds[i])
        take = min(shards[i].num_samples - first, length)
        out.append(Segment(shards[i], first, first + take))
        length -= take
        pos = (pos + take) % total
    return out


def epoch_order(shards: list[Shard], seed: int, epoch: int) -> tuple[list[Shard], int]:
    """The shard order and rotation offset of one training epoch, the same on every rank."""
    rng = random.Random(f"{seed}/{epoch}")
    order = list(shards)
    rng.shuffle(order)
    return order, rng.randrange(max(1, sum(s.num_samples for s in shards)))


def read_segments(segs) -> object:
    """Stage: segments -> raw WebDataset samples (bytes), checked against the manifest counts."""
    for seg in segs:
        got = 0
        try:
            for sample in _samples(seg):
                if not is_complete(sample):  # a cut inside a sample leaves part of it
                    break
                got += 1
                yield sample
        except (tarfile.TarError, OSError, ValueError) as e:
            raise DataError(
                f"shard {seg.shard.url} is unreadable ({e}); repack with `dist-seg pack`"
            ) from None
        if got != seg.stop - seg.start:
            raise DataError(
                f"shard {seg.shard.url} holds fewer samples than its manifest says "
                f"({seg.start + got} < {seg.shard.num_samples}): truncated or altered; "
                "repack with `dist-seg pack`"
            )


_OFFSETS: dict[str, tuple] = {}  # path -> ((size, mtime), sample offsets or None)


def _samples(seg: Segment):
    """A local plain-tar shard is read by offset (tarread); anything else by webdataset."""
    url = seg.shard.url
    if not is_url(url):
        stat = os.stat(url)
        version = (stat.st_size, stat.st_mtime_ns)  # a repacked shard is indexed again
        if _OFFSETS.get(url, (None,))[0] != version:
            _OFFSETS[url] = (version, tarread.sample_offsets(url))
        offsets = _OFFSETS[url][1]
        if offsets is not None:
            return tarread.read_samples(url, offsets, seg.start, seg.stop)
    source = iter([{"url": url}])
    return islice(wds.tarfile_samples(source), seg.start, seg.stop)


def border_mask(trimap: np.ndarray, border: str) -> np.ndarray:
    """pets.trimap_to_mask by bit arithmetic: 25x faster than its lookup table (2 us per
    256 px sample instead of 53 us with np.take). Packed trimaps hold only 1 (pet),
    2 (background) and 3 (border): pack checks every value."""
    if border == "foreground":
        return trimap & 1  # 1 -> 1, 2 -> 0, 3 -> 1
    if border == "background":
        return (trimap == 1).view(np.uint8)
    return np.where(trimap == 3, np.uint8(pets.IGNORE_INDEX), trimap & 1)


def is_complete(sample: dict) -> bool:
    return "json" in sample and (
        {"image.u8", "trimap.u8"} <= sample.keys() or {"image.jpg", "trimap.png"} <= sample.keys()
    )


def collate(samples: list[tuple[str, np.ndarray, np.ndarray]], out=None) -> dict:
    """uint8 NHWC stacked, then viewed as NCHW: the batch is already channels-last in memory.
    ``out``: (images NHWC, masks NHW) uint8 tensors of at least len(samples) rows to fill."""
    names = [s[0] for s in samples]
    if out is None:
        images = torch.from_numpy(np.stack([s[1] for s in samples]))
        masks = torch.from_numpy(np.stack([s[2] for s in samples]))
    else:
        images, masks = out[0][: len(samples)], out[1][: len(samples)]
        np.stack([s[1] for s in samples], out=images.numpy())
        np.stack([s[2] for s in samples], out=masks.numpy())
    return {"name": names, "image": images.permute(0, 3, 1, 2), "mask": masks}


class BatchRing:
    """A worker's batches go out through ``slots`` shared-memory buffers, reused in turn.

    Written by hand because a DataLoader worker normally ships each batch as a new
    shared-memory segment: one more copy, and page faults on both sides for every page of
    it. That cost the raw loader about half its speed with workers (BENCHMARKS.md section
    1). A buffer that is already shared goes by handle, and the main process keeps its
    mapping (torch caches it while a reference is held; EpochLoader holds them).

    Why a buffer is free when it comes round again: the main process copies every batch
    out as it arrives (EpochLoader.__iter__). The DataLoader keeps prefetch_factor x W
    batch requests out, handed to workers in turn, so a worker holds at most
    prefetch_factor of them; it asks for the next one just before handing a batch over,
    before the copy, hence ``slots >= prefetch_factor + 2``. When a worker runs dry its
    requests go to the others, but every plan here gives workers batch counts that differ
    by at most one (ShardStream.worker_plan), so that adds no batch to a ring in use.
    Memory: ``slots`` batches of /dev/shm per worker, about what torch's own transfer
    holds in flight.
    """

    def __init__(self, slots: int):
        self.slots, self.buffers, self.turn = slots, {}, 0

    def next(self, batch_size: int, image_shape: tuple[int, ...], mask_shape: tuple[int, ...]):
        key = (batch_size, image_shape, mask_shape)
        if key not in self.buffers:
            self.buffers[key] = [
                (
                    torch.empty((batch_size, *image_shape), dtype=torch.uint8).share_memory_(),
                    torch.empty((batch_size, *mask_shape), dtype=torch.uint8).share_memory_(),
                )
                for _ in range(self.slots)
            ]
        self.turn += 1
        return self.buffers[key][self.turn % self.slots]


class ShardStream(IterableDataset):
    """This rank's samples of one split as batches; one instance per (split, rank)."""

    def __init__(
        self,
        shards: list[Shard],
        *,
        train: bool,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        border: str = "foreground",
        size: int = 0,
        shuffle_buffer: int = 256,
    ):
        if border not in pets.BORDER_POLICIES:
            raise UserError(f"border policy {border!r}: choose one of {pets.BORDER_POLICIES}")
        self.shards, self.train, self.batch_size = shards, train, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.border, self.size, self.shuffle_buffer = border, size, shuffle_buffer
        self.num_total = sum(s.num_samples for s in shards)
        self.num_workers = 1
        # Epoch and resume point, shared with persistent workers (EpochLoader replaces it
        # with shared memory): set in the main process before each epoch's iteration.
        self.position = [0, 0]
        self.ring_slots = 0  # > 0: collate into a BatchRing of that many slots (workers only)

    @property
    def epoch(self) -> int:
        return self.position[0]

    @epoch.setter
    def epoch(self, value: int) -> None:
        self.position[0] = value

    @property
    def skip_batches(self) -> int:
        return self.position[1]

    @skip_batches.setter
    def skip_batches(self, value: int) -> None:
        self.position[1] = value

    # --- the plan: which samples this rank and worker read this epoch -------------------
    def rank_range(self) -> tuple[int, int]:
        if self.train:
            per_rank = train_steps(self.num_total, self.world_size, self.batch_size)
            per_rank *= self.batch_size
            return self.rank * per_rank, (self.rank + 1) * per_rank
        return split_evenly(self.num_total, self.world_size, self.rank)

    def num_batches(self) -> int:
        """Batches this rank yields per epoch (train: identical on every rank)."""
        start, stop = self.rank_range()
        if self.train:
            return (stop - start) // self.batch_size
        per_worker = [
            split_evenly(stop - start, self.num_workers, w) for w in range(self.num_workers)
        ]
        return sum(-(-(b - a) // self.batch_size) for a, b in per_worker)

    def worker_plan(self, worker: int, num_workers: int) -> tuple[list[Segment], int, int]:
        """(segments, batches to skip, the worker whose part this is) of loader worker ``worker``. Train workers own whole batches, so
        the DataLoader's round-robin over workers yields global batch j from worker j % W."""
        start, stop = self.rank_range()
        if self.train:
            order, offset = epoch_order(self.shards, self.seed, self.epoch)
            steps = (stop - start) // self.batch_size
            # The DataLoader takes batches from workers round-robin: global batch j comes
            # from worker j % W. Worker w owns that many batches, as one contiguous run.
            # On resume after k batches the loader still starts at worker 0, which must
            # then hold batch k: loader worker w plays the part of worker (w + k) % W.
            worker = (worker + self.skip_batches) % num_workers
            mine = len(range(worker, steps, num_workers))
            first = sum(len(range(w, steps, num_workers)) for w in range(worker))
            skip = len(range(worker, min(self.skip_batches, steps), num_workers))
            a = offset + start + first * self.batch_size
            return segments(order, a, mine * self.batch_size), skip, worker
        a, b = split_evenly(stop - start, num_workers, worker)
        return segments(self.shards, start + a, b - a), 0, worker

    # --- the pipeline ------------------------------------------------------------------
    def to_arrays(self, sample: dict) -> tuple[str, np.ndarray, np.ndarray]:
        name, image, trimap = decode_sample(sample)
        if self.size and image.shape[:2] != (self.size, self.size):
            image, trimap = pets.resize_pair(image, trimap, self.size)
        return name, image, border_mask(trimap, self.border)

    def __iter__(self):
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        segs, skip, part = self.worker_plan(worker, num_workers)
        rng = random.Random(f"{self.seed}/{self.epoch}/{self.rank}/{part}")
        stages = [
            read_segments,  # (shard, start, stop) -> raw tar samples, count-checked
            wds.shuffle(self.shuffle_buffer, self.shuffle_buffer, rng=rng)
            if self.train
            else _identity,  # shuffle raw bytes: cheap to skip on resume, no decode
            _skip(skip * self.batch_size),  # resume mid-epoch: drop what was consumed
            wds.map(self.to_arrays),  # -> (name, image HxWx3 uint8, mask HxW uint8)
            self._batches(shared=info is not None and self.ring_slots > 0),
        ]
        data = iter(segs)
        for stage in stages:
            data = stage(data)
        return data

    def _batches(self, shared: bool):
        collation = collate
        if shared:
            if getattr(self, "_ring", None) is None:  # one per worker process, kept across epochs
                self._ring = BatchRing(self.ring_slots)

            def collation(chunk):
                _, image, mask = chunk[0]
                return collate(chunk, self._ring.next(self.batch_size, image.shape, mask.shape))

        return wds.batched(self.batch_size, collation_fn=collation, partial=not self.train)


def _identity(data):
    return data


def _skip(n: int):
    return lambda data: islice(data, n, None)


TUNE_MALLOC = True  # a module switch, for the benchmark's with/without comparison
PREFETCH = 2  # batches requested ahead per worker: one raw worker makes ~400 batches of 16 a second


def keep_buffers_on_heap(worker_id: int = 0) -> None:
    """DataLoader worker_init_fn: glibc gives every allocation over its mmap threshold a
    fresh mmap and unmaps it when freed, so every 4 MB read chunk and every batch buffer
    page-faults on all its pages. Raising that threshold to glibc's ceiling (32 MB), and the
    heap trim threshold with it, keeps them on the heap and reused: 12-28% more samples/s
    (BENCHMARKS.md section 1). Only in workers, which hold nothing but data."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl, macOS): nothing to tune
        return
    libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD
    libc.mallopt(-1, 256 << 20)  # M_TRIM_THRESHOLD


def init_worker(worker_id: int, tune_malloc: bool = True) -> None:
    """DataLoader worker_init_fn: survive preemption signals, then tune malloc.

    On SIGTERM, torchrun (under `accelerate launch`) and srun signal each rank's whole
    process group, DataLoader workers included; torch's own worker handler for SIGTERM
    exits, and the rank's next batch raised "DataLoader worker exited unexpectedly"
    instead of checkpointing (DESIGN.md section 7). SIGUSR1's default action kills too.
    Workers ignore both: the rank's handler sets the stop flag, the rank checkpoints at the
    next step boundary and then ends its workers itself.
    """
    import signal

    for name in ("SIGTERM", "SIGUSR1"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)
    if tune_malloc:
        keep_buffers_on_heap(worker_id)


class EpochLoader:
    """A DataLoader over a ShardStream that knows its epoch, its length and what it yielded."""

    def __init__(
        self, stream: ShardStream, num_workers: int, pin_memory: bool, persistent: bool = True
    ):
        stream.num_workers = max(1, num_workers)
        self.stream = stream
        context = None
        if num_workers and torch.distributed.is_available() and torch.distributed.is_initialized():
            # fork() once gloo/NCCL threads run can copy a held lock into the worker, which
            # then waits forever (a rare hang of a whole DDP job). A forkserver forks workers
            # from a clean, single-threaded process instead.
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload(["dist_seg.data.stream"])
        prefetch = PREFETCH
        self.shared = num_workers > 0
        if self.shared:
            # Persistent workers read each epoch's number from here, not from the copy of
            # the stream they were started with.
            stream.position = (context or multiprocessing).RawArray("q", 2)
            stream.ring_slots = prefetch + 2  # > prefetch: see BatchRing
        self.loader = DataLoader(
            stream,
            worker_init_fn=functools.partial(init_worker, tune_malloc=TUNE_MALLOC),
            batch_size=None,
            num_workers=num_workers,
            pin_memory=pin_memory,
            prefetch_factor=prefetch if num_workers else None,
            persistent_workers=persistent and num_workers > 0,
            multiprocessing_context=context,
        )
        self.yielded = 0  # samples this rank received in the last (or current) epoch
        # The last ring buffers received, one per slot of every worker: while they are
        # held, torch maps each shared buffer once instead of once per batch.
        self._held: deque = deque(maxlen=stream.ring_slots * max(1, num_workers))

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Call before iterating: workers read the epoch when the iteration starts them."""
        if skip_batches > self.stream.num_batches():
            raise UserError(
                f"cannot resume at batch {skip_batches} of an epoch of "
                f"{self.stream.num_batches()} batches: the world size or batch size changed"
            )
        self.stream.epoch, self.stream.skip_batches = epoch, skip_batches

    def __len__(self) -> int:
        return self.stream.num_batches() - (self.stream.skip_batches if self.stream.train else 0)

    def __iter__(self):
        self.yielded = 0
        try:
            for batch in self.loader:
                if self.shared and not batch["image"].is_pinned():  # pinning copied it
                    self._held.append(batch)
                    batch = {**batch, "image": batch["image"].clone(), "mask": batch["mask"].clone()}  # fmt: skip
                self.yielded += len(batch["name"])
                yield batch
        finally:
            if not self.loader.persistent_workers:  # their rings go with them: unmap
                self._held.clear()


def build_loader(
    manifest: Manifest,
    split: str,
    *,
    batch_size: int,
    train: bool,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    seed: int = 0,
    border: str = "foreground",
    size: int = 0,
    shuffle_buffer: int = 256,
    pin_memory: bool = False,
    persistent_workers: bool = True,
) -> EpochLoader:
    """The one place a split becomes batches for this rank. See the module docstring.
    Check the shards first (manifest.check_shards): this reads them as the manifest says."""
    if batch_size < 1:
        raise UserError(f"batch size {batch_size}: must be at least 1")
    shards = manifest.shards(split)
    if size == 0 and manifest.image_size == 0:
        raise UserError(
            f"{manifest.location} keeps original image sizes (packed with --size 0); "
            "set data.size to a multiple of 16 to batch them"
        )
    stream = ShardStream(
        shards,
        train=train,
        batch_size=batch_size,
        rank=rank,
        world_size=world_size,
        seed=seed,
        border=border,
        size=size or manifest.image_size,
        shuffle_buffer=shuffle_buffer,
    )
    total = stream.num_total
    if train and train_steps(total, world_size, batch_size) == 0:
        raise UserError(
            f"split {split!r} has {total} samples, fewer than processes x batch size "
            f"({world_size} x {batch_size}); lower the batch size or the process count"
        )
    return EpochLoader(stream, num_workers, pin_memory, persistent_workers)
