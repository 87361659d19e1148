"""`dist-seg bench data | train`: the speed figures of BENCHMARKS.md, measured on this machine.

``bench data``: a synthetic Oxford-IIIT Pet (made once under ``--work``) is packed at
``--size`` in both encodings and read by the streaming loader (``build_loader(train=True)``:
tar read, decode, border mask, collate) and by a seed-style per-file loader (the course
template's Dataset: PIL opens the full-size JPEG and the trimap PNG and resizes every
sample; the DataLoader's default collate), over the same train images with the same worker
counts, interleaved in one run. Flips are in neither: dist_seg flips on the device in the
train step (``transforms.random_flips``). Figures:
  * samples/s over ``--epochs`` whole epochs of a new loader, worker start included (the
    streaming loader keeps its workers across epochs, as the trainer does; the seed's
    re-creates them every epoch; a "raw, restart" row times the streaming loader with
    persistent workers off). An epoch goes over the synthetic train split as many times as it
    takes to be as long as the real one (``--epoch-samples``, 3,312), so the per-epoch
    costs weigh what they weigh on the real set.
  * per core = samples/s / max(1, workers): the workers are counted, not the main process
    that only receives their batches; with 0 workers the main process is the one core.
  * ratio = streaming per core / seed-style per core, at the same worker count.
  * the best of ``--repeats`` interleaved rounds (the round least disturbed by other load).
The data bench runs torch with one intra-op thread, as DataLoader workers do. Page cache is
warm for both loaders (the synthetic files and shards were just written or read).

``bench train``: images/s of one training step of ``--model`` on a preloaded batch, the
configured "bare" step (precision, channels-last, compile; dist_seg's loss; with
``--switches`` also the same step with each fast-path switch flipped in turn) against a
seed-style step (fp32, contiguous, ``BCEWithLogitsLoss``, ``loss.backward();
optimizer.step()``) of the same model; FLOPs of one forward + backward from
``FlopCounterMode``, MFU and peak memory on a GPU. Then the real trainer
(``Trainer.train_one_epoch`` on its own streaming loader over packed shards, its epoch made
as long as the real set's) against the bare step: the overhead of to_device, flips,
accumulate, loss, metric sums and waits for data, per step after ``--warmup`` steps (worker
start and pipeline fill fall in the warmup). Seed, bare and trainer run in interleaved
rounds; each keeps its best round. Also the CPU time of the main process per step: on a
shared machine, being descheduled inflates wall time but not CPU time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import resource
import sys
import tempfile
import time
from datetime import datetime, timezone
from itertools import islice
from pathlib import Path

import numpy as np
import torch

from dist_seg.errors import UserError

GOAL_DATA_RATIO = 10.0  # streaming loader vs seed-style, per core (issue "Speed")
GOAL_TRAINER_OVERHEAD_PCT = 5.0  # real trainer step vs bare step
ENCODINGS = ("raw", "jpeg")
RESTART = "raw, restart"  # raw with persistent_workers off: new workers every epoch
BENCHMARK_OFF = "bare, cudnn.benchmark and TF32 matmul off"  # a GPU-only --switches variant
REAL_TRAIN_SAMPLES = 3312  # the real train split (trainval lines with index % 10 != 0)

# Dense peak TFLOP/s of one GPU from the vendors' data sheets: (name part, bf16, tf32); the
# first match wins. precision "no" is rated against TF32: cuDNN runs fp32 convs in TF32 by
# default (torch.backends.cudnn.allow_tf32), and the trainer also enables it for matmuls.
PEAK_TFLOPS = (
    ("H100 PCIe", 756.0, 378.0),
    ("H100 NVL", 835.0, 418.0),
    ("H100", 989.4, 494.7),  # SXM
    ("H200", 989.4, 494.7),
    ("A100", 312.0, 156.0),
    ("L40S", 362.0, 183.0),
    ("L40", 181.0, 90.5),
    ("L4", 121.0, 60.0),
)


# --- command line -------------------------------------------------------------------------------
def add_parser(subparsers, help_text: str) -> argparse.ArgumentParser:
    p = subparsers.add_parser("bench", help=help_text)
    sub = p.add_subparsers(dest="what", required=True, metavar="{data,train}")
    d = sub.add_parser("data", help="samples/s per core: streaming loader vs seed-style loader")
    t = sub.add_parser("train", help="images/s of a train step vs the seed's; trainer overhead")
    for q, num_images in ((d, 600), (t, 200)):
        q.add_argument("--work", help="keep (and reuse) the synthetic set and packs here "
                       "(default: a temporary directory, removed after)")  # fmt: skip
        q.add_argument("--num-images", type=int, default=num_images, help="synthetic set size")
        q.add_argument("--size", type=int, default=256, help="side in pixels (multiple of 16)")
        q.add_argument(
            "--shard-size", type=int, default=256, help="samples per shard (pack's default)"
        )
        q.add_argument("--json", help="also write the results to this file")
    d.add_argument("--batch", type=int, default=16)
    d.add_argument("--workers", default="0,1,2", help="loader worker counts, comma-separated")
    d.add_argument("--epoch-samples", type=int, default=REAL_TRAIN_SAMPLES,
                   help="samples per epoch: the train split is gone over as often as it "
                   "takes (default: the real train split's size)")  # fmt: skip
    d.add_argument("--epochs", type=int, default=2, help="epochs per measurement")
    d.add_argument("--repeats", type=int, default=2, help="interleaved rounds; the best is kept")
    t.add_argument("--model", default="unet", choices=("unet", "resnet34_unet"))
    t.add_argument("--width", type=float, default=1.0)
    t.add_argument("--stem-pool", action="store_true", help="resnet34_unet: standard max-pool")
    t.add_argument("--batch", type=int, default=4)
    t.add_argument("--precision", choices=("no", "bf16"), help="default: bf16 on GPU, else no")
    t.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    t.add_argument("--compile", action="store_true")
    t.add_argument("--switches", action="store_true", help="also time the step with each "
                   "fast-path switch flipped, one at a time (precision, channels-last, compile, "
                   "device flips; on a GPU also fp16 and cudnn.benchmark)")  # fmt: skip
    t.add_argument("--warmup", type=int, default=2, help="untimed steps per measurement")
    t.add_argument("--steps", type=int, default=5, help="timed steps per measurement")
    t.add_argument("--repeats", type=int, default=3, help="interleaved rounds; the best is kept")
    t.add_argument("--workers", type=int, default=2, help="loader workers of the real trainer")
    t.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's own)")
    t.add_argument("--trainer", action=argparse.BooleanOptionalAction, default=True,
                   help="also time the real trainer against the bare step")  # fmt: skip
    t.add_argument("--peak-tflops", type=float, help="GPU peak for MFU if not in the table")
    p.set_defaults(func=run)
    return p


DATA_FLAGS = ("work", "num_images", "size", "shard_size", "epoch_samples", "batch", "workers",
              "epochs", "repeats", "json")  # fmt: skip
TRAIN_FLAGS = ("work", "num_images", "size", "shard_size", "model", "width", "stem_pool",
               "batch", "precision", "channels_last", "compile", "switches", "warmup", "steps", "repeats",
               "workers", "threads", "trainer", "peak_tflops", "json")  # fmt: skip


def command_line(args) -> str:
    """The `dist-seg bench ...` line that reproduces ``args`` (from a parser or a Namespace)."""
    words = ["dist-seg", "bench", args.what]
    for key in DATA_FLAGS if args.what == "data" else TRAIN_FLAGS:
        value, flag = getattr(args, key, None), "--" + key.replace("_", "-")
        if key in ("channels_last", "trainer"):
            words.append(flag if value else f"--no-{flag[2:]}")
        elif value is True:
            words.append(flag)
        elif value not in (None, False):
            words += [flag, str(value)]
    return " ".join(words)


def run(args) -> int:
    if args.size <= 0 or args.size % 16:
        raise UserError(f"--size {args.size}: must be a positive multiple of 16")
    started = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    threads = torch.get_num_threads()
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    try:
        info = machine()  # torch_threads as the train bench runs (the data bench uses 1)
        with _work_dir(args.work) as work:
            result = bench_data(args, work) if args.what == "data" else bench_train(args, work)
        info["load_avg_1m_end"] = round(os.getloadavg()[0], 2)
    finally:
        torch.set_num_threads(threads)
    result = {"bench": args.what, "command": command_line(args), "date": started,
              "machine": info, "versions": versions(), **result}  # fmt: skip
    if args.what == "data":
        print_data(result)
    else:
        print_train(result)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


@contextlib.contextmanager
def _work_dir(work: str | None):
    if work:
        Path(work).mkdir(parents=True, exist_ok=True)
        yield Path(work)
        return
    with tempfile.TemporaryDirectory(prefix="dist-seg-bench-") as tmp:
        yield Path(tmp)


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info = {"cpu": cpu, "cores": os.cpu_count(), "usable_cores": usable,
            "torch_threads": torch.get_num_threads(), "load_avg_1m": round(os.getloadavg()[0], 2)}  # fmt: skip
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def versions() -> dict:
    import PIL
    import webdataset

    from dist_seg import __version__

    return {"python": platform.python_version(), "torch": torch.__version__,
            "numpy": np.__version__, "pillow": PIL.__version__,
            "webdataset": getattr(webdataset, "__version__", "?"), "dist_seg": __version__}  # fmt: skip


# --- data sets under the work directory ---------------------------------------------------------
def synthetic_root(work: Path, num_images: int) -> Path:
    """A synthetic Pet set of ``num_images`` under ``work``, made once (split files last)."""
    from dist_seg.data.synth import make_synthetic

    root = work / f"synth-{num_images}"
    if not (root / "annotations" / "test.txt").exists():
        make_synthetic(root, num_images=num_images, seed=0, overwrite=True)
    return root


def packed(root: Path, work: Path, size: int, encoding: str, shard_size: int) -> Path:
    """``root`` packed at ``size`` in ``encoding``, once (pack swaps in a whole directory)."""
    from dist_seg.data.manifest import MANIFEST
    from dist_seg.data.pack import pack

    out = work / f"{root.name}-{size}-{encoding}-s{shard_size}"
    if not (out / MANIFEST).exists():
        pack(root, out, size=size, shard_size=shard_size, encoding=encoding,
             workers=min(2, os.cpu_count() or 1))  # fmt: skip
    return out


# --- bench data ---------------------------------------------------------------------------------
class SeedStyleDataset(torch.utils.data.Dataset):
    """The course template's SimpleOxfordPetDataset: for every sample PIL opens the full-size
    JPEG and trimap PNG, the trimap becomes a float mask, all three are resized to size x size
    (bilinear image, nearest masks) and returned as CHW arrays for the default collate."""

    def __init__(self, root: Path, names: list[str], size: int):
        self.root, self.names, self.size = Path(root), names, size

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> dict:
        from PIL import Image

        name = self.names[index]
        image = np.array(Image.open(self.root / "images" / f"{name}.jpg").convert("RGB"))
        trimap = np.array(Image.open(self.root / "annotations" / "trimaps" / f"{name}.png"))
        mask = trimap.astype(np.float32)
        mask[mask == 2.0] = 0.0
        mask[(mask == 1.0) | (mask == 3.0)] = 1.0
        side = (self.size, self.size)
        image = np.array(Image.fromarray(image).resize(side, Image.BILINEAR))
        mask = np.array(Image.fromarray(mask).resize(side, Image.NEAREST))
        trimap = np.array(Image.fromarray(trimap).resize(side, Image.NEAREST))
        return {"image": np.moveaxis(image, -1, 0), "mask": mask[None], "trimap": trimap[None]}


def cpu_seconds() -> float:
    """User + system CPU time of this process and of all its children: the reaped ones
    (getrusage) and the live ones (/proc: persistent loader workers are never reaped)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)  # fmt: skip
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime + _live_children()


