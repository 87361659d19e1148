"""`dist-seg pack`: a data set -> WebDataset tar shards + manifest.json.

Sources: an Oxford-IIIT Pet root (``pack``) or a folder of images and a folder of masks
(``pack_generic``, dist_seg.data.generic); both write the one sample format of
dist_seg.data.codec. Format 2 (.npy members, the original-size mask beside) against format 1
(bare uint8 bytes), same shards and loader, interleaved, 3 rounds, best of each: raw
samples/s 0.97x at 0 workers and 0.98x at 1 worker, per CPU-second 1.05x and 1.21x (2-core
EPYC shared with other jobs, load 2-10, 2026-12-01); 268 KB/sample on disk instead of 264.

Encoding, chosen by measurement: `dist-seg bench data --work /tmp/bw` (other options at their
defaults; BENCHMARKS.md section 1: 2-core AMD EPYC, torch 2.13 CPU, 256x256, synthetic set,
one process, 2026-11-25 03:53 UTC) measured
  raw uint8 arrays  264 KB/sample on disk; decode (np.frombuffer) ~1 us, tar read + decode
                    ~17,000 samples/s, the whole train loader ~8,500 samples/s
  JPEG q95 + PNG     35 KB/sample on disk; decode ~680 us, tar read + decode
                    ~1,400 samples/s, the whole train loader ~1,160 samples/s
  (the seed's per-file loader, full-size JPEG + PNG and resize: ~355 samples/s)
Decode is what bounds a data worker, so "raw" is the default. "jpeg" is there for shared
file systems where 7.5x less disk and I/O matters more.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from dist_seg import __version__
from dist_seg.data import codec, pets
from dist_seg.data.codec import ENCODINGS, JPEG_QUALITY
from dist_seg.data.manifest import FORMAT_VERSION, MANIFEST, sha256_file
from dist_seg.data.masks import MaskPolicy, trimap_to_mask
from dist_seg.data.sizes import check_aspect, fit_pair, format_size, letterbox, parse_size
from dist_seg.errors import DataError, UserError, make_dir

PACK_SEED = 1234  # fixed: the train split is shuffled across shards the same way every time


@dataclass(frozen=True)
class PetsSource:
    """Loads one Pets record as (key, image, 0/1/255 mask at the original size whose 255 is
    the trimap border, metadata); picklable, for the worker processes."""

    root: Path

    def load(self, record: pets.Record) -> tuple[str, np.ndarray, np.ndarray, dict]:
        s = pets.load_sample(self.root, record.name)
        meta = {"name": record.name, "source": "pets", "class_id": record.class_id,
                "species": record.species, "breed_id": record.breed_id}  # fmt: skip
        return record.name, s.image, trimap_to_mask(s.trimap), meta


@dataclass(frozen=True)
class ShardTask:
    source: object  # PetsSource | generic.GenericSource: .load(record) -> key, image, mask, meta
    split: str
    index: int
    records: list
    size: tuple[int, int]  # (height, width); (0, 0): original sizes kept
    encoding: str
    skip_bad: bool
    out_dir: Path
    aspect: str = "stretch"


def encode_sample(
    key: str, image, mask, meta: dict, encoding: str, size, aspect: str = "stretch"
) -> dict:
    """One sample (mask 0/1/255 at the original size) fitted to ``size`` ((height, width)
    or a side; 0: kept) under the ``aspect`` policy (data.sizes) as WebDataset members
    (codec.encode), with the original-size mask beside it. With ``pad`` the json also
    records the letterbox: the box [top, left, height, width] the image occupies."""
    orig = image.shape[:2]
    hw = parse_size(size, "--size", zero="keep original sizes")
    if hw != (0, 0):
        image, small = fit_pair(image, mask, hw, aspect)
        if aspect == "pad":
            meta = {**meta, "letterbox": list(letterbox(orig[0], orig[1], hw))}
    else:
        small = mask
    meta = {**meta, "height": int(image.shape[0]), "width": int(image.shape[1]),
            "orig_height": int(orig[0]), "orig_width": int(orig[1])}  # fmt: skip
    return codec.encode(key, image, small, meta, encoding, mask if hw != (0, 0) else None)


def decode_sample(sample: dict) -> tuple[str, np.ndarray, np.ndarray]:
    """(name, image HxWx3 uint8, mask HxW uint8 as stored) of a sample this packer wrote,
    format_version 2 or 1 (whose mask is the trimap). No pickle."""
    for members in (*codec.PACKED.values(), *codec.V1.values()):
        if codec.is_complete(sample, members):
            return codec.decode(sample, members)[:3]
    raise DataError(f"sample {sample.get('__key__')!r} has none of dist_seg's member sets")


def _write_shard(task: ShardTask) -> dict:
    # Each pool task writes exactly one shard with a TarWriter (ShardWriter rotates shards
    # within a single process; here shards are written in parallel and named by index).
    import webdataset as wds

    name = f"{task.split}-{task.index:06d}.tar"
    path = task.out_dir / name
    count, skipped = 0, []
    with wds.TarWriter(str(path), encoder=False, mtime=0) as sink:
        for record in task.records:
            try:
                key, image, mask, meta = task.source.load(record)
            except DataError as e:
                if not task.skip_bad:
                    raise
                skipped.append(f"{record.name}: {e}")
                continue
            sink.write(encode_sample(key, image, mask, meta, task.encoding, task.size, task.aspect))
            count += 1
    return {
        "name": name,
        "num_samples": count,
        "sha256": sha256_file(path),
        "bytes": path.stat().st_size,
        "skipped": skipped,
    }


def _check_options(size, shard_size: int, encoding: str, aspect: str) -> tuple[int, int]:
    """The checked (height, width) of ``size`` (a side, "HxW" or (h, w); 0: originals kept)."""
    hw = parse_size(size, "--size", zero="keep original sizes")
    check_aspect(aspect)
    if shard_size < 1:
        raise UserError(f"--shard-size {shard_size}: must be at least 1")
    if encoding not in ENCODINGS:
        raise UserError(f"--encoding {encoding!r}: choose one of {', '.join(ENCODINGS)}")
    return hw


def pack(
    root: Path,
    out: Path,
    size: int | str | tuple[int, int] = 256,
    shard_size: int = 256,
    workers: int = 1,
    encoding: str = "raw",
    skip_bad: bool = False,
    progress=None,
    aspect: str = "stretch",
) -> dict:
    """Pack every split of the Oxford-IIIT Pet ``root`` into ``out`` atomically; returns the
    manifest dict. ``size``: a side, "HxW" (height first) or (h, w), 0 keeps original
    sizes; ``aspect``: stretch (the seed's) or pad (letterbox), data.sizes.

    Shards are written to ``<out>.partial/`` and the manifest last; only then is the
    directory renamed to ``out``. An interrupted pack leaves ``out`` as it was.
    """
    size = _check_options(size, shard_size, encoding, aspect)
    root, out = Path(root).resolve(), Path(out)
    pets.check_root(root)
    splits = {split: pets.read_split(root, split) for split in pets.SPLITS}
    source = {"kind": "pets", "dataset": "oxford-iiit-pet", "root": str(root)}
    return _pack(PetsSource(root), splits, out, source, MaskPolicy("trimap"), size=size,
                 shard_size=shard_size, workers=workers, encoding=encoding, skip_bad=skip_bad,
                 progress=progress, aspect=aspect)  # fmt: skip


def pack_generic(
    images: Path,
    masks: Path,
    out: Path,
    *,
    match: str = "{stem}",
    policy: MaskPolicy | None = None,
    split_lists: dict[str, Path] | None = None,
    fractions: tuple[float, float, float] | None = None,
    size: int | str | tuple[int, int] = 256,
    shard_size: int = 256,
    workers: int = 1,
    encoding: str = "raw",
    skip_bad: bool = False,
    progress=None,
    aspect: str = "stretch",
) -> dict:
    """Pack a folder of images and a folder of masks (data.generic) into ``out``, as pack."""
    from dist_seg.data import generic

    size = _check_options(size, shard_size, encoding, aspect)
    policy = policy or MaskPolicy()
    if policy.kind == "trimap":
        raise UserError("mask policy 'trimap' is for Oxford-IIIT Pet roots (--root)")
    images, masks, out = Path(images).resolve(), Path(masks).resolve(), Path(out)
    splits, skipped, how = generic.scan(
        images, masks, match=match, split_lists=split_lists,
        fractions=fractions or generic.DEFAULT_FRACTIONS, skip_bad=skip_bad,
    )  # fmt: skip
    source = {"kind": "generic", "images": str(images), "masks": str(masks), "match": match,
              "split": how, "skipped": skipped}  # fmt: skip
    return _pack(generic.GenericSource(policy), splits, out, source, policy, size=size,
                 shard_size=shard_size, workers=workers, encoding=encoding, skip_bad=skip_bad,
                 progress=progress, aspect=aspect)  # fmt: skip


def _pack(source, splits: dict, out: Path, info: dict, policy: MaskPolicy, *,
          size: tuple[int, int], shard_size: int, workers: int, encoding: str, skip_bad: bool,
          progress, aspect: str = "stretch") -> dict:  # fmt: skip
    splits = {k: list(v) for k, v in splits.items()}
    if "train" in splits:  # mix classes or name order across train shards, the same every time
        random.Random(PACK_SEED).shuffle(splits["train"])
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    make_dir(partial, f"--out {out}")
    tasks = [
        ShardTask(
            source, split, i, recs[j : j + shard_size], size, encoding, skip_bad, partial, aspect
        )  # fmt: skip
        for split, recs in splits.items()
        for i, j in enumerate(range(0, len(recs), shard_size))
    ]
    kept = size == (0, 0)
    t0 = time.perf_counter()
    try:
        if workers > 1:
            with ProcessPoolExecutor(workers) as pool:
                results = list(_progress(pool.map(_write_shard, tasks), len(tasks), progress))
        else:
            results = list(_progress(map(_write_shard, tasks), len(tasks), progress))
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)  # `out` was never touched
        raise

    manifest = {
        "format_version": FORMAT_VERSION,
        "toolkit_version": __version__,
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "source": {
            **info,
            "skipped": info.get("skipped", []) + [s for r in results for s in r.pop("skipped")],
        },
        "mask_policy": policy.to_dict(),
        # --size 0: no full-size mask member (the packed mask is the original)
        "members": asdict(codec.PACKED[encoding]) | ({"full_mask": None} if kept else {}),
        "image_size": format_size(size),  # the side, or "HxW" when not square
        "height": size[0],
        "width": size[1],
        "aspect": aspect,  # with --size 0: how the loader will fit them to data.size
        "encoding": encoding,
        "jpeg_quality": JPEG_QUALITY,
        "pack_seconds": round(time.perf_counter() - t0, 2),
        "splits": {},
    }
    for split in splits:
        shards = [r for t, r in zip(tasks, results) if t.split == split and r["num_samples"]]
        for t, r in zip(tasks, results):  # shards left empty by --skip-bad are dropped
            if t.split == split and not r["num_samples"]:
                (partial / r["name"]).unlink()
        manifest["splits"][split] = {
            "num_samples": sum(s["num_samples"] for s in shards),
            "shards": shards,
        }
    tmp = partial / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, partial / MANIFEST)
    _swap_in(partial, out)
    return manifest


def _swap_in(new: Path, out: Path) -> None:
    """Rename ``new`` to ``out``; an older pack there is removed only after the rename."""
    old = out.with_name(out.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        os.replace(out, old)
    os.replace(new, out)
    shutil.rmtree(old, ignore_errors=True)


def _progress(results, total: int, progress):
    if progress is None:
        yield from results
        return
    task = progress.add_task("packing shards", total=total)
    for r in results:
        progress.advance(task)
        yield r
