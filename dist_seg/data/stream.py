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

import atexit
import contextlib
import ctypes
import functools
import multiprocessing
import os
import random
import tarfile
import weakref
from collections import deque
from dataclasses import dataclass, replace
from itertools import islice

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dist_seg.data import pets, tarread
from dist_seg.data.codec import PACKED, Reader, apply_border, is_packed_sample
from dist_seg.data.decode import DECODES, batch_decoding
from dist_seg.data.manifest import Manifest, Shard, is_url
from dist_seg.data.masks import trimap_to_mask
from dist_seg.data.plan import Plan, fingerprint, make_state, resume, shards_digest, train_steps
from dist_seg.errors import DataError, UserError


@dataclass(frozen=True)
class Segment:
    """Samples [start, stop) of one shard, in the order the shard stores them; with ``keep``,
    only those of its indices (ascending, within [start, stop))."""

    shard: Shard
    start: int
    stop: int
    keep: tuple[int, ...] | None = None

    def __len__(self) -> int:
        return self.stop - self.start if self.keep is None else len(self.keep)


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


def position_segments(shards: list[Shard], offset: int, positions: np.ndarray) -> list[Segment]:
    """Segments holding ``positions`` (ascending) of the concatenation of ``shards`` rotated
    by ``offset``, in that order: the run that covers them, with ``keep`` where it has gaps
    (a replanned epoch's remainder)."""
    if len(positions) == 0:
        return []
    first, span = int(positions[0]), int(positions[-1]) - int(positions[0]) + 1
    segs = segments(shards, offset + first, span)
    if span == len(positions):
        return segs
    wanted = np.zeros(span, dtype=bool)
    wanted[np.asarray(positions) - first] = True
    out, at = [], 0
    for seg in segs:
        sub = wanted[at : at + seg.stop - seg.start]
        at += seg.stop - seg.start
        if sub.all():
            out.append(seg)
        elif sub.any():
            keep = tuple((seg.start + np.flatnonzero(sub)).tolist())
            out.append(Segment(seg.shard, seg.start, seg.stop, keep))
    return out


def epoch_order(shards: list[Shard], seed: int, epoch: int) -> tuple[list[Shard], int]:
    """The shard order and rotation offset of one training epoch, the same on every rank."""
    rng = random.Random(f"{seed}/{epoch}")
    order = list(shards)
    rng.shuffle(order)
    return order, rng.randrange(max(1, sum(s.num_samples for s in shards)))


def read_segments(segs, reader: Reader | None = None) -> object:
    """Stage: segments -> raw WebDataset samples (bytes), checked against the manifest counts
    and against the member mapping of ``reader`` (a sample with other members is an error
    naming them, not a truncation); without one, any member set dist_seg writes."""
    complete = reader.complete if reader is not None else is_packed_sample
    for seg in segs:
        got = 0
        try:
            for sample in _samples(seg):
                if not complete(sample):  # a cut inside a sample leaves part of it
                    if reader is not None:  # ... but only members the mapping names
                        reader.check_members(sample)
                    break
                got += 1
                yield sample
        except (tarfile.TarError, OSError, ValueError) as e:
            raise DataError(
                f"shard {seg.shard.url} is unreadable ({e}); repack with `dist-seg pack`"
            ) from None
        if got != len(seg):
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
        offsets = _offsets(url)
        if offsets is not None:
            if seg.keep is None:
                return tarread.read_samples(url, offsets, seg.start, seg.stop)
            return _kept_runs(url, offsets, seg.keep)
    source = iter([{"url": url}])
    samples = islice(wds.tarfile_samples(source), seg.start, seg.stop)
    if seg.keep is None:
        return samples
    keep = set(seg.keep)  # remote or compressed: read through, keep what is wanted
    return (s for i, s in enumerate(samples, seg.start) if i in keep)


def _kept_runs(path: str, offsets, keep: tuple[int, ...]):
    """Samples ``keep`` of a local shard: one offset read per run of consecutive indices."""
    start = prev = keep[0]
    for i in (*keep[1:], None):
        if i is not None and i == prev + 1:
            prev = i
            continue
        got = 0
        for sample in tarread.read_samples(path, offsets, start, prev + 1):
            got += 1
            yield sample
        if got < prev + 1 - start:
            return  # the shard holds fewer: read_segments reports it
        start = prev = i