def _live_children() -> float:
    total, tick = 0.0, os.sysconf("SC_CLK_TCK")
    for task in Path("/proc/self/task").glob("*/children"):
        for pid in task.read_text().split():
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:  # exited meanwhile: getrusage counts it once reaped
                continue
            total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return total


def time_epochs(epoch_batches, epochs: int) -> dict:
    """Read ``epochs`` whole epochs (``epoch_batches(e)`` -> batches) of a new loader, worker
    start included (a trainer waits for it too; persistent workers start only once).
    Also the CPU time all processes spent: other load on the machine inflates wall time
    much more than it inflates CPU time."""
    samples = seconds = first = 0.0
    cpu0 = cpu_seconds()
    for epoch in range(epochs):
        t0 = time.perf_counter()
        for i, batch in enumerate(epoch_batches(epoch)):
            samples += len(batch["image"])
            if i == 0:
                first += time.perf_counter() - t0
        seconds += time.perf_counter() - t0
    cpu = cpu_seconds() - cpu0
    if not samples:
        raise UserError("an epoch gave no batch: raise --num-images or lower --batch")
    return {"samples_per_s": samples / seconds, "first_batch_s": first / epochs,
            "samples_per_cpu_s": samples / max(cpu, 1e-6)}  # fmt: skip


