"""`dist-seg pack`: shards + manifest.json, checked against the reader (dist_seg.data.pets)."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from conftest import COUNTS, SHARD_SIZE, SIZE
from PIL import Image

from dist_seg import __version__
from dist_seg.data import pets
from dist_seg.data.codec import JPEG_QUALITY, JPEG_SUBSAMPLING
from dist_seg.data.manifest import (
    FORMAT_VERSION,
    MANIFEST,
    load_manifest,
    sha256_file,
    verify_shards,
)
from dist_seg.data.pack import pack
from dist_seg.data.stream import build_loader
from dist_seg.data.synth import make_synthetic
from dist_seg.errors import DataError, UserError


# --- helpers ---------------------------------------------------------------------------------
def _members(shard: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(shard) as tf:
        return [(m.name, tf.extractfile(m).read()) for m in tf.getmembers()]


def _metas(shard: Path) -> list[dict]:
    """The json member of every sample, in shard order."""
    return [json.loads(data) for name, data in _members(shard) if name.endswith(".json")]


def _split_names(out: Path, split: str) -> list[str]:
    """Sample names of one split in pack order (manifest shard order, then shard order)."""
    manifest = json.loads((out / MANIFEST).read_text())
    return [m["name"] for s in manifest["splits"][split]["shards"] for m in _metas(out / s["name"])]


def _tree(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def _loaded(out: Path, split: str, border: str = "foreground", size: int = 0) -> dict:
    """name -> (image HxWx3, mask HxW) as the loader yields them (eval order, one process)."""
    loader = build_loader(
        load_manifest(out), split, batch_size=5, train=False, border=border, size=size
    )
    got = {}
    for batch in loader:
        for name, image, mask in zip(batch["name"], batch["image"], batch["mask"], strict=True):
            assert name not in got
            got[name] = (image.permute(1, 2, 0).numpy(), mask.numpy())
    return got


def _jpeg_roundtrip(image: np.ndarray) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(image).save(
        buf, format="JPEG", quality=JPEG_QUALITY, subsampling=JPEG_SUBSAMPLING
    )
    return np.asarray(Image.open(buf).convert("RGB"))


def _corrupt_image(root: Path, name: str) -> Path:
    path = root / "images" / f"{name}.jpg"
    path.write_bytes(b"this is not an image at all")
    return path


@pytest.fixture(scope="module")
def reference(synth_root) -> dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """split -> name -> (image, trimap) resized by the reader, in split-file order."""
    return {
        split: {
            s.name: pets.resize_pair(s.image, s.trimap, SIZE)
            for s in pets.iter_split(synth_root, split)
        }
        for split in pets.SPLITS
    }


@pytest.fixture
def root_copy(synth_root, tmp_path) -> Path:
    """A private copy of the synthetic set, safe to corrupt."""
    root = tmp_path / "pets"
    shutil.copytree(synth_root, root)
    return root


# --- round trip -------------------------------------------------------------------------------
@pytest.mark.parametrize("border", pets.BORDER_POLICIES)
def test_raw_round_trip_is_pixel_exact(packed, reference, border):
    for split in pets.SPLITS:
        got = _loaded(packed, split, border)
        assert sorted(got) == sorted(reference[split])
        for name, (image, trimap) in reference[split].items():
            loaded_image, loaded_mask = got[name]
            np.testing.assert_array_equal(loaded_image, image, err_msg=name)
            np.testing.assert_array_equal(
                loaded_mask, pets.trimap_to_mask(trimap, border), err_msg=name
            )


def test_ignore_policy_keeps_all_three_trimap_values(packed, reference):
    got = _loaded(packed, "test", "ignore")
    values = np.unique(np.stack([m for _, m in got.values()]))
    assert values.tolist() == [0, 1, pets.IGNORE_INDEX]


def test_jpeg_round_trip_image_close_and_trimap_exact(packed_jpeg, reference):
    for split in pets.SPLITS:
        got = _loaded(packed_jpeg, split, "ignore")
        assert sorted(got) == sorted(reference[split])
        diffs = []
        for name, (image, trimap) in reference[split].items():
            loaded_image, loaded_mask = got[name]
            np.testing.assert_array_equal(
                loaded_mask, pets.trimap_to_mask(trimap, "ignore"), err_msg=name
            )
            # Exactly what one JPEG encode/decode at the pack quality gives, and close to it.
            np.testing.assert_array_equal(loaded_image, _jpeg_roundtrip(image), err_msg=name)
            diffs.append(np.abs(loaded_image.astype(int) - image.astype(int)).mean())
        # 32x32 noisy synthetic images with 4:2:0 chroma: mean ~5, worst ~12 of 255.
        assert max(diffs) < 16 and np.mean(diffs) < 8


def test_original_size_pack_resizes_in_the_loader_exactly(tmp_path):
    root, out = tmp_path / "pets", tmp_path / "shards"
    summary = make_synthetic(root, num_images=6)
    manifest = pack(root, out, size=0, shard_size=2)
    assert manifest["image_size"] == 0
    for split in pets.SPLITS:
        assert manifest["splits"][split]["num_samples"] == summary["counts"][split]
        metas = [m for s in manifest["splits"][split]["shards"] for m in _metas(out / s["name"])]
        for meta, sample in zip(metas, pets.iter_split(root, split), strict=True):
            assert (meta["height"], meta["width"]) == sample.trimap.shape
        got = _loaded(out, split, "ignore", size=SIZE)
        for sample in pets.iter_split(root, split):
            image, trimap = pets.resize_pair(sample.image, sample.trimap, SIZE)
            np.testing.assert_array_equal(got[sample.name][0], image)
            np.testing.assert_array_equal(
                got[sample.name][1], pets.trimap_to_mask(trimap, "ignore")
            )
    with pytest.raises(UserError, match="--size 0"):
        build_loader(load_manifest(out), "test", batch_size=1, train=False)


# --- manifest ---------------------------------------------------------------------------------
def test_manifest_schema(packed, synth_root):
    raw = json.loads((packed / MANIFEST).read_text())
    assert raw["format_version"] == FORMAT_VERSION
    assert raw["toolkit_version"] == __version__
    assert raw["image_size"] == SIZE and raw["encoding"] == "raw"
    assert raw["source"]["root"] == str(synth_root.resolve())
    assert raw["source"]["skipped"] == []
    assert set(raw["splits"]) == set(pets.SPLITS)
    on_disk = {p.name for p in packed.iterdir()} - {MANIFEST}
    listed = set()
    for split in pets.SPLITS:
        info = raw["splits"][split]
        counts = [s["num_samples"] for s in info["shards"]]
        expected = [SHARD_SIZE] * (COUNTS[split] // SHARD_SIZE)
        expected += [COUNTS[split] % SHARD_SIZE] if COUNTS[split] % SHARD_SIZE else []
        assert counts == expected
        assert info["num_samples"] == sum(counts) == len(pets.read_split(synth_root, split))
        for shard in info["shards"]:
            assert "/" not in shard["name"] and not Path(shard["name"]).is_absolute()
            assert shard["name"].startswith(f"{split}-") and shard["name"].endswith(".tar")
            path = packed / shard["name"]
            assert shard["sha256"] == sha256_file(path)
            assert shard["bytes"] == path.stat().st_size
            assert len(_metas(path)) == shard["num_samples"]
            listed.add(shard["name"])
    assert listed == on_disk  # no stray files, no missing ones
    manifest = load_manifest(packed)
    for split in pets.SPLITS:
        assert manifest.num_samples(split) == COUNTS[split]
        verify_shards(manifest.shards(split))


def test_sample_metadata_matches_the_split_file(packed, synth_root):
    for split in pets.SPLITS:
        records = {r.name: r for r in pets.read_split(synth_root, split)}
        originals = {s.name: s.trimap.shape for s in pets.iter_split(synth_root, split)}
        raw = json.loads((packed / MANIFEST).read_text())
        for shard in raw["splits"][split]["shards"]:
            for meta in _metas(packed / shard["name"]):
                r = records[meta["name"]]
                assert (meta["class_id"], meta["species"], meta["breed_id"]) == (
                    r.class_id,
                    r.species,
                    r.breed_id,
                )
                assert (meta["height"], meta["width"]) == (SIZE, SIZE)
                assert (meta["orig_height"], meta["orig_width"]) == originals[meta["name"]]


def test_train_is_shuffled_across_shards_and_eval_keeps_file_order(packed, synth_root):
    for split in ("val", "test"):
        assert _split_names(packed, split) == [r.name for r in pets.read_split(synth_root, split)]
    packed_train = _split_names(packed, "train")
    file_train = [r.name for r in pets.read_split(synth_root, "train")]
    assert sorted(packed_train) == sorted(file_train) and len(set(packed_train)) == len(file_train)
    assert packed_train != file_train
    # Mixed across shards: the first shard does not hold the first names of the file.
    first_shard = set(packed_train[:SHARD_SIZE])
    assert first_shard != set(file_train[:SHARD_SIZE])


def test_pack_is_deterministic(packed, synth_root, tmp_path):
    out = tmp_path / "again"
    again = pack(synth_root, out, size=SIZE, shard_size=SHARD_SIZE, workers=1)
    new, old = _tree(out), _tree(packed)
    assert new.keys() == old.keys()
    for name in old.keys() - {MANIFEST}:
        assert new[name] == old[name], name
    first = json.loads((packed / MANIFEST).read_text())
    written = json.loads((out / MANIFEST).read_text())
    assert written == again  # the returned dict is what was written
    for m in (first, again):
        m.pop("created")
        m.pop("pack_seconds")
    assert again == first


def test_two_workers_write_the_same_shards(packed, synth_root, tmp_path):
    manifest = pack(synth_root, tmp_path / "w2", size=SIZE, shard_size=SHARD_SIZE, workers=2)
    first = json.loads((packed / MANIFEST).read_text())
    assert manifest["splits"] == first["splits"]
    for split in pets.SPLITS:
        for shard in manifest["splits"][split]["shards"]:
            assert sha256_file(tmp_path / "w2" / shard["name"]) == shard["sha256"]


# --- failures ---------------------------------------------------------------------------------
def test_failure_midway_leaves_existing_pack_untouched(root_copy, tmp_path):
    out = tmp_path / "shards"
    pack(root_copy, out, size=SIZE, shard_size=SHARD_SIZE)
    before = _tree(out)
    # Packing goes train, val, test: the last test sample fails after most shards are written.
    bad_name = pets.read_split(root_copy, "test")[-1].name
    bad_path = _corrupt_image(root_copy, bad_name)
    with pytest.raises(DataError, match=bad_name) as info:
        pack(root_copy, out, size=SIZE, shard_size=SHARD_SIZE)
    assert str(bad_path) in str(info.value) and "--skip-bad" in str(info.value)
    assert _tree(out) == before
    manifest = load_manifest(out)
    for split in pets.SPLITS:
        verify_shards(manifest.shards(split))
    # Nothing anywhere claims shards it does not have.
    for manifest_path in tmp_path.rglob(MANIFEST):
        raw = json.loads(manifest_path.read_text())
        for info_ in raw["splits"].values():
            for shard in info_["shards"]:
                assert (manifest_path.parent / shard["name"]).is_file()


def test_failure_on_nth_sample_without_previous_pack_leaves_nothing(
    synth_root, tmp_path, monkeypatch
):
    real, calls = pets.load_sample, []

    def flaky(root, name):
        calls.append(name)
        if len(calls) == 20:
            raise DataError(f"{root}/images/{name}.jpg cannot be decoded (test)")
        return real(root, name)

    monkeypatch.setattr(pets, "load_sample", flaky)
    out = tmp_path / "shards"
    with pytest.raises(DataError, match="cannot be decoded") as info:
        pack(synth_root, out, size=SIZE, shard_size=SHARD_SIZE)
    assert calls[-1] in str(info.value)
    assert len(calls) == 20  # stopped at the failure, no further samples read
    assert not out.exists()
    assert not list(tmp_path.rglob(MANIFEST))


def test_skip_bad_skips_and_records(root_copy, tmp_path):
    train_bad = pets.read_split(root_copy, "train")[3].name
    test_last_shard = [r.name for r in pets.read_split(root_copy, "test")][-2:]  # a whole shard
    for name in [train_bad, *test_last_shard]:
        _corrupt_image(root_copy, name)
    out = tmp_path / "shards"
    manifest = pack(root_copy, out, size=SIZE, shard_size=SHARD_SIZE, skip_bad=True)
    skipped = manifest["source"]["skipped"]
    assert sorted(s.split(": ")[0] for s in skipped) == sorted([train_bad, *test_last_shard])
    assert all("images/" in s for s in skipped)  # the reason names the file
    splits = manifest["splits"]
    assert splits["train"]["num_samples"] == COUNTS["train"] - 1
    assert splits["val"]["num_samples"] == COUNTS["val"]
    assert splits["test"]["num_samples"] == COUNTS["test"] - 2
    assert [s["num_samples"] for s in splits["test"]["shards"]] == [6, 6, 6, 6, 6]
    for split in pets.SPLITS:
        info = splits[split]
        assert info["num_samples"] == sum(s["num_samples"] for s in info["shards"])
    on_disk = {p.name for p in out.iterdir()} - {MANIFEST}
    assert on_disk == {s["name"] for i in splits.values() for s in i["shards"]}
    assert json.loads((out / MANIFEST).read_text())["source"]["skipped"] == skipped
    names = set(_loaded(out, "train")) | set(_loaded(out, "test"))
    assert not names & {train_bad, *test_last_shard}
    assert len(_loaded(out, "train")) == COUNTS["train"] - 1


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"size": 24}, "multiple of 16"),
        ({"size": -16}, "multiple of 16"),
        ({"encoding": "png"}, "raw, jpeg"),
        ({"shard_size": 0}, "at least 1"),
    ],
)
def test_bad_arguments_are_user_errors(synth_root, tmp_path, kwargs, match):
    out = tmp_path / "shards"
    with pytest.raises(UserError, match=match) as info:
        pack(synth_root, out, **{"size": SIZE, **kwargs})
    assert not isinstance(info.value, DataError)
    assert list(tmp_path.iterdir()) == []  # nothing written before the arguments are checked


def test_not_a_pet_root_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="dist-seg"):
        pack(tmp_path / "nothing", tmp_path / "shards", size=SIZE)
    assert not (tmp_path / "shards").exists()


# --- load_manifest ----------------------------------------------------------------------------
def _manifest_dir(tmp_path: Path, text: str) -> Path:
    d = tmp_path / "m"
    d.mkdir()
    (d / MANIFEST).write_text(text)
    return d


def test_missing_manifest_says_pack(tmp_path):
    with pytest.raises(DataError, match="dist-seg pack"):
        load_manifest(tmp_path)


def test_newer_format_version_says_upgrade(packed, tmp_path):
    raw = json.loads((packed / MANIFEST).read_text())
    raw["format_version"] = FORMAT_VERSION + 1
    d = _manifest_dir(tmp_path, json.dumps(raw))
    with pytest.raises(DataError, match="upgrade") as info:
        load_manifest(d)
    assert str(FORMAT_VERSION + 1) in str(info.value)


@pytest.mark.parametrize(
    "text",
    [
        '{"format_version": 1, "splits": ',  # cut JSON
        "",  # empty file
        "[1, 2, 3]",  # JSON but not an object
        '{"splits": {}}',  # no format_version
        '{"format_version": 1, "image_size": 32, "encoding": "raw"}',  # no splits
        '{"format_version": 1, "image_size": 32, "encoding": "raw", '
        '"splits": {"train": {"shards": [{"name": "a.tar"}]}}}',  # shard without counts
    ],
)
def test_malformed_manifest_is_a_data_error(tmp_path, text):
    with pytest.raises(DataError):
        load_manifest(_manifest_dir(tmp_path, text))


def test_unknown_split_is_a_data_error(packed):
    with pytest.raises(DataError, match="no split 'trainval'"):
        load_manifest(packed).shards("trainval")