def _offsets(url: str):
    """The sample offsets of a local shard (None: not plain ustar), cached per path."""
    stat = os.stat(url)
    version = (stat.st_size, stat.st_mtime_ns)  # a repacked shard is indexed again
    if _OFFSETS.get(url, (None,))[0] != version:
        _OFFSETS[url] = (version, tarread.sample_offsets(url))
    return _OFFSETS[url][1]


def sample_keys(shards: list[Shard], indices) -> list[str]:
    """The ``__key__`` of canonical samples ``indices`` (manifest order, shard after shard):
    from tar headers for local plain shards, else by reading the shards through."""
    bounds = np.cumsum([0] + [s.num_samples for s in shards])
    indices = np.asarray(sorted(indices), dtype=np.int64)
    which = np.searchsorted(bounds, indices, side="right") - 1
    keys: list[str] = []
    for i in np.unique(which).tolist():
        shard, local = shards[i], (indices[which == i] - bounds[i]).tolist()
        offsets = None if is_url(shard.url) else _offsets(shard.url)
        if offsets is not None:
            keys += tarread.sample_keys(shard.url, offsets, local)
            continue
        wanted = set(local)
        source = iter([{"url": shard.url}])
        for j, sample in enumerate(islice(wds.tarfile_samples(source), local[-1] + 1)):
            if j in wanted:
                keys.append(sample["__key__"])
    return keys


def border_mask(trimap: np.ndarray, border: str) -> np.ndarray:
    """A Pets trimap (1/2/3) under a border policy, the way the loader does it (codec)."""
    return apply_border(trimap_to_mask(trimap), border)