def bench_data(args, work: Path) -> dict:
    from dist_seg.data import pets
    from dist_seg.data.manifest import load_manifest
    from dist_seg.data.stream import build_loader

    try:
        workers = sorted({int(w) for w in str(args.workers).split(",") if w.strip()})
    except ValueError:
        raise UserError(f"--workers {args.workers!r}: expected counts like 0,1,2") from None
    if not workers or min(workers) < 0 or min(args.epochs, args.repeats, args.batch) < 1:
        raise UserError("--workers must list counts >= 0; --epochs, --repeats, --batch >= 1")
    root = synthetic_root(work, args.num_images)
    manifests = {e: load_manifest(packed(root, work, args.size, e, args.shard_size))
                 for e in ENCODINGS}  # fmt: skip
    skipped = {s.split(":")[0] for s in manifests["raw"].raw["source"]["skipped"]}
    names = [r.name for r in pets.read_split(root, "train") if r.name not in skipped]
    # Epochs as long as the real set's: both loaders go over the train split `copies` times.
    copies = max(1, math.ceil(args.epoch_samples / len(names)))
    long = {e: repeat_train(m, copies) for e, m in manifests.items()}

    def stream(encoding: str, w: int, persistent: bool = True):
        loader = build_loader(long[encoding], "train", batch_size=args.batch, train=True,
                              num_workers=w, size=args.size, persistent_workers=persistent)  # fmt: skip

        def epoch(e):
            loader.set_epoch(e)
            return loader

        return epoch

    def seed(w: int):
        loader = torch.utils.data.DataLoader(
            SeedStyleDataset(root, names * copies, args.size), batch_size=args.batch,
            shuffle=True, num_workers=w, generator=torch.Generator().manual_seed(0),
        )  # fmt: skip
        return lambda e: loader

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a DataLoader worker (and the per-core count assumes it)
    best: dict[tuple[int, str], dict] = {}
    try:
        for _ in range(args.repeats):
            for w in workers:
                kinds = {"seed": seed(w)} | {e: stream(e, w) for e in ENCODINGS}
                if w:  # the persistent-workers switch, off: workers start again every epoch
                    kinds[RESTART] = stream("raw", w, persistent=False)
                for kind, epoch_batches in kinds.items():
                    got = time_epochs(epoch_batches, args.epochs)
                    old = best.setdefault((w, kind), got)
                    for key in ("samples_per_s", "samples_per_cpu_s"):
                        old[key] = max(old[key], got[key])
                    old["first_batch_s"] = min(old["first_batch_s"], got["first_batch_s"])
        profile = {e: profile_stages(manifests[e], args.size, args.batch,
                                     min_samples=min(1000, args.epoch_samples))
                   for e in ENCODINGS}  # fmt: skip
    finally:
        torch.set_num_threads(threads)

    rows = []
    for w in workers:
        cores = max(1, w)
        row = {"workers": w, "cores_counted": cores}
        for kind in ("seed", *ENCODINGS, RESTART):
            if (w, kind) in best:
                got = best[w, kind]
                row[kind] = got | {"per_core": got["samples_per_s"] / cores}
        for e in ENCODINGS + ((RESTART,) if w else ()):
            row[e]["ratio"] = row[e]["per_core"] / row["seed"]["per_core"]
            row[e]["ratio_cpu"] = row[e]["samples_per_cpu_s"] / row["seed"]["samples_per_cpu_s"]
        rows.append(row)
    seed_bytes = [
        (root / "images" / f"{n}.jpg").stat().st_size
        + (root / "annotations" / "trimaps" / f"{n}.png").stat().st_size
        for n in names
    ]
    bytes_per_sample = {"seed_files": sum(seed_bytes) / len(seed_bytes)} | {
        e: sum(sh["bytes"] for sp in m.raw["splits"].values() for sh in sp["shards"])
        / sum(sp["num_samples"] for sp in m.raw["splits"].values())
        for e, m in manifests.items()
    }
    return {
        "config": {
            "num_images": args.num_images,
            "train_samples": len(names),
            "epoch_samples": len(names) * copies,
            "size": args.size,
            "shard_size": args.shard_size,
            "batch": args.batch,
            "workers": workers,
            "epochs": args.epochs,
            "repeats": args.repeats,
        },
        "results": rows,
        "bytes_per_sample": bytes_per_sample,
        "goal_ratio": GOAL_DATA_RATIO,
        "goal_met": {e: all(r[e]["ratio"] >= GOAL_DATA_RATIO for r in rows) for e in ENCODINGS},
        "profile_us_per_sample": profile,
    }


