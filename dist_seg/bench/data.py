"""`dist-seg bench data`: this toolkit's streaming loader against the loaders a user would
pick instead, over the same samples, interleaved in one run.

* seed: the course template's per-file Dataset (full-size JPEG + PNG, resize per sample).
* raw, jpeg: ``build_loader(train=True)`` over the shards packed in each encoding.
* jpeg, gpu decode (``--decode gpu``): the jpeg shards with ``data.decode=gpu``: the workers
  hand over JPEG bytes (and decode the masks), the main process decodes each batch, with
  nvJPEG on a CUDA device, else with PIL (data/decode.py). On a CPU the decode moves from
  the workers to the main process, so "per core" (workers only) flatters it there: read its
  samples per CPU-second.
* wds raw, wds jpeg: a plain webdataset pipeline over the very same shard files, written the
  way webdataset's README shows (``WebDataset -> shuffle -> decode -> to_tuple -> batched``
  in a DataLoader), decoding the same members into the same tensors (uint8 NCHW images,
  uint8 masks with the border counted as foreground).
"""

from __future__ import annotations

import io
import json
import math
import os
import resource
import time
from itertools import islice
from pathlib import Path

import numpy as np
import torch

from dist_seg.errors import UserError

GOAL_DATA_RATIO = 10.0  # streaming loader vs seed-style, per core (issue "Speed")
GOAL_PEER_RATIO = 2.0  # streaming loader vs each peer loader, per core (issue 15 item 4)
PEER_GOAL_WORKERS = (0, 1)  # the worker counts the peer goal is judged at
TOOLKIT = ("raw", "jpeg")  # this toolkit's loader over the shards of each encoding
ENCODINGS = TOOLKIT
RESTART = "raw, restart"  # raw with persistent_workers off: new workers every epoch
GPU_DECODE = "jpeg, gpu decode"  # jpeg with data.decode=gpu (--decode gpu)
PEERS = {"wds raw": "raw", "wds jpeg": "jpeg"}  # peer loader -> the encoding it reads


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


# --- the seed's loader --------------------------------------------------------------------------
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


# --- a plain webdataset pipeline, as its README writes one --------------------------------------
def member_names(url: str) -> tuple[str, str]:
    """The image and mask member names of the first sample of a shard, as the packer wrote
    them (``image.npy``/``mask.npy`` raw and ``image.jpg``/``mask.png`` jpeg; format 1:
    ``image.u8``/``trimap.u8`` and ``image.jpg``/``trimap.png``): the peer pipeline asks for
    exactly those."""
    import webdataset as wds

    first = next(iter(wds.WebDataset(url, shardshuffle=False, nodesplitter=None)))
    keys = [k for k in first if not k.startswith("__")]
    image = [k for k in keys if k.split(".")[0] == "image"]
    mask = [k for k in keys if k.split(".")[0] in ("trimap", "mask")]
    if len(image) != 1 or len(mask) != 1 or "json" not in keys:
        raise UserError(f"{url}: members {sorted(keys)}: expected one image.*, one mask.* "
                        "and a json member (a shard written by `dist-seg pack`)")  # fmt: skip
    return image[0], mask[0]


def _pil_array(mode: str):
    def decode(data: bytes) -> np.ndarray:
        from PIL import Image

        with Image.open(io.BytesIO(data)) as img:
            return np.asarray(img if img.mode == mode else img.convert(mode))

    return decode


def wds_dataset(urls: list[str], batch: int, shuffle_buffer: int = 256, seed: int = 0):
    """``wds.WebDataset(urls).shuffle(n).decode(...).to_tuple(...).batched(B)``: the pipeline
    of webdataset's README over this toolkit's shards. Images are decoded to RGB and trimaps
    masks to one channel (``.jpg``/``.png`` by PIL, ``.npy`` by webdataset's default decoder,
    which reads no pickle; ``.u8`` stays bytes there and is reshaped from the json's height
    and width), the border counts as foreground, and a batch is a dict of uint8 tensors
    like the toolkit's: image N x 3 x H x W, mask N x H x W."""
    import webdataset as wds

    image_key, mask_key = member_names(urls[0])

    # A trimap (1 pet, 2 background, 3 border) or a mask (0, 1, 255 border): the border
    # counts as foreground either way, as in the toolkit's default policy.
    background = 2 if mask_key.startswith("trimap.") else 0

    def to_arrays(sample: tuple) -> tuple:
        image, mask, meta = sample
        if isinstance(image, bytes):  # raw bytes (".u8"): the json has the shape
            image = np.frombuffer(image, np.uint8).reshape(meta["height"], meta["width"], 3)
            mask = np.frombuffer(mask, np.uint8).reshape(meta["height"], meta["width"])
        return meta["name"], image, (mask != background).view(np.uint8)

    def collate(samples: list) -> dict:
        names, images, masks = zip(*samples)
        images = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)
        return {"name": list(names), "image": images, "mask": torch.from_numpy(np.stack(masks))}

    return (
        wds.WebDataset(urls, shardshuffle=len(urls), nodesplitter=None, seed=seed)
        .shuffle(shuffle_buffer)
        .decode(
            wds.handle_extension("image.jpg image.jpeg image.png", _pil_array("RGB")),
            wds.handle_extension("trimap.png mask.png", _pil_array("L")),
        )
        .to_tuple(image_key, mask_key, "json")
        .map(to_arrays)
        .batched(batch, collation_fn=collate, partial=False)
    )


