"""Reading a run of samples from a local shard: one seek and a few large reads.

Written by hand because webdataset streams a tar through Python's ``tarfile``: 10 KB
chunks joined into a new ``bytes`` per member, and sample k is reached only by reading and
dropping the k before it. For raw shards that was over half of the loader's time
(BENCHMARKS.md section 1). The shards ``dist-seg pack`` writes are plain ustar archives of
regular files, whose 512-byte headers are simple to walk. Anything else (pax or GNU
headers, links, remote URLs) returns ``None`` here and is read the webdataset way.
"""

from __future__ import annotations

import os

from dist_seg.errors import DataError

BLOCK = 512
REGULAR = (b"0", b"\0")
CHUNK = 16  # samples per read: bounds the memory a worker holds beyond its shuffle buffer


def _field(header: bytes, start: int, stop: int) -> bytes:
    return header[start:stop].split(b"\0", 1)[0]


def _member(header: bytes, path: str, pos: int) -> tuple[str, int] | None:
    """(name, size) of a regular-file header; None for any other kind of member."""
    try:
        checksum = int(_field(header, 148, 156).strip() or b"-1", 8)
        size = int(_field(header, 124, 136).strip() or b"0", 8)
    except ValueError:
        raise DataError(
            f"shard {path} has a damaged tar header at byte {pos}; repack with `dist-seg pack`"
        ) from None
    if checksum != sum(header[:148]) + 8 * 32 + sum(header[156:]):
        raise DataError(
            f"shard {path} has a damaged tar header at byte {pos}; repack with `dist-seg pack`"
        )
    if header[156:157] not in REGULAR or header[345:500].strip(b"\0"):  # not plain ustar
        return None
    return _field(header, 0, 100).decode("utf-8", "replace"), size


def _split(name: str) -> tuple[str, str]:
    """webdataset's grouping: the key is the path up to the first dot of the base name."""
    head, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), ext


def sample_offsets(path: str) -> list[int] | None:
    """Byte offset of each sample's first header, then the offset past the last whole member.

    A shard cut short ends with its last whole member; a sample left without all its
    members is caught by the caller, as is a count short of the manifest's. None: not a
    plain ustar archive.
    """
    offsets: list[int] = []
    end = os.path.getsize(path)
    key, pos = None, 0
    with open(path, "rb") as f:
        while pos + BLOCK <= end:
            f.seek(pos)
            header = f.read(BLOCK)
            if header[0] == 0:  # end-of-archive marker
                break
            member = _member(header, path, pos)
            if member is None:
                return None
            name, size = member
            if pos + BLOCK + size > end:  # cut inside this member's data
                break
            k = _split(name)[0]
            if k != key:
                offsets.append(pos)
                key = k
            pos += BLOCK + (size + BLOCK - 1) // BLOCK * BLOCK
    return offsets + [min(pos, end)]


def read_samples(path: str, offsets: list[int], start: int, stop: int):
    """Samples [start, stop) as webdataset-style dicts (``__key__``, ``__url__``, one entry
    per member). Members are zero-copy memoryviews into the read buffer, except ``json``
    (bytes, for json.loads). Yields fewer than asked when the shard holds fewer."""
    stop = min(stop, len(offsets) - 1)
    with open(path, "rb") as f:
        for first in range(start, stop, CHUNK):
            last = min(first + CHUNK, stop)
            f.seek(offsets[first])
            buf = f.read(offsets[last] - offsets[first])
            yield from _parse(memoryview(buf), path)


def _parse(buf: memoryview, path: str):
    sample: dict = {}
    pos = 0
    while pos + BLOCK <= len(buf):
        header = bytes(buf[pos : pos + BLOCK])
        name, size = _member(header, path, pos)
        key, ext = _split(name)
        if sample and sample["__key__"] != key:
            yield sample
            sample = {}
        if not sample:
            sample = {"__key__": key, "__url__": path}
        data = buf[pos + BLOCK : pos + BLOCK + size]
        sample[ext] = bytes(data) if ext == "json" else data
        pos += BLOCK + (size + BLOCK - 1) // BLOCK * BLOCK
    if sample:
        yield sample