def repeat_train(manifest, copies: int):
    """``manifest`` with its train shards listed ``copies`` times (an in-memory view)."""
    import dataclasses

    train = manifest.shards("train") * copies
    return dataclasses.replace(manifest, splits={**manifest.splits, "train": train})


def profile_stages(
    manifest, size: int, batch: int, repeats: int = 3, min_samples: int = 1000
) -> dict:
    """Microseconds per sample of the streaming pipeline's stages over the train shards, one
    process, cumulative (each line also does the work of the lines above); best of
    ``repeats`` rounds over at least ``min_samples`` samples (the train shards repeated). The
    loader adds to the last line its sample plan, the samples it reads and drops to reach a
    segment's start inside a shard, and its workers' start."""
    import random

    import webdataset as wds

    from dist_seg.data.pack import decode_sample
    from dist_seg.data.stream import Segment, ShardStream, collate, read_segments

    shards = manifest.shards("train")
    shards = shards * math.ceil(min_samples / sum(s.num_samples for s in shards))
    n = sum(s.num_samples for s in shards)
    stage = ShardStream(shards, train=True, batch_size=batch, size=size)

    def samples():  # as the loader reads them (by offset for local shards)
        return read_segments(Segment(s, 0, s.num_samples) for s in shards)

    def shuffled():
        return wds.shuffle(stage.shuffle_buffer, stage.shuffle_buffer, rng=random.Random(0))(
            samples()
        )

    def batches(source):
        it = map(stage.to_arrays, source)
        while chunk := list(islice(it, batch)):
            yield collate(chunk)

    decoded = [stage.to_arrays(s) for s in islice(samples(), batch)]
    arrays = [np.concatenate([img.ravel(), mask.ravel()]) for _, img, mask in decoded]
    target = np.empty_like(arrays[0])

    def copy_floor():  # one memory copy of every decoded sample: what no loader can beat
        for i in range(n):
            np.copyto(target, arrays[i % len(arrays)])

    steps = {
        "tar read (stream.read_segments)": lambda: _drain(samples()),
        "+ json.loads": lambda: _drain(json.loads(s["json"]) for s in samples()),
        "+ decode (pack.decode_sample)": lambda: _drain(map(decode_sample, samples())),
        "+ border mask (ShardStream.to_arrays)": lambda: _drain(map(stage.to_arrays, samples())),
        "+ collate (stream.collate)": lambda: _drain(batches(samples())),
        "+ shuffle buffer (wds.shuffle, as the loader)": lambda: _drain(batches(shuffled())),
        "memory copy of a decoded sample (floor)": copy_floor,
    }
    best = dict.fromkeys(steps, math.inf)
    for _ in range(repeats):  # round-robin: a burst of other load hits one round of each
        for name, fn in steps.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return {name: 1e6 * seconds / n for name, seconds in best.items()}