def wds_loader(manifest, batch: int, workers: int, seed: int = 0):
    """The README's DataLoader around it (batch_size=None: the pipeline batches)."""
    urls = [s.url for s in manifest.shards("train")]
    return torch.utils.data.DataLoader(
        wds_dataset(urls, batch, seed=seed), batch_size=None, num_workers=workers
    )


# --- timing -------------------------------------------------------------------------------------
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
            "samples_per_cpu_s": samples / max(cpu, 1e-6), "samples": int(samples)}  # fmt: skip


def parse_workers(text: str) -> list[int]:
    try:
        workers = sorted({int(w) for w in str(text).split(",") if w.strip()})
    except ValueError:
        raise UserError(f"--workers {text!r}: expected counts like 0,1,2") from None
    if not workers or min(workers) < 0:
        raise UserError(f"--workers {text!r}: expected counts >= 0 like 0,1,2")
    return workers


def bench_data(args, work: Path) -> dict:
    from dist_seg.data import pets
    from dist_seg.data.manifest import load_manifest
    from dist_seg.data.stream import build_loader

    workers = parse_workers(args.workers)
    if min(args.epochs, args.repeats, args.batch) < 1:
        raise UserError("--epochs, --repeats and --batch must be at least 1")
    root = synthetic_root(work, args.num_images)
    manifests = {e: load_manifest(packed(root, work, args.size, e, args.shard_size))
                 for e in ENCODINGS}  # fmt: skip
    skipped = {s.split(":")[0] for s in manifests["raw"].raw["source"]["skipped"]}
    names = [r.name for r in pets.read_split(root, "train") if r.name not in skipped]
    # Epochs as long as the real set's: every loader goes over the train split `copies` times.
    copies = max(1, math.ceil(args.epoch_samples / len(names)))
    long = {e: repeat_train(m, copies) for e, m in manifests.items()}

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    decode = getattr(args, "decode", "cpu")

    def stream(encoding: str, w: int, persistent: bool = True, decode: str = "cpu"):
        loader = build_loader(long[encoding], "train", batch_size=args.batch, train=True,
                              num_workers=w, size=args.size, persistent_workers=persistent,
                              decode=decode, device=device)  # fmt: skip

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

    def peer(encoding: str, w: int):
        loaders = {}

        def epoch(e):  # webdataset's shard shuffle takes its seed at construction
            loaders[e] = wds_loader(long[encoding], args.batch, w, seed=e)
            return loaders[e]

        return epoch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a DataLoader worker (and the per-core count assumes it)
    best: dict[tuple[int, str], dict] = {}
    try:
        for _ in range(args.repeats):
            for w in workers:
                kinds = {"seed": seed(w)} | {e: stream(e, w) for e in ENCODINGS}
                if decode == "gpu":
                    kinds[GPU_DECODE] = stream("jpeg", w, decode="gpu")
                if w:  # the persistent-workers switch, off: workers start again every epoch
                    kinds[RESTART] = stream("raw", w, persistent=False)
                kinds |= {p: peer(e, w) for p, e in PEERS.items()}
                for kind, epoch_batches in kinds.items():
                    got = time_epochs(epoch_batches, args.epochs)
                    old = best.setdefault((w, kind), got)
                    for key in ("samples_per_s", "samples_per_cpu_s"):
                        old[key] = max(old[key], got[key])
                    old["first_batch_s"] = min(old["first_batch_s"], got["first_batch_s"])
        profile = {e: profile_stages(manifests[e], args.size, args.batch,
                                     min_samples=min(1000, args.epoch_samples))
                   for e in ENCODINGS}  # fmt: skip
        if decode == "gpu":
            split_profile = profile_gpu_decode(manifests["jpeg"], args.size, args.batch, device,
                                               min_samples=min(1000, args.epoch_samples))  # fmt: skip
    finally:
        torch.set_num_threads(threads)

    rows = []
    for w in workers:
        cores = max(1, w)
        loaders = {}
        for kind in ("seed", *ENCODINGS, GPU_DECODE, RESTART, *PEERS):
            if (w, kind) in best:
                got = best[w, kind]
                loaders[kind] = got | {"per_core": got["samples_per_s"] / cores}
        seed_row = loaders["seed"]
        for kind, r in loaders.items():
            if kind != "seed":
                r["ratio"] = r["per_core"] / seed_row["per_core"]
                r["ratio_cpu"] = r["samples_per_cpu_s"] / seed_row["samples_per_cpu_s"]
        if GPU_DECODE in loaders:  # the same shards decoded in the main process vs the workers
            g, j = loaders[GPU_DECODE], loaders["jpeg"]
            g["vs_jpeg"] = g["samples_per_s"] / j["samples_per_s"]
            g["vs_jpeg_cpu"] = g["samples_per_cpu_s"] / j["samples_per_cpu_s"]
        for p, e in PEERS.items():
            loaders[p]["toolkit_ratio"] = loaders[e]["per_core"] / loaders[p]["per_core"]
            loaders[p]["toolkit_ratio_cpu"] = (
                loaders[e]["samples_per_cpu_s"] / loaders[p]["samples_per_cpu_s"]
            )
        rows.append({"workers": w, "cores_counted": cores, "loaders": loaders})
    judged = [r for r in rows if r["workers"] in PEER_GOAL_WORKERS]
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
            "decode": decode,
            "members": {
                e: list(member_names(m.shards("train")[0].url)) for e, m in manifests.items()
            },  # fmt: skip
        },
        "results": rows,
        "bytes_per_sample": bytes_per_sample,
        "goal_ratio": GOAL_DATA_RATIO,
        "goal_met": {
            e: all(r["loaders"][e]["ratio"] >= GOAL_DATA_RATIO for r in rows) for e in ENCODINGS
        },
        "peer_goal_ratio": GOAL_PEER_RATIO,
        "peer_goal_workers": list(PEER_GOAL_WORKERS),
        "peer_goal_met": {  # None: no row at the judged worker counts
            p: all(r["loaders"][p]["toolkit_ratio"] >= GOAL_PEER_RATIO for r in judged)
            if judged
            else None
            for p in PEERS
        },
        "skipped_peers": dict(SKIPPED_PEERS),
        **(
            {"gpu_decode": gpu_decode_backend(device) | {"us_per_sample": split_profile}}
            if decode == "gpu"
            else {}
        ),
        "profile_us_per_sample": profile,
    }


