"""The streaming loader: which rank and worker reads what, and what a batch looks like.

Ranks are simulated by building one loader per (rank, world_size): the sample order must
never depend on a process group, so no test here touches torch.distributed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import COUNTS

from dist_seg.data import pets
from dist_seg.data.manifest import MANIFEST, check_shards, load_manifest
from dist_seg.data.stream import border_mask, build_loader
from dist_seg.errors import DataError, UserError


# --- helpers ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def manifest(packed):
    return load_manifest(packed)


@pytest.fixture(scope="module")
def split_names(synth_root) -> dict[str, list[str]]:
    return {split: [r.name for r in pets.read_split(synth_root, split)] for split in pets.SPLITS}


@pytest.fixture
def pack_copy(packed, tmp_path) -> Path:
    """A private copy of the packed shards, safe to damage."""
    out = tmp_path / "shards"
    shutil.copytree(packed, out)
    return out


def _batches(loader) -> list[list[str]]:
    return [list(batch["name"]) for batch in loader]


def _flat(batches) -> list[str]:
    return [name for batch in batches for name in batch]


def _train(manifest, epoch=0, skip=0, **kw):
    kw = {"batch_size": 3, "train": True, "seed": 0, **kw}
    loader = build_loader(manifest, "train", **kw)
    loader.set_epoch(epoch, skip_batches=skip)
    return loader


def _member_offsets(shard: Path) -> list[int]:
    with tarfile.open(shard) as tf:
        return [m.offset for m in tf.getmembers()]


# --- eval: every sample exactly once -----------------------------------------------------------
@pytest.mark.parametrize("workers", [0, 1, 2])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_eval_reads_every_sample_exactly_once(manifest, split_names, world, workers):
    for split in ("val", "test"):  # val is a single shard of 4: fewer shards than ranks
        seen = []
        for rank in range(world):
            loader = build_loader(
                manifest,
                split,
                batch_size=5,
                train=False,
                rank=rank,
                world_size=world,
                num_workers=workers,
            )
            batches = _batches(loader)
            names = _flat(batches)
            assert loader.yielded == len(names)
            assert len(batches) == len(loader)
            assert all(1 <= len(b) <= 5 for b in batches)
            seen += names
        assert Counter(seen) == Counter(split_names[split])
        if workers == 0:  # ranks take contiguous ranges of the file order
            assert seen == split_names[split]


@pytest.mark.parametrize("workers", [0, 2])
def test_eval_rank_with_no_samples_iterates_fine(manifest, split_names, workers):
    world, seen, sizes = 5, [], []
    for rank in range(world):  # 4 samples over 5 ranks: at least one rank gets none
        loader = build_loader(
            manifest,
            "val",
            batch_size=2,
            train=False,
            rank=rank,
            world_size=world,
            num_workers=workers,
        )
        names = _flat(_batches(loader))
        assert loader.yielded == len(names)
        if not names:
            assert len(loader) == 0
        sizes.append(len(names))
        seen += names
    assert 0 in sizes
    assert sorted(seen) == sorted(split_names["val"]) and len(seen) == len(set(seen))


# --- train: equal full batches, each sample at most once per epoch ------------------------------
@pytest.mark.parametrize("workers", [0, 1, 2])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_train_equal_full_batches_on_every_rank(manifest, split_names, world, workers):
    batch = 3
    steps = COUNTS["train"] // (world * batch)
    seen = []
    for rank in range(world):
        loader = _train(
            manifest, epoch=1, batch_size=batch, rank=rank, world_size=world, num_workers=workers
        )
        batches = _batches(loader)
        assert len(batches) == len(loader) == steps
        assert all(len(b) == batch for b in batches)
        assert loader.yielded == steps * batch
        seen += _flat(batches)
    assert len(seen) == len(set(seen)) == world * steps * batch
    assert set(seen) <= set(split_names["train"])


def test_train_rank_share_does_not_depend_on_workers(manifest):
    for rank in range(2):
        shares = [
            set(_flat(_batches(_train(manifest, epoch=3, rank=rank, world_size=2, num_workers=w))))
            for w in (0, 2)
        ]
        assert shares[0] == shares[1]


def test_train_order_by_epoch_and_seed(manifest):
    def order(epoch=0, seed=0, workers=0):
        return _batches(_train(manifest, epoch=epoch, seed=seed, num_workers=workers))

    assert order(epoch=0) == order(epoch=0)  # two fresh loaders, same seed
    assert order(epoch=0, workers=2) == order(epoch=0, workers=2)
    assert order(epoch=0) != order(epoch=1)
    assert order(seed=0) != order(seed=1)
    # The same loader, epoch after epoch, also changes order (set_epoch is honoured).
    loader = _train(manifest)
    first = _batches(loader)
    loader.set_epoch(1)
    assert _batches(loader) != first


def test_train_remainder_rotates_so_every_sample_is_used(manifest, split_names):
    # world 3 x batch 4 = 12: two steps use 24 of 28 samples per epoch, leaving 4 out.
    used, left_out = set(), []
    for epoch in range(8):
        names = []
        for rank in range(3):
            names += _flat(_batches(_train(manifest, epoch, batch_size=4, rank=rank, world_size=3)))
        assert len(names) == len(set(names)) == 24
        used |= set(names)
        left_out.append(frozenset(split_names["train"]) - set(names))
    assert used == set(split_names["train"])
    assert len(set(left_out)) > 1


def test_train_remainder_rotates_within_a_single_shard(manifest, split_names):
    # val is one shard of 4: shard shuffling cannot help, only the epoch's rotation offset.
    used = set()
    for epoch in range(8):
        loader = build_loader(manifest, "val", batch_size=3, train=True, seed=0)
        loader.set_epoch(epoch)
        names = _flat(_batches(loader))
        assert len(names) == len(set(names)) == 3
        used |= set(names)
    assert used == set(split_names["val"])


# --- resume mid-epoch --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "workers, skip",
    [
        (0, 1),
        (0, 2),
        (0, 3),
        (2, 1),
        (2, 2),
        (2, 3),
    ],
)
def test_skip_batches_resumes_exactly(manifest, workers, skip):
    kw = {"batch_size": 2, "rank": 1, "world_size": 2, "num_workers": workers}  # 7 steps
    full = _batches(_train(manifest, epoch=4, **kw))
    assert len(full) == 7
    loader = _train(manifest, epoch=4, skip=skip, **kw)
    assert len(loader) == 7 - skip
    resumed = _batches(loader)
    assert sorted(map(sorted, resumed)) == sorted(map(sorted, full[skip:]))  # same batches
    assert resumed == full[skip:]  # ... in the same order
    loader.set_epoch(5)  # the next epoch is whole again
    assert len(loader) == 7 and len(_batches(loader)) == 7


# --- damaged shards -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "member",
    [
        9,  # the first member of the 4th of 6 samples: a cut between samples
        16,  # a cut inside a sample
        10,  # a cut inside a sample
    ],
)
@pytest.mark.parametrize("workers", [0, 1])
def test_truncated_shard_is_a_data_error_naming_it(pack_copy, member, workers):
    shard = pack_copy / "test-000001.tar"
    cut = _member_offsets(shard)[member]
    assert cut % 512 == 0 and 0 < cut < shard.stat().st_size
    os.truncate(shard, cut)
    manifest = load_manifest(pack_copy)
    error = check_shards(manifest, ["val", "test"])
    assert isinstance(error, DataError) and str(shard) in str(error)
    loader = build_loader(manifest, "test", batch_size=4, train=False, num_workers=workers)
    with pytest.raises(DataError, match="test-000001.tar"):
        _batches(loader)


def test_truncated_shard_in_training_is_a_data_error(pack_copy):
    shard = pack_copy / "train-000002.tar"
    os.truncate(shard, _member_offsets(shard)[6])  # 2 of 6 samples left
    loader = _train(load_manifest(pack_copy), batch_size=7)  # 4 steps: reads every sample
    with pytest.raises(DataError, match="train-000002.tar"):
        _batches(loader)


def test_altered_shard_is_caught_by_its_rank(pack_copy):
    shard = pack_copy / "test-000002.tar"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    manifest = load_manifest(pack_copy)
    error = check_shards(manifest, pets.SPLITS)
    assert isinstance(error, DataError) and str(shard) in str(error) and "sha256" in str(error)
    # Each rank checks every world_size-th shard of the list; index 2 belongs to rank 0 of 2.
    assert isinstance(check_shards(manifest, ["test"], rank=0, world_size=2), DataError)
    assert check_shards(manifest, ["test"], rank=1, world_size=2) is None
    assert check_shards(manifest, ["train", "val"]) is None


def test_missing_shard_is_a_data_error_naming_it(pack_copy):
    (pack_copy / "val-000000.tar").unlink()
    manifest = load_manifest(pack_copy)
    error = check_shards(manifest, ["val"])
    assert isinstance(error, DataError) and "val-000000.tar" in str(error)
    with pytest.raises(DataError, match="val-000000.tar"):
        _batches(build_loader(manifest, "val", batch_size=2, train=False))
    assert (pack_copy / MANIFEST).exists()


# --- batches -----------------------------------------------------------------------------------
@pytest.mark.parametrize("workers", [0, 1])
@pytest.mark.parametrize(
    "border, values",
    [("foreground", {0, 1}), ("background", {0, 1}), ("ignore", {0, 1, pets.IGNORE_INDEX})],
)
@pytest.mark.parametrize("train", [True, False])
def test_batch_layout(manifest, workers, border, values, train):
    loader = build_loader(
        manifest, "test", batch_size=4, train=train, num_workers=workers, border=border
    )
    seen = set()
    batches = list(loader)
    assert batches
    for batch in batches:
        image, mask = batch["image"], batch["mask"]
        b = len(batch["name"])
        assert image.dtype == torch.uint8 and image.shape == (b, 3, 32, 32)
        assert image.is_contiguous(memory_format=torch.channels_last)
        assert mask.dtype == torch.uint8 and mask.shape == (b, 32, 32)
        seen |= set(mask.unique().tolist())
    assert seen == values


def test_background_and_foreground_policies_differ_only_on_the_border(manifest):
    masks = {}
    for border in pets.BORDER_POLICIES:
        batches = list(build_loader(manifest, "val", batch_size=4, train=False, border=border))
        masks[border] = torch.cat([b["mask"] for b in batches])
    on_border = masks["ignore"] == pets.IGNORE_INDEX
    assert on_border.any()
    assert (masks["foreground"][on_border] == 1).all()
    assert (masks["background"][on_border] == 0).all()
    assert torch.equal(masks["foreground"][~on_border], masks["background"][~on_border])
    assert torch.equal(masks["foreground"][~on_border], masks["ignore"][~on_border])


# --- bad arguments -----------------------------------------------------------------------------
def test_train_with_more_processes_x_batch_than_samples_is_a_user_error(manifest):
    with pytest.raises(UserError, match="fewer than processes x batch size"):
        build_loader(manifest, "train", batch_size=10, train=True, world_size=3)  # 30 > 28
    build_loader(manifest, "train", batch_size=14, train=True, world_size=2)  # 28: one step


@pytest.mark.parametrize("train", [True, False])
def test_batch_size_zero_is_a_user_error(manifest, train):
    with pytest.raises(UserError, match="batch size"):
        build_loader(manifest, "val", batch_size=0, train=train)


def test_unknown_border_policy_and_split(manifest):
    with pytest.raises(UserError, match="border"):
        build_loader(manifest, "val", batch_size=1, train=False, border="edge")
    with pytest.raises(DataError, match="no split"):
        build_loader(manifest, "trainval", batch_size=1, train=False)


# --- shards behind a URL ------------------------------------------------------------------------
@pytest.fixture
def http_shards(packed):
    """``packed`` served over loopback HTTP, as shards on an object store would be."""
    import functools
    import http.server
    import threading

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(packed))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.mark.parametrize("workers", [0, 1])
def test_replanned_remainder_reads_alike_from_http_and_disk(packed, http_shards, workers):
    # The rest of an epoch replanned after an interruption has gaps: read by offset runs on
    # disk, read through (gaps dropped) over HTTP; the keys trained before come from tar
    # headers on disk, from the stream over HTTP.
    got = {}
    for where in (packed, http_shards):
        manifest = load_manifest(where)
        first = build_loader(manifest, "train", batch_size=2, train=True, world_size=2,
                             shuffle_buffer=3)  # fmt: skip
        first.set_epoch(1)
        trained = [k for _, batch in zip(range(3), first) for k in batch["key"]]
        rest = build_loader(manifest, "train", batch_size=3, train=True, num_workers=workers,
                            shuffle_buffer=3)  # fmt: skip
        assert "replanned: 12 samples" in rest.load_state_dict(first.state_dict(1, 3))
        before = rest.keys_trained_before(1)
        assert set(trained) < set(before) and len(before) == 12  # rank 1's 6 too
        got[str(where)] = ([list(b["key"]) for b in rest], sorted(before))
    disk, http = got.values()
    assert disk == http and len(disk[0]) == 5  # 16 left: 5 batches of 3


def test_leaving_mid_epoch_does_not_wait_for_the_workers(packed):
    # Workers ignore SIGTERM, which multiprocessing sends its daemonic children at exit: a
    # process leaving with a loader mid-epoch used to wait for them forever.
    code = (
        "from dist_seg.data.manifest import load_manifest\n"
        "from dist_seg.data.stream import build_loader\n"
        f"loader = build_loader(load_manifest({str(packed)!r}), 'train', batch_size=2, "
        "train=True, num_workers=2, persistent_workers=False)\n"
        "batches = iter(loader)\n"
        "next(batches)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr


@pytest.mark.parametrize("workers", [0, 1])
def test_shards_stream_from_http_urls(http_shards, workers):
    manifest = load_manifest(http_shards)
    assert all(s.url.startswith("http://") for s in manifest.shards("test"))
    assert check_shards(manifest, ["test"]) is None  # remote: count-checked while read
    loader = build_loader(manifest, "test", batch_size=5, train=False, num_workers=workers)
    names = [n for batch in loader for n in batch["name"]]
    assert len(names) == len(set(names)) == manifest.num_samples("test") == loader.yielded


# --- workers: persistent across epochs, batches through reused shared buffers -------------------
@pytest.mark.parametrize("workers", [1, 2])
def test_persistent_workers_follow_the_epoch_and_resume_point(manifest, workers):
    kw = {"batch_size": 2, "num_workers": workers}
    restarted = build_loader(manifest, "train", train=True, persistent_workers=False, **kw)
    persistent = build_loader(manifest, "train", train=True, persistent_workers=True, **kw)
    seen = {}
    for epoch, skip in [(0, 0), (1, 0), (1, 5), (2, 3), (0, 0)]:
        restarted.set_epoch(epoch, skip)
        persistent.set_epoch(epoch, skip)
        want = _batches(restarted)
        assert _batches(persistent) == want, (epoch, skip)
        seen[epoch, skip] = want
    assert seen[0, 0] != seen[1, 0] != seen[2, 3]  # the workers did see new epochs
    assert seen[1, 5] == seen[1, 0][5:]
    assert persistent.loader._iterator is not None  # the same workers served every epoch
    pids = {w.pid for w in persistent.loader._iterator._workers}
    persistent.set_epoch(3)
    _batches(persistent)
    assert {w.pid for w in persistent.loader._iterator._workers} == pids


@pytest.mark.parametrize("train", [True, False])
def test_batches_from_workers_stay_intact_while_held(manifest, train):
    # Workers collate into a ring of 6 shared buffers each; the main process must copy every
    # batch out, or batches held here would be overwritten by later ones.
    split = "train" if train else "test"
    kw = {"batch_size": 1, "train": train}
    held = list(build_loader(manifest, split, num_workers=2, **kw))
    assert len(held) > 2 * 6  # more batches than the buffers of both workers
    alone = {b["name"][0]: b for b in build_loader(manifest, split, num_workers=0, **kw)}
    assert sorted(b["name"][0] for b in held) == sorted(alone)  # (train: another order)
    for a in held:
        b = alone[a["name"][0]]
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
        assert a["image"].stride() == b["image"].stride()  # channels-last in memory


@pytest.mark.parametrize("border", pets.BORDER_POLICIES)
def test_border_mask_matches_the_reference_policy(border):
    trimap = torch.randint(1, 4, (37, 53), generator=torch.Generator().manual_seed(0)).numpy()
    trimap = trimap.astype("uint8")
    got = border_mask(trimap, border)
    assert got.dtype == trimap.dtype and (got == pets.trimap_to_mask(trimap, border)).all()
    assert set(got.ravel().tolist()) == ({0, 1, 255} if border == "ignore" else {0, 1})