def _drain(iterable) -> None:
    for _ in iterable:
        pass


# --- bench train --------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def speed_switches(on: bool) -> None:
    """The trainer's GPU switches (runtime.apply_speed_switches) for the configured steps;
    torch's defaults for the seed's (cuDNN benchmark off, no TF32 matmuls; convs use TF32
    either way)."""
    if torch.cuda.is_available():
        torch.backends.cudnn.benchmark = on
        torch.backends.cuda.matmul.allow_tf32 = on


@contextlib.contextmanager
def peak_memory(device: torch.device):
    """Yields a function giving the peak GPU memory (GiB) allocated inside the block above
    what was allocated at its start; None off the GPU."""
    if device.type != "cuda":
        yield lambda: None
        return
    held = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    yield lambda: (torch.cuda.max_memory_allocated(device) - held) / 2**30


def resident_gib(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> float:
    """Parameters, buffers and optimizer state: what a model holds between steps."""
    tensors = [*model.parameters(), *model.buffers()]
    tensors += [
        t for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t)
    ]
    return sum(t.nbytes for t in tensors) / 2**30


def time_steps(step, count: int, device: torch.device) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds) per call of ``step`` over ``count`` calls."""
    _sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(count):
        step()
    _sync(device)
    return (time.perf_counter() - t0) / count, (time.process_time() - c0) / count


def count_flops(model: torch.nn.Module, images: torch.Tensor, target: torch.Tensor) -> int:
    """FLOPs of one forward + backward (FlopCounterMode: convolutions and matmuls)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        torch.nn.functional.binary_cross_entropy_with_logits(model(images), target).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def peak_tflops(device: torch.device, precision: str, override: float | None) -> float | None:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for part, bf16, tf32 in PEAK_TFLOPS:
        if part in name:
            return bf16 if precision == "bf16" else tf32
    return None


class TimedLoader:
    """The trainer's loader cut to ``count`` batches (chaining epochs if one is too short).
    ``ends[k]`` is (wall, CPU time of this process) when the trainer asked for the batch
    after batch k, so ``ends[k] - ends[k - 1]`` is one whole trainer step including any wait
    for data; ``ends[-1]`` of a run is its start."""

    def __init__(self, loader, count: int, device: torch.device, sync_at: tuple[int, ...]):
        self.loader, self.count, self.device, self.sync_at = loader, count, device, sync_at
        self.epoch, self.ends = 0, {}

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.count

    def _stamp(self, k: int) -> None:
        if k in self.sync_at:
            _sync(self.device)
        self.ends[k] = (time.perf_counter(), time.process_time())

    def __iter__(self):
        self.ends, given, epoch = {}, 0, self.epoch
        self._stamp(-1)
        while True:
            self.loader.set_epoch(epoch)
            batches = iter(self.loader)
            try:
                for batch in batches:
                    yield batch
                    self._stamp(given)
                    given += 1
                    if given == self.count:
                        return
            finally:
                batches.close()  # ends the epoch's workers
            epoch += 1_000_000  # a short epoch ran out: go on with another order


