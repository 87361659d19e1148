"""Reading a run of samples from a local shard: one seek, then one read per sample.

Written by hand because webdataset streams a tar through Python's ``tarfile``: 10 KB
chunks joined into a new ``bytes`` per member, and sample k is reached only by reading and
dropping the k before it. For raw shards that was over half of the loader's time
(BENCHMARKS.md section 1). The shards ``dist-seg pack`` writes are plain ustar archives of
regular files, whose 512-byte headers are simple to walk. Anything else (compressed
archives, pax or GNU headers, links, remote URLs) returns ``None`` here and is read the
webdataset way.

One read per sample, not per run of samples: members are zero-copy views into their read
buffer, which stays alive while any of them does, so a buffer shared by 16 samples kept
3.4 times the shuffle buffer's samples in memory (230 MB per worker at 256 px) for 7%
more speed.
"""

from __future__ import annotations

import os
from array import array

from dist_seg.errors import DataError

BLOCK = 512
REGULAR = (b"0", b"\0")


def _field(header: bytes, start: int, stop: int) -> bytes:
    return header[start:stop].split(b"\0", 1)[0]


def _damaged(path: str, pos: int) -> DataError:
    return DataError(
        f"shard {path} has a damaged tar header at byte {pos}; repack with `dist-seg pack`"
    )


def _member(header: bytes, path: str, pos: int) -> tuple[str, int] | None:
    """(name, size) of a plain ustar regular-file header; None for any other member. A
    header that does not parse is a DataError, except the first (``pos`` 0), which may
    just be another format (a gzipped shard): None, for webdataset to read."""
    try:
        checksum = int(_field(header, 148, 156).strip() or b"-1", 8)
        size = int(_field(header, 124, 136).strip() or b"0", 8)
    except ValueError:
        if pos == 0:
            return None
        raise _damaged(path, pos) from None
    if checksum != sum(header[:148]) + 8 * 32 + sum(header[156:]):
        if pos == 0:
            return None
        raise _damaged(path, pos)
    if header[156:157] not in REGULAR or header[345:500].strip(b"\0"):  # not plain ustar
        return None
    return _field(header, 0, 100).decode("utf-8", "replace"), size


def _split(name: str) -> tuple[str, str]:
    """webdataset's grouping: the key is the path up to the first dot of the base name."""
    head, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), ext


def sample_offsets(path: str) -> array | None:
    """Byte offset of each sample's first header, then the offset past the last whole member.

    A shard cut short ends with its last whole member; a sample left without all its
    members is caught by the caller, as is a count short of the manifest's. None: not a
    plain ustar archive (nor one at all: shorter than a header), for webdataset to read.
    """
    offsets = array("q")  # 8 bytes per sample, not a Python int's 36
    end = os.path.getsize(path)
    if end < BLOCK:
        return None
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
    offsets.append(min(pos, end))
    return offsets


def read_samples(path: str, offsets: array, start: int, stop: int):
    """Samples [start, stop) as webdataset-style dicts (``__key__``, ``__url__``, one entry
    per member). Members are zero-copy memoryviews into the sample's read buffer, except
    ``json`` (bytes, for json.loads). Yields fewer than asked when the shard holds fewer."""
    stop = min(stop, len(offsets) - 1)
    if start >= stop:
        return
    with open(path, "rb") as f:
        f.seek(offsets[start])
        for i in range(start, stop):
            buf = memoryview(f.read(offsets[i + 1] - offsets[i]))
            yield from _parse(buf, path, offsets[i])


def _parse(buf: memoryview, path: str, base: int):
    sample: dict = {}
    pos = 0
    while pos + BLOCK <= len(buf):
        header = bytes(buf[pos : pos + BLOCK])
        name, size = _member(header, path, base + pos) or (None, 0)
        if name is None:  # sample_offsets walked these headers: only a change since
            raise _damaged(path, base + pos)
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


def sample_keys(path: str, offsets: array, indices: list[int]) -> list[str]:
    """The webdataset key of samples ``indices``: one 512-byte header read each (the audit
    trail names the samples a run trained before it was interrupted)."""
    keys = []
    with open(path, "rb") as f:
        for i in indices:
            f.seek(offsets[i])
            member = _member(f.read(BLOCK), path, offsets[i])
            if member is None:
                raise _damaged(path, offsets[i])
            keys.append(_split(member[0])[0])
    return keys