def is_complete(sample: dict, reader: Reader | None = None) -> bool:
    return reader.complete(sample) if reader is not None else is_packed_sample(sample)


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
    batch = {"name": names, "image": images.permute(0, 3, 1, 2), "mask": masks}
    if len(samples[0]) > 3:  # original-size masks (evaluate --original-size): sizes differ
        batch["full_mask"] = [s[3] for s in samples]
    return batch


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
        reader: Reader | None = None,
    ):
        if border not in pets.BORDER_POLICIES:
            raise UserError(f"border policy {border!r}: choose one of {pets.BORDER_POLICIES}")
        # How a stored sample becomes (name, image, 0/1/255 mask): the manifest's reader
        # (build_loader); by default a Pets pack of this format at ``size``.
        self.reader = reader or Reader(
            PACKED["raw"], size=(size, size) if size else None, border=border
        )
        self.shards, self.train, self.batch_size = shards, train, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.border, self.size, self.shuffle_buffer = border, size, shuffle_buffer
        self.num_total = sum(s.num_samples for s in shards)
        self.num_workers = 1
        # Epoch, resume point, plan generation and whether ``base_bits`` holds a base
        # (plan.Plan), shared with persistent workers (EpochLoader replaces both with shared
        # memory): set in the main process before each epoch's iteration.
        self.position = [0, 0, 0, 0]
        self.base_bits = bytearray((self.num_total + 7) // 8)
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

    def set_plan(self, plan: Plan, skip: int) -> None:
        """Epoch, base and generation of ``plan`` (a train plan of this stream's layout)."""
        self.epoch, self.skip_batches, self.position[2] = plan.epoch, skip, plan.generation
        self.position[3] = plan.base is not None
        if plan.base is not None:
            np.frombuffer(self.base_bits, np.uint8)[:] = np.frombuffer(plan.base, np.uint8)

    def plan(self) -> Plan:
        """The train plan of the current epoch: which positions every rank and part reads."""
        return Plan(
            counts=tuple(s.num_samples for s in self.shards),
            seed=self.seed,
            epoch=self.epoch,
            world_size=self.world_size,
            parts=self.num_workers,
            batch_size=self.batch_size,
            shuffle_buffer=self.shuffle_buffer,
            base=bytes(self.base_bits) if self.position[3] else None,
            generation=self.position[2],
        )

    # --- the plan: which samples this rank and worker read this epoch -------------------
    def rank_range(self) -> tuple[int, int]:
        """Eval: this rank's [start, stop) of the file order."""
        return split_evenly(self.num_total, self.world_size, self.rank)

    def num_batches(self) -> int:
        """Batches this rank yields per epoch (train: identical on every rank)."""
        if self.train:
            return self.plan().steps()
        start, stop = self.rank_range()
        per_worker = [
            split_evenly(stop - start, self.num_workers, w) for w in range(self.num_workers)
        ]
        return sum(-(-(b - a) // self.batch_size) for a, b in per_worker)

    def worker_plan(self, worker: int, num_workers: int) -> tuple[list[Segment], int, int]:
        """(segments, batches to skip, the part it plays) of loader worker ``worker``. Train
        workers own whole batches, so the DataLoader's round-robin over workers yields batch
        j of the rank from part j % W (plan.Plan.part_batches)."""
        if self.train:
            plan = self.plan()
            steps = plan.steps()
            # On resume after k batches the loader still starts at worker 0, which must
            # then hold batch k: loader worker w plays the part of worker (w + k) % W.
            part = (worker + self.skip_batches) % num_workers
            skip = len(range(part, min(self.skip_batches, steps), num_workers))
            order, offset = epoch_order(self.shards, self.seed, self.epoch)
            segs = position_segments(order, offset, plan.part_positions(self.rank, part))
            return segs, skip, part
        start, stop = self.rank_range()
        a, b = split_evenly(stop - start, num_workers, worker)
        return segments(self.shards, start + a, b - a), 0, worker

    # --- the pipeline ------------------------------------------------------------------
    def to_arrays(self, sample: dict) -> tuple[str, np.ndarray, np.ndarray]:
        return self.reader(sample)  # (name, image HxWx3 uint8, mask HxW uint8 0/1/255)

    def __iter__(self):
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        segs, skip, part = self.worker_plan(worker, num_workers)
        stages = [
            functools.partial(read_segments, reader=self.reader),  # -> raw samples, checked
            self.plan().shuffle(self.rank, part)  # seeded per (seed, epoch, rank, part)
            if self.train
            else _identity,  # shuffle raw bytes: cheap to skip on resume, no decode
            _skip(skip * self.batch_size),  # resume mid-epoch: drop what was consumed
            wds.map(self._keyed),  # -> (key, (name, image HxWx3 uint8, mask HxW uint8))
            self._batches(shared=info is not None and self.ring_slots > 0),
        ]
        data = iter(segs)
        for stage in stages:
            data = stage(data)
        return data

    def _keyed(self, sample: dict) -> tuple:
        """The sample's tar key rides along to the batch's "key" (the audit trail's names)."""
        return sample["__key__"], self.to_arrays(sample)

    def _batches(self, shared: bool):
        if shared and getattr(self, "_ring", None) is None:  # one per worker, kept across epochs
            self._ring = BatchRing(self.ring_slots)

        def collation(chunk):
            samples = [s for _, s in chunk]
            if hasattr(self.reader, "collate"):  # encoded images (data.decode gpu, decode.py)
                batch = self.reader.collate(samples, self._ring if shared else None, self.batch_size)  # fmt: skip
                return {**batch, "key": [k for k, _ in chunk]}
            out = None
            if shared:
                image, mask = samples[0][1:3]  # [3]: an original-size mask, if asked for
                out = self._ring.next(self.batch_size, image.shape, mask.shape)
            return {**collate(samples, out), "key": [k for k, _ in chunk]}

        return wds.batched(self.batch_size, collation_fn=collation, partial=not self.train)


def _identity(data):
    return data


def _skip(n: int):
    return lambda data: islice(data, n, None)


_WITH_WORKERS: weakref.WeakSet = weakref.WeakSet()  # DataLoader iterators with workers
_WORKERS: set = set()  # their worker processes, kept until they have ended


@atexit.register
def _kill_workers_at_exit() -> None:
    """Workers ignore SIGTERM (init_worker), and SIGTERM is how multiprocessing, and torch
    when a worker does not leave in time, end them: a process leaving with a loader
    mid-epoch (an exception on its way out, a test) waited for its workers forever. Seen
    too: workers of an iterator freed after a DataError still alive at exit. atexit runs
    handlers last registered first: this one before multiprocessing's (imported by torch)."""
    for iterator in list(_WITH_WORKERS):
        with contextlib.suppress(Exception):  # at exit: on to the kill
            iterator._shutdown_workers()  # torch's own: workers see the done event and leave
    for worker in list(_WORKERS):
        with contextlib.suppress(Exception):
            if worker.is_alive():
                worker.kill()


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
        self, stream: ShardStream, num_workers: int, pin_memory: bool, persistent: bool = True,
        decoder=None,
    ):  # fmt: skip
        """``decoder``: applied to every batch in this process (data.decode gpu, decode.py)."""
        stream.num_workers = max(1, num_workers)
        self.stream, self.decoder = stream, decoder
        context = None
        if num_workers and torch.distributed.is_available() and torch.distributed.is_initialized():
            # fork() once gloo/NCCL threads run can copy a held lock into the worker, which
            # then waits forever (a rare hang of a whole DDP job). A forkserver forks workers
            # from a clean, single-threaded process instead.
            context = multiprocessing.get_context("forkserver")
            # dist_seg.data.forkserver: the forkserver survives SIGTERM (see there).
            context.set_forkserver_preload(["dist_seg.data.forkserver", "dist_seg.data.stream"])
        prefetch = PREFETCH
        self.shared = num_workers > 0
        if self.shared:
            # Persistent workers read each epoch's number from here, not from the copy of
            # the stream they were started with.
            stream.position = (context or multiprocessing).RawArray("q", 4)
            stream.base_bits = (context or multiprocessing).RawArray("B", len(stream.base_bits))
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
        self.workers = num_workers
        # Per rank index: samples of the current epoch trained before its current plan began
        # (empty for a plain epoch); and what load_state_dict found trained (audit trail).
        self._trained_before: list[int] = []
        self._resumed: tuple[int, object, list[int]] | None = None

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Call before iterating a plain epoch (after load_state_dict: not for the epoch it
        positioned the loader in). Workers read the epoch when the iteration starts them."""
        self.stream.set_plan(replace(self.stream.plan(), epoch=epoch, base=None, generation=0), 0)
        if skip_batches > self.stream.num_batches():
            raise UserError(
                f"cannot resume at batch {skip_batches} of an epoch of "
                f"{self.stream.num_batches()} batches: the world size or batch size changed"
            )
        self.stream.skip_batches = skip_batches
        self._trained_before = []

    # --- exact resume at any world size, workers or batch size (plan.py) --------------------
    def _fingerprint(self, plan: Plan, grad_accum: int) -> dict:
        names = [s.url for s in self.stream.shards]
        return fingerprint(plan, self.workers, grad_accum, shards_digest(names, plan.counts))

    def state_dict(self, epoch: int, batches_done: int, grad_accum: int = 1) -> dict:
        """The data plan's part of a checkpoint taken after ``batches_done`` batches of the
        current plan of ``epoch`` (an epoch not yet started: ``batches_done`` 0). Plain
        ints, strings, lists and bytes: it loads with torch.load(weights_only=True)."""
        plan, trained_before = self.stream.plan(), self._trained_before
        if epoch != plan.epoch:
            plan, trained_before = replace(plan, epoch=epoch, base=None, generation=0), []
        if not 0 <= batches_done <= plan.steps() or (batches_done and epoch != self.stream.epoch):
            raise ValueError(f"batch {batches_done} of epoch {epoch}: not a position of this plan")
        return make_state(plan, self._fingerprint(plan, grad_accum), batches_done, trained_before)

    def load_state_dict(self, state: dict, grad_accum: int = 1) -> str:
        """Positions the loader where ``state`` was taken, replanning the rest of its epoch
        if the world size, workers, batch size, shuffle buffer or seed changed. Returns one
        line: what changed and what it does about it. UserError if it cannot resume."""
        plan = self.stream.plan()
        got = resume(state, plan, self._fingerprint(plan, grad_accum))
        self.stream.set_plan(got.plan, got.skip)
        self._trained_before = got.trained_before
        done = [*got.trained_before, *[0] * max(0, plan.world_size - len(got.trained_before))]
        for r in range(plan.world_size):
            done[r] += got.skip * plan.batch_size
        self._resumed = (got.plan.epoch, got.consumed, done if got.consumed is not None else [])
        return got.message

    @property
    def skip_batches(self) -> int:
        """Batches of the current plan already trained: where iteration starts."""
        return self.stream.skip_batches

    def trained_before(self, epoch: int) -> list[int]:
        """Per rank index: samples of ``epoch`` trained before the state this loader was
        loaded from, i.e. the lines each rank's audit file keeps on resume ([]: none)."""
        return list(self._resumed[2]) if self._resumed and self._resumed[0] == epoch else []

    def keys_trained_before(self, epoch: int) -> list[str]:
        """Keys of the samples of ``epoch`` all ranks trained before that state (unsorted),
        from the replayed plan and the shards' tar headers."""
        if not self._resumed or self._resumed[0] != epoch or self._resumed[1] is None:
            return []
        return sample_keys(self.stream.shards, np.flatnonzero(self._resumed[1]))

    def __len__(self) -> int:
        return self.stream.num_batches() - (self.stream.skip_batches if self.stream.train else 0)

    def __iter__(self):
        self.yielded = 0
        try:
            iterator = iter(self.loader)
            if self.shared:
                _WITH_WORKERS.add(iterator)
                _WORKERS.difference_update([w for w in _WORKERS if not w.is_alive()])
                _WORKERS.update(getattr(iterator, "_workers", ()))
            for batch in iterator:
                if self.shared and not batch["mask"].is_pinned():  # pinning copied it
                    self._held.append(batch)
                    batch = {**batch, "mask": batch["mask"].clone(),  # the decoder copies images out
                             **({"image": batch["image"].clone()} if "image" in batch else {})}  # fmt: skip
                if self.decoder is not None:
                    batch = self.decoder(batch)
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
    size: int | str | tuple[int, int] = 0,
    shuffle_buffer: int = 256,
    pin_memory: bool = False,
    persistent_workers: bool = True,
    full_masks: bool = False,
    aspect: str = "auto",
    decode: str = "cpu",
    device=None,
    say=print,
) -> EpochLoader:
    """The one place a split becomes batches for this rank. See the module docstring.
    Check the shards first (manifest.check_shards): this reads them as the manifest says.
    ``size``: a side, "HxW" or (h, w), 0 = the pack's; ``aspect``: how samples of another
    size are fitted (data.sizes; "auto": the manifest's policy).
    ``full_masks``: batches also hold "full_mask", each mask at its image's original size.
    ``decode``: "gpu" decodes JPEG images per batch in this process, on ``device`` where
    it can (decode.py; ``say`` gets its one line)."""
    if decode not in DECODES:
        raise UserError(f"data.decode {decode!r}: choose one of {', '.join(DECODES)}")
    if batch_size < 1:
        raise UserError(f"batch size {batch_size}: must be at least 1")
    shards = manifest.shards(split)
    reader = manifest.reader(border, size, full=full_masks, aspect=aspect)
    if reader.size is None:
        raise UserError(
            f"{manifest.location} keeps original image sizes (packed with --size 0); "
            "set data.size to a side or HxW (multiples of 16) to batch them"
        )
    decoder = None
    if decode == "gpu":
        reader, decoder = batch_decoding(reader, manifest.location, device, say)
    stream = ShardStream(
        shards,
        train=train,
        batch_size=batch_size,
        rank=rank,
        world_size=world_size,
        seed=seed,
        border=border,
        size=reader.size[0] if reader.size[0] == reader.size[1] else 0,  # the reader fits them
        shuffle_buffer=shuffle_buffer,
        reader=reader,
    )
    total = stream.num_total
    if train and train_steps(total, world_size, batch_size) == 0:
        raise UserError(
            f"split {split!r} has {total} samples, fewer than processes x batch size "
            f"({world_size} x {batch_size}); lower the batch size or the process count"
        )
    return EpochLoader(stream, num_workers, pin_memory, persistent_workers, decoder)