@contextlib.contextmanager
def real_trainer(args, shards: Path, work: Path, precision: str, device):
    """Yields ``(run_round, trainer)``: ``run_round(r)`` runs epoch ``r`` of the real
    ``Trainer.train_one_epoch`` for ``--warmup`` + ``--steps`` batches and returns the
    seconds per step after the warmup (worker start and pipeline fill are in the warmup)."""
    from accelerate.state import AcceleratorState

    from dist_seg.config import load_config
    from dist_seg.console import Console
    from dist_seg.runtime import release
    from dist_seg.train import Trainer

    cfg = load_config(None, [{
        "name": "bench-train",
        "data": {"shards": str(shards), "size": args.size, "num_workers": args.workers},
        "model": {"name": args.model, "width": args.width, "stem_pool": args.stem_pool},
        "train": {"batch_size": args.batch, "precision": precision, "epochs": 1,
                  "channels_last": args.channels_last, "compile": args.compile},
        "run": {"out_dir": str(work / "runs"), "name": "bench-train"},
        "wandb": {"mode": "disabled"},
    }])  # fmt: skip
    n = args.warmup + args.steps
    # accelerate keeps one precision per process: start from a clean state, leave one too.
    AcceleratorState._reset_state()
    with _wandb_disabled():
        trainer = Trainer(cfg)
    trainer.console = Console(enabled=False)
    try:
        # Epochs as long as the real set's (the trainer's own loader, its train split listed
        # `copies` times), so a short synthetic split does not restart workers mid-run.
        stream = trainer.train_loader.stream
        copies = math.ceil(REAL_TRAIN_SAMPLES / stream.num_total)
        stream.shards, stream.num_total = stream.shards * copies, stream.num_total * copies
        timed = TimedLoader(trainer.train_loader, n, device, sync_at=(args.warmup - 1, n - 1))
        trainer.train_loader = timed

        def run_round(r: int) -> float:
            trainer.epoch, trainer.step = r, 0
            trainer.train_one_epoch()
            (t1, c1), (t0, c0) = timed.ends[n - 1], timed.ends[args.warmup - 1]
            return (t1 - t0) / args.steps, (c1 - c0) / args.steps

        yield run_round, trainer
    finally:
        trainer.tracker.finish()
        trainer.preemption.restore()
        accelerator = trainer.accelerator
        trainer.model = trainer.optimizer = trainer.train_loader = trainer.val_loader = None
        release(accelerator)
        AcceleratorState._reset_state()