# Peers not measured, and why: tried on this machine, 2026-12-01.
SKIPPED_PEERS = {
    "mds (mosaicml-streaming 0.13.0)": "does not install beside the CPU torch: it requires "
    "torchvision (PyPI's pins torch 2.14.1 with CUDA and would replace torch 2.13.0+cpu), "
    "numpy<2.2 (2.4.6 here), transformers and five cloud SDKs; installed without them, "
    "`import streaming` still imports torchvision (streaming/vision/base.py), which from PyPI "
    "does not load against the CPU torch build",
}


def gpu_decode_backend(device) -> dict:
    """Which decoder the "jpeg, gpu decode" row ran with, and why (data/decode.py)."""
    from dist_seg.data.decode import choose_backend

    backend, why = choose_backend(device)
    return {"device": str(device), "backend": backend, "note": why}


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
    reader = manifest.reader(size=size)  # the manifest's members, as build_loader reads them
    stage = ShardStream(shards, train=True, batch_size=batch, size=size, reader=reader)

    def samples():  # as the loader reads them (by offset for local shards)
        return read_segments((Segment(s, 0, s.num_samples) for s in shards), reader=reader)

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


def profile_gpu_decode(
    manifest, size: int, batch: int, device, repeats: int = 3, min_samples: int = 1000
) -> dict:
    """Microseconds per sample of data.decode=gpu's two halves over the jpeg train shards,
    one process, best of ``repeats``: what a worker does (tar read, mask decode, collate of
    the JPEG bytes: decode.EncodedReader) and what the training process does (the batch
    decode: decode.BatchDecoder, on ``device``; CUDA synchronised before the clock stops)."""
    from dist_seg.data.decode import BatchDecoder, EncodedReader, choose_backend
    from dist_seg.data.stream import Segment, read_segments

    shards = manifest.shards("train")
    shards = shards * math.ceil(min_samples / sum(s.num_samples for s in shards))
    n = sum(s.num_samples for s in shards)
    reader = EncodedReader(manifest.reader(size=size))
    decoder = BatchDecoder(reader.size, reader.reader.aspect, device, choose_backend(device)[0])

    def worker_side() -> list:
        samples = read_segments((Segment(s, 0, s.num_samples) for s in shards), reader=reader)
        it, out = map(reader, samples), []
        while chunk := list(islice(it, batch)):
            out.append(reader.collate(chunk, None, batch))
        return out

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    batches = worker_side()
    decoder(batches[0])  # first call: nvJPEG's set-up
    best = {"worker: tar read + mask + collate bytes": math.inf, "main: batch decode": math.inf}
    for _ in range(repeats):
        t0 = time.perf_counter()
        batches = worker_side()
        t1 = time.perf_counter()
        for b in batches:
            decoder(b)
        sync()
        t2 = time.perf_counter()
        for key, seconds in zip(best, (t1 - t0, t2 - t1)):
            best[key] = min(best[key], seconds)
    return {key: 1e6 * seconds / n for key, seconds in best.items()}


def _drain(iterable) -> None:
    for _ in iterable:
        pass
