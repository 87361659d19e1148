"""The offset reader (data/tarread.py) against webdataset's own tar reading."""

from __future__ import annotations

import gzip
import io
import os
import shutil
import tarfile
from itertools import islice
from pathlib import Path

import pytest
import webdataset as wds

from dist_seg.data import tarread
from dist_seg.data.manifest import Shard
from dist_seg.data.stream import Segment, read_segments
from dist_seg.errors import DataError


def _wds(path: Path, start: int, stop: int) -> list[dict]:
    samples = islice(wds.tarfile_samples(iter([{"url": str(path)}])), start, stop)
    return [{k: bytes(v) for k, v in s.items() if not k.startswith("__")} for s in samples]


def _ours(path: Path, start: int, stop: int) -> list[dict]:
    offsets = tarread.sample_offsets(str(path))
    samples = tarread.read_samples(str(path), offsets, start, stop)
    return [{k: bytes(v) for k, v in s.items() if not k.startswith("__")} for s in samples]


@pytest.mark.parametrize("pack", ["packed", "packed_jpeg"])
def test_every_run_of_samples_matches_webdataset(pack, request):
    shard = sorted(request.getfixturevalue(pack).glob("train-*.tar"))[0]
    offsets = tarread.sample_offsets(str(shard))
    n = len(offsets) - 1
    assert n == len(_wds(shard, 0, None)) >= 6
    for start in range(n):
        for stop in range(start, n + 1):
            assert _ours(shard, start, stop) == _wds(shard, start, stop), (start, stop)


def test_compressed_or_tiny_shards_are_left_to_webdataset(packed, tmp_path):
    shard = sorted(packed.glob("train-*.tar"))[0]
    gz = tmp_path / "s.tar.gz"
    gz.write_bytes(gzip.compress(shard.read_bytes()))
    assert tarread.sample_offsets(str(gz)) is None
    n = len(_wds(shard, 0, None))
    got = list(read_segments([Segment(Shard(str(gz), n, ""), 0, n)]))  # via webdataset
    assert [s["__key__"] for s in got] == [s["__key__"] for s in _ours_raw(shard, 0, n)]
    tiny = tmp_path / "tiny.tar"
    tiny.write_bytes(b"x" * 100)
    assert tarread.sample_offsets(str(tiny)) is None


def _ours_raw(path: Path, start: int, stop: int) -> list[dict]:
    return list(tarread.read_samples(str(path), tarread.sample_offsets(str(path)), start, stop))


def test_keys_follow_webdataset_grouping(tmp_path):
    path = tmp_path / "t.tar"
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for name in ["a.x", "a.y.z", "dir/b.x", "dir/b.y", "c.d.x"]:
            info = tarfile.TarInfo(name)
            info.size = len(name)
            tf.addfile(info, io.BytesIO(name.encode()))
    ours = list(tarread.read_samples(str(path), tarread.sample_offsets(str(path)), 0, 9))
    theirs = list(wds.tarfile_samples(iter([{"url": str(path)}])))
    assert [s["__key__"] for s in ours] == [s["__key__"] for s in theirs] == ["a", "dir/b", "c"]
    assert [sorted(k for k in s if not k.startswith("__")) for s in ours] == [
        ["x", "y.z"],
        ["x", "y"],
        ["d.x"],
    ]


def test_archive_with_pax_headers_falls_back_to_webdataset(tmp_path):
    path = tmp_path / "pax.tar"
    long = "k" * 120  # longer than ustar's 100-byte name field: a pax header holds it
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        for ext in ("json", "image.u8"):
            info = tarfile.TarInfo(f"{long}.{ext}")
            info.size = 3
            tf.addfile(info, io.BytesIO(b"abc"))
    assert tarread.sample_offsets(str(path)) is None
    seg = Segment(Shard(str(path), 1, ""), 0, 1)
    with pytest.raises(DataError, match="fewer samples"):  # no trimap: read, then refused
        list(read_segments([seg]))


def test_damaged_header_is_a_data_error_naming_the_shard(packed, tmp_path):
    shard = tmp_path / "train-000000.tar"
    shutil.copy(sorted(packed.glob("train-*.tar"))[0], shard)
    offsets = tarread.sample_offsets(str(shard))
    with open(shard, "r+b") as f:  # flip a byte of the size field of sample 2's header
        f.seek(offsets[2] + 130)
        byte = f.read(1)
        f.seek(offsets[2] + 130)
        f.write(b"7" if byte != b"7" else b"6")
    with pytest.raises(DataError, match=r"train-000000.tar has a damaged tar header"):
        tarread.sample_offsets(str(shard))
    seg = Segment(Shard(str(shard), 6, ""), 0, 6)
    with pytest.raises(DataError, match="train-000000.tar"):
        list(read_segments([seg]))


def test_cut_in_the_last_members_padding_keeps_every_sample(packed_jpeg, tmp_path):
    original = sorted(packed_jpeg.glob("train-*.tar"))[0]
    shard = tmp_path / "s.tar"
    shutil.copy(original, shard)
    with tarfile.open(shard) as tf:
        last = tf.getmembers()[-1]
    data_end = last.offset_data + last.size
    assert data_end % 512, "the last member must end inside a block for this test"
    os.truncate(shard, data_end)  # its padding and the end marker are gone, the data is not
    n = len(_wds(original, 0, None))
    assert _ours(shard, 0, n) == _wds(original, 0, n)
    os.truncate(shard, data_end - 1)  # now the last member itself is cut
    assert len(_ours(shard, 0, n)) == n  # the sample is there, without its last member
    with pytest.raises(DataError, match="fewer samples"):
        list(read_segments([Segment(Shard(str(shard), n, ""), 0, n)]))