@contextlib.contextmanager
def _wandb_disabled():
    """WANDB_MODE in the environment would override the bench's ``wandb.mode: disabled``."""
    saved = os.environ.pop("WANDB_MODE", None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ["WANDB_MODE"] = saved


def bench_train(args, work: Path) -> dict:
    from dist_seg.data.manifest import load_manifest
    from dist_seg.data.stream import build_loader
    from dist_seg.data.transforms import random_flips, to_device
    from dist_seg.models import build_model
    from dist_seg.train import loss_fn

    if args.warmup < 1 or args.steps < 1 or args.repeats < 1 or args.batch < 1:
        raise UserError("--warmup, --steps, --repeats and --batch must be at least 1")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = args.precision or ("bf16" if device.type == "cuda" else "no")
    root = synthetic_root(work, args.num_images)
    shards = packed(root, work, args.size, "raw", args.shard_size)
    loader = build_loader(load_manifest(shards), "train", batch_size=args.batch, train=True)
    batch = next(iter(loader))  # one real batch, preloaded on the device
    images, masks = to_device(batch, device, channels_last=False)
    kwargs = {"width": args.width} | ({"stem_pool": True} if args.stem_pool else {})

    def build() -> torch.nn.Module:
        torch.manual_seed(0)
        return build_model(args.model, **kwargs).to(device).train()

    # The seed's step: fp32, contiguous, BCEWithLogitsLoss on a float mask, loss.item().
    seed_model = build()
    seed_opt = torch.optim.Adam(seed_model.parameters(), lr=1e-4)
    criterion = torch.nn.BCEWithLogitsLoss()
    seed_x, seed_y = images.contiguous(), masks.unsqueeze(1).float()

    def seed_step():
        loss = criterion(seed_model(seed_x), seed_y)
        seed_opt.zero_grad()
        loss.backward()
        seed_opt.step()
        loss.item()

    def make_step(precision: str, channels_last: bool, compile_: bool, flips: bool = False):
        """A bare step: the trainer's model set-up and loss on preloaded tensors."""
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        model = build().to(memory_format=memory_format)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
        step_model = torch.compile(model) if compile_ else model
        x = images.contiguous(memory_format=memory_format)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        coins = torch.Generator().manual_seed(0)

        def step():
            xb, yb = random_flips(x, masks, coins) if flips else (x, masks)
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=bool(dtype)):
                logits = step_model(xb)
            loss, _ = loss_fn(logits, yb, "bce")
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return step, model, optimizer

    # The configured step, then (--switches) the same with one fast-path switch flipped each.
    cl, comp = args.channels_last, args.compile
    steps = [("seed", seed_step, seed_model, seed_opt), ("bare", *make_step(precision, cl, comp))]
    if args.switches:
        for other in ("no", "bf16") + (("fp16",) if device.type == "cuda" else ()):
            if other != precision:
                steps.append((f"bare, precision {other}", *make_step(other, cl, comp)))
        steps.append((f"bare, channels_last {not cl}", *make_step(precision, not cl, comp)))
        steps.append((f"bare, compile {not comp}", *make_step(precision, cl, not comp)))
        steps.append(("bare + flips on the device", *make_step(precision, cl, comp, flips=True)))
        if device.type == "cuda":
            steps.append((BENCHMARK_OFF, *make_step(precision, cl, comp)))

    flops = count_flops(seed_model, seed_x, seed_y)  # the same for every variant
    peak = peak_tflops(device, precision, args.peak_tflops)
    seconds: dict[str, list[float]] = {}
    cpu_seconds: dict[str, list[float]] = {}
    memory: dict[str, float | None] = {}
    warmup_s: dict[str, float] = {}

    def measure(name: str, timed_step, model, optimizer) -> None:
        with peak_memory(device) as peak_above:
            wall, cpu = timed_step()
            above = peak_above()
        seconds.setdefault(name, []).append(wall)
        cpu_seconds.setdefault(name, []).append(cpu)
        if above is not None:  # what the variant holds between steps + its peak above that
            mem = resident_gib(model, optimizer) + above
            memory[name] = max(memory.get(name) or 0.0, mem)
        else:
            memory.setdefault(name, None)

    with contextlib.ExitStack() as stack:
        trainer = None
        if args.trainer:
            run_round, trainer = stack.enter_context(
                real_trainer(args, shards, work, precision, device)
            )
        for r in range(args.repeats):  # interleaved rounds; the seed and bare steps warm up once
            for name, step, model, opt in steps:
                speed_switches(name not in ("seed", BENCHMARK_OFF))
                if r == 0:
                    t0 = time.perf_counter()
                    for _ in range(args.warmup):
                        step()
                    _sync(device)
                    warmup_s[name] = time.perf_counter() - t0
                measure(name, lambda step=step: time_steps(step, args.steps, device), model, opt)
            if trainer is not None:
                speed_switches(True)
                measure("trainer", lambda r=r: run_round(r), trainer.raw_model, trainer.optimizer)

    def record(step_s: float, mem: float | None) -> dict:
        achieved = flops / step_s / 1e12
        return {"step_s": step_s, "ms_per_image": 1e3 * step_s / args.batch,
                "images_per_s": args.batch / step_s, "tflops": achieved,
                "mfu": achieved / peak if peak else None, "peak_mem_gib": mem}  # fmt: skip

    variants = {
        k: record(min(v), memory[k]) | {"rounds_step_s": v, "cpu_step_s": min(cpu_seconds[k])}
        for k, v in seconds.items()
    }
    for k, v in warmup_s.items():
        variants[k]["warmup_s"] = v
    result = {
        "config": {
            "model": args.model,
            "width": args.width,
            "stem_pool": args.stem_pool,
            "size": args.size,
            "shard_size": args.shard_size,
            "batch": args.batch,
            "precision": precision,
            "channels_last": args.channels_last,
            "compile": args.compile,
            "switches": args.switches,
            "warmup": args.warmup,
            "steps": args.steps,
            "repeats": args.repeats,
            "workers": args.workers,
            "device": str(device),
        },
        "flops_per_image": flops / args.batch,
        "peak_tflops": peak,
        "variants": variants,
        "speedup_vs_seed": variants["seed"]["step_s"] / variants["bare"]["step_s"],
    }
    if args.trainer:
        overhead = 100 * (variants["trainer"]["step_s"] / variants["bare"]["step_s"] - 1)
        cpu = 100 * (variants["trainer"]["cpu_step_s"] / variants["bare"]["cpu_step_s"] - 1)
        result |= {"trainer_overhead_pct": overhead, "trainer_overhead_cpu_pct": cpu,
                   "overhead_goal_pct": GOAL_TRAINER_OVERHEAD_PCT,
                   "overhead_goal_met": overhead <= GOAL_TRAINER_OVERHEAD_PCT}  # fmt: skip
    return result


# --- printing -----------------------------------------------------------------------------------
def _header(result: dict) -> str:
    m, v = result["machine"], result["versions"]
    return (f"{result['command']}\n{m['cpu']}, {m['cores']} cores ({m['usable_cores']} usable), "
            f"load {m['load_avg_1m']} -> {m['load_avg_1m_end']} | {m['torch_threads']} threads | torch {v['torch']} | {result['date']}"
            + (f" | {m['gpu']}" if "gpu" in m else ""))  # fmt: skip


