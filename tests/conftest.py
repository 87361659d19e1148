"""Shared fixtures: one tiny synthetic Pet set and its packed shards, made once per session.

Sizes are chosen so that shard counts do not divide evenly: 64 images give train 28,
val 4 and test 32 samples; with shard_size 6 that is train [6, 6, 6, 6, 4], val [4] (one
shard, fewer than three ranks) and test [6, 6, 6, 6, 6, 2].
"""

from __future__ import annotations

from pathlib import Path

import pytest

from dist_seg.data.pack import pack
from dist_seg.data.synth import make_synthetic

NUM_IMAGES = 64
SIZE = 32
SHARD_SIZE = 6
COUNTS = {"train": 28, "val": 4, "test": 32}


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    """A synthetic Oxford-IIIT Pet root (real layout and file oddities). Do not modify it:
    copy it (shutil.copytree) before corrupting anything."""
    root = tmp_path_factory.mktemp("synth") / "pets"
    summary = make_synthetic(root, num_images=NUM_IMAGES, seed=0)
    assert {k: summary["counts"][k] for k in COUNTS} == COUNTS
    return root


@pytest.fixture(scope="session")
def packed(synth_root, tmp_path_factory) -> Path:
    """synth_root packed raw at SIZE with SHARD_SIZE, one process. Read-only for tests."""
    out = tmp_path_factory.mktemp("packed") / "shards"
    pack(synth_root, out, size=SIZE, shard_size=SHARD_SIZE, workers=1, encoding="raw")
    return out


@pytest.fixture(scope="session")
def packed_jpeg(synth_root, tmp_path_factory) -> Path:
    """synth_root packed as JPEG + PNG at SIZE, with shards of 7. Read-only for tests."""
    out = tmp_path_factory.mktemp("packed-jpeg") / "shards"
    pack(synth_root, out, size=SIZE, shard_size=7, workers=1, encoding="jpeg")
    return out