def print_data(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False)
    cfg = result["config"]
    console.print(_header(result))
    table = Table(title=f"loader throughput: epochs of {cfg['epoch_samples']} samples (the "
                  f"{cfg['train_samples']} train samples repeated) at {cfg['size']} px, batch "
                  f"{cfg['batch']}", title_justify="left")  # fmt: skip
    for col in ("workers", "loader", "samples/s", "per core", "x seed", "per CPU-s", "x seed",
                "1st batch s"):  # fmt: skip
        table.add_column(col, justify="right")
    for row in result["results"]:
        for kind in ("seed", *ENCODINGS, RESTART):
            if kind not in row:
                continue
            r = row[kind]
            table.add_row(str(row["workers"]), kind, f"{r['samples_per_s']:.0f}",
                          f"{r['per_core']:.0f}", f"{r.get('ratio', 1):.2f}",
                          f"{r['samples_per_cpu_s']:.0f}", f"{r.get('ratio_cpu', 1):.2f}",
                          f"{r['first_batch_s']:.2f}")  # fmt: skip
        table.add_section()
    console.print(table)
    b = result["bytes_per_sample"]
    console.print(f"on disk per sample: raw {b['raw'] / 1e3:.0f} KB, jpeg {b['jpeg'] / 1e3:.1f} KB "
                  f"(shards incl. tar headers and json); seed's files {b['seed_files'] / 1e3:.1f} KB")  # fmt: skip
    table = Table(title="streaming pipeline, one process, cumulative us/sample",
                  title_justify="left")  # fmt: skip
    table.add_column("stage")
    for e in ENCODINGS:
        table.add_column(e, justify="right")
    for stage in result["profile_us_per_sample"]["raw"]:
        table.add_row(
            stage, *(f"{result['profile_us_per_sample'][e][stage]:.1f}" for e in ENCODINGS)
        )
    console.print(table)
    met = [e for e, ok in result["goal_met"].items() if ok] or ["none"]
    console.print(
        "seed = per-file loader (full-size JPEG + PNG, resize); raw, jpeg = streaming loader.\n"
        "samples/s over whole epochs, worker start included; per core = samples/s / max(1, "
        "workers) (main process not counted); per CPU-s = samples per CPU second of all the "
        "loader's processes (main + workers: insensitive to other load); best of the rounds; "
        "x seed = ratio to the seed-style loader at the same worker count. Flips are in "
        "neither loader (dist_seg flips on the device).\n"
        f"goal {result['goal_ratio']:g}x per core at every worker count met by: {', '.join(met)}"
    )


def print_train(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False)
    cfg = result["config"]
    console.print(_header(result))
    table = Table(title=f"{cfg['model']} width {cfg['width']:g} at {cfg['size']} px, batch "
                  f"{cfg['batch']}, {cfg['steps']} timed steps after {cfg['warmup']}, "
                  f"on {cfg['device']}", title_justify="left")  # fmt: skip
    for col in ("", "ms/step", "ms/image", "images/s", "TFLOP/s", "MFU", "peak GiB", "x seed",
                "x bare", "worst round", "CPU ms/step"):  # fmt: skip
        table.add_column(col, justify="right")
    seed_s = result["variants"]["seed"]["step_s"]
    bare_s = result["variants"]["bare"]["step_s"]
    for key, v in result["variants"].items():
        table.add_row(key, f"{1e3 * v['step_s']:.1f}", f"{v['ms_per_image']:.1f}",
                      f"{v['images_per_s']:.1f}", f"{v['tflops']:.3f}",
                      f"{100 * v['mfu']:.1f}%" if v["mfu"] is not None else "-",
                      f"{v['peak_mem_gib']:.2f}" if v["peak_mem_gib"] is not None else "-",
                      f"{seed_s / v['step_s']:.2f}", f"{bare_s / v['step_s']:.2f}",
                      f"{max(v['rounds_step_s']) / v['step_s']:.2f}x",
                      f"{1e3 * v['cpu_step_s']:.1f}")  # fmt: skip
    console.print(table)
    layout = "channels-last" if cfg["channels_last"] else "contiguous"
    console.print(
        f"seed = fp32, contiguous, BCEWithLogitsLoss, preloaded batch; bare = {cfg['precision']}, "
        f"{layout}{', compiled' if cfg['compile'] else ''}, dist_seg's loss, preloaded batch"
        + (f"; trainer = Trainer.train_one_epoch on the streaming loader ({cfg['workers']} "
           "workers), same set-up as bare" if "trainer" in result["variants"] else "")
        + f".\nFLOPs per image (fwd + bwd, FlopCounterMode): {result['flops_per_image'] / 1e9:.3g} G"
    )  # fmt: skip
    if "trainer_overhead_pct" in result:
        ok = "met" if result["overhead_goal_met"] else "NOT met"
        console.print(f"real trainer vs bare step: {result['trainer_overhead_pct']:+.1f}% wall "
                      f"(goal <= {result['overhead_goal_pct']:g}%: {ok}); "
                      f"{result['trainer_overhead_cpu_pct']:+.1f}% CPU time of the main process")  # fmt: skip


def main(argv: list[str] | None = None) -> int:  # python -m dist_seg.bench, before the CLI knows it
    from dist_seg.cli import add_plugin

    parser = argparse.ArgumentParser(prog="dist-seg")
    add_plugin(parser.add_subparsers(dest="command", required=True), "bench")
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
