"""Bring your own data: the sample codec, the generic layout, mask policies, splits."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from conftest import SIZE
from helpers import TINY, run_cli
from PIL import Image

from dist_seg.data import codec, generic, pets
from dist_seg.data.manifest import MANIFEST, load_manifest
from dist_seg.data.masks import MaskPolicy
from dist_seg.data.pack import pack_generic
from dist_seg.data.stream import build_loader
from dist_seg.data.synth import make_synthetic_generic
from dist_seg.errors import DataError, UserError


def _loaded(out: Path, split: str, border: str = "foreground", size: int = 0) -> dict:
    """name -> (image HxWx3, mask HxW) as the loader yields them."""
    loader = build_loader(
        load_manifest(out), split, batch_size=3, train=False, border=border, size=size
    )
    return {
        n: (i.permute(1, 2, 0).numpy(), m.numpy())
        for b in loader
        for n, i, m in zip(b["name"], b["image"], b["mask"], strict=True)
    }


def _all_loaded(out: Path, **kw) -> dict:
    m = load_manifest(out)
    return {k: v for split in m.splits for k, v in _loaded(out, split, **kw).items()}


def _rgb(rng, h, w) -> np.ndarray:
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


# --- the codec -----------------------------------------------------------------------------
def test_npy_view_is_zero_copy_and_equals_np_load():
    rng = np.random.default_rng(0)
    for array in (_rgb(rng, 5, 7), rng.integers(0, 3, (4, 9), dtype=np.uint8)):
        data = codec.npy_bytes(array)
        view = memoryview(data)
        got = codec.npy_view(view)
        np.testing.assert_array_equal(got, np.load(io.BytesIO(data), allow_pickle=False))
        assert np.shares_memory(got, np.frombuffer(view, np.uint8))  # no copy
    with pytest.raises(ValueError, match="unsupported"):
        codec.npy_view(_object_npy())


def _object_npy() -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    return buf.getvalue()


@pytest.mark.parametrize("fixture", ["packed", "packed_jpeg"])
def test_plain_webdataset_reader_decodes_every_member(fixture, request):
    """A user without dist_seg reads every member as arrays, and they are what we train on."""
    out = request.getfixturevalue(fixture)
    loaded = _loaded(out, "test", border="ignore")
    url = str(out / load_manifest(out).raw["splits"]["test"]["shards"][0]["name"])
    n = 0
    for sample in wds.WebDataset(url, shardshuffle=False).decode("rgb8"):
        members = {k for k in sample if not k.startswith("__")}
        image_key = next(k for k in members if "image" in k)
        mask_key = next(k for k in members if "mask" in k)
        for key in members - {"json"}:  # nothing left as bytes
            assert isinstance(sample[key], np.ndarray), key
        meta = sample["json"]
        assert sample["__key__"] == meta["name"] and meta["source"] == "pets"
        image, mask = sample[image_key], sample[mask_key]
        mask = mask[..., 0] if mask.ndim == 3 else mask  # rgb8 makes a grey PNG 3-channel
        want_image, want_mask = loaded[sample["__key__"]]
        np.testing.assert_array_equal(mask, want_mask)
        if fixture == "packed":
            np.testing.assert_array_equal(image, want_image)
        full = sample[codec.FULL_MASK][..., 0]
        assert full.shape == (meta["orig_height"], meta["orig_width"])
        assert set(np.unique(full).tolist()) <= {0, 1, 255}
        n += 1
    assert n == load_manifest(out).shards("test")[0].num_samples


def test_pets_mask_keeps_the_trimap_losslessly(packed, synth_root):
    """The packed mask's 0/1/255 is the trimap's 2/1/3: every border policy comes back."""
    name = pets.read_split(synth_root, "test")[0].name
    s = pets.load_sample(synth_root, name)
    _, trimap = pets.resize_pair(s.image, s.trimap, SIZE)
    for border in pets.BORDER_POLICIES:
        got = _loaded(packed, "test", border)[name][1]
        np.testing.assert_array_equal(got, pets.trimap_to_mask(trimap, border))


def _write_v1_pack(out: Path, synth_root: Path) -> dict[str, np.ndarray]:
    """A format_version 1 pack as dist_seg 0.1 wrote it (image.u8 + trimap.u8, raw)."""
    out.mkdir()
    names = [r.name for r in pets.read_split(synth_root, "val")]
    trimaps = {}
    shard = out / "val-000000.tar"
    with wds.TarWriter(str(shard), encoder=False) as sink:
        for name in names:
            s = pets.load_sample(synth_root, name)
            image, trimap = pets.resize_pair(s.image, s.trimap, SIZE)
            trimaps[name] = trimap
            meta = {"name": name, "height": SIZE, "width": SIZE}
            sink.write({"__key__": name, "json": json.dumps(meta).encode(),
                        "image.u8": image.tobytes(), "trimap.u8": trimap.tobytes()})  # fmt: skip
    from dist_seg.data.manifest import sha256_file

    info = {"name": shard.name, "num_samples": len(names), "sha256": sha256_file(shard)}
    manifest = {"format_version": 1, "image_size": SIZE, "encoding": "raw",
                "splits": {"val": {"num_samples": len(names), "shards": [info]}}}  # fmt: skip
    (out / MANIFEST).write_text(json.dumps(manifest))
    return trimaps


def test_version_1_packs_still_load(tmp_path, synth_root):
    trimaps = _write_v1_pack(tmp_path / "v1", synth_root)
    for border in pets.BORDER_POLICIES:
        got = _loaded(tmp_path / "v1", "val", border)
        assert sorted(got) == sorted(trimaps)
        for name, trimap in trimaps.items():
            np.testing.assert_array_equal(got[name][1], pets.trimap_to_mask(trimap, border))


def test_version_1_packs_say_to_repack_for_original_size_scores(tmp_path, synth_root):
    _write_v1_pack(tmp_path / "v1", synth_root)
    manifest = load_manifest(tmp_path / "v1")
    loader = build_loader(manifest, "val", batch_size=2, train=False, full_masks=True)
    with pytest.raises(DataError, match="no original-size mask .* repack it with `dist-seg pack`"):
        list(loader)


# --- mask policies ---------------------------------------------------------------------------
def test_mask_policies_known_answers():
    m = np.array([[0, 255, 7], [255, 0, 0]], np.uint8)
    with pytest.raises(DataError, match=r"x\.png: mask values \[0, 7, 255\]"):
        MaskPolicy().apply(m, "x.png")
    assert MaskPolicy(ignore=7).apply(m, "x").tolist() == [[0, 1, 255], [1, 0, 0]]
    assert MaskPolicy("values", (7,), ignore=255).apply(m, "x").tolist() == [[0, 255, 1], [255, 0, 0]]  # fmt: skip
    with pytest.raises(DataError, match=r"include \[255\]"):
        MaskPolicy("values", (7,)).apply(m, "y.png")
    jpeg_like = np.array([[3, 250, 130], [127, 0, 255]], np.uint8)
    assert MaskPolicy("threshold", threshold=128).apply(jpeg_like, "x").tolist() == [[0, 1, 1], [0, 0, 1]]  # fmt: skip
    rgb = np.repeat(m[..., None], 3, axis=2)  # a grey mask saved as RGB
    assert MaskPolicy(ignore=7).apply(rgb, "x").tolist() == [[0, 1, 255], [1, 0, 0]]
    rgb[0, 0, 1] = 9
    with pytest.raises(DataError, match="colour mask"):
        MaskPolicy().apply(rgb, "c.png")
    for bad in (dict(kind="values"), dict(kind="threshold"), dict(kind="nope"), dict(ignore=0)):
        with pytest.raises(UserError):
            MaskPolicy(**bad)


# --- the generic layout ----------------------------------------------------------------------
def _save_mask(fg: np.ndarray, path: Path, fmt: str) -> None:
    """fg (bool HxW) in one of the mask formats users bring."""
    if fmt == "png255":
        Image.fromarray(fg.astype(np.uint8) * 255).save(path)
    elif fmt == "gif":  # Carvana: palette GIF, indices 0/1
        img = Image.fromarray(fg.astype(np.uint8)).convert("P")
        img.putpalette([0, 0, 0, 255, 255, 255])
        img.save(path)
    elif fmt == "palette_png":
        img = Image.fromarray(fg.astype(np.uint8), mode="L").convert("P")
        img.putpalette([0, 0, 0, 200, 30, 30])
        img.save(path)
    elif fmt == "png16":
        Image.fromarray(fg.astype(np.uint16) * 65535).save(path)
    elif fmt == "tif":
        Image.fromarray(fg.astype(np.uint8)).save(path)
    elif fmt == "bit":
        Image.fromarray(fg).convert("1").save(path)
    elif fmt == "rgb_png":
        Image.fromarray(np.repeat(fg[..., None].astype(np.uint8) * 255, 3, axis=2)).save(path)


MASK_FORMATS = {"png255": "png", "gif": "gif", "palette_png": "png", "png16": "png",
                "tif": "tif", "bit": "png", "rgb_png": "png"}  # fmt: skip


def _generic_set(root: Path, n: int = 8, seed: int = 0, match="{stem}") -> dict:
    """n PNG images (lossless, non-square) with masks in every format, in turn."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    truth = {}
    for i in range(n):
        h, w = int(rng.integers(20, 40)), int(rng.integers(20, 40))
        name = f"img{seed}_{i:03d}"
        fmt = list(MASK_FORMATS)[i % len(MASK_FORMATS)]
        fg = rng.random((h, w)) < 0.4
        image = _rgb(rng, h, w)
        Image.fromarray(image).save(root / "images" / f"{name}.png")
        _save_mask(fg, root / "masks" / f"{match.format(stem=name)}.{MASK_FORMATS[fmt]}", fmt)
        truth[name] = (image, fg.astype(np.uint8))
    return truth


def test_every_mask_format_round_trips_pixel_exact(tmp_path):
    truth = _generic_set(tmp_path / "src", n=14)
    m = pack_generic(tmp_path / "src/images", tmp_path / "src/masks", tmp_path / "out", size=0,
                     shard_size=4)  # fmt: skip
    assert m["mask_policy"]["kind"] == "nonzero" and m["source"]["kind"] == "generic"
    assert sum(s["num_samples"] for s in m["splits"].values()) == len(truth)
    got = {}
    for split in m["splits"]:
        for sample in _raw_samples(tmp_path / "out", split):
            got[sample[0]] = sample[1:]
    assert sorted(got) == sorted(truth)
    for name, (image, fg) in truth.items():
        np.testing.assert_array_equal(got[name][0], image, err_msg=name)
        np.testing.assert_array_equal(got[name][1], fg, err_msg=name)


def _raw_samples(out: Path, split: str):
    """(key, image, mask) of every sample of a split, by the plain webdataset reader."""
    raw = json.loads((out / MANIFEST).read_text())
    for shard in raw["splits"][split]["shards"]:
        for s in wds.WebDataset(str(out / shard["name"]), shardshuffle=False).decode("rgb8"):
            yield s["__key__"], s["image.npy"], s["mask.npy"]


def test_resized_pack_matches_an_independent_resize(tmp_path):
    truth = _generic_set(tmp_path / "src", n=6, match="{stem}_mask")
    pack_generic(tmp_path / "src/images", tmp_path / "src/masks", tmp_path / "out",
                 match="{stem}_mask", size=SIZE, shard_size=4)  # fmt: skip
    got = _all_loaded(tmp_path / "out")
    for name, (image, fg) in truth.items():
        want = np.asarray(Image.fromarray(image).resize((SIZE, SIZE), Image.BILINEAR))
        np.testing.assert_array_equal(got[name][0], want)
        want = np.asarray(Image.fromarray(fg).resize((SIZE, SIZE), Image.NEAREST))
        np.testing.assert_array_equal(got[name][1], want)


def test_lossy_jpeg_masks_need_a_threshold(tmp_path):
    rng = np.random.default_rng(3)
    for d in ("images", "masks"):
        (tmp_path / d).mkdir()
    fg = np.zeros((32, 48), bool)
    fg[8:24, 10:30] = True
    Image.fromarray(_rgb(rng, 32, 48)).save(tmp_path / "images/k1.jpg")
    Image.fromarray(np.repeat(fg[..., None] * 255, 3, 2).astype(np.uint8)).save(
        tmp_path / "masks/k1.jpg", quality=75
    )  # Kvasir-SEG: a 3-channel JPEG mask, values smeared around 0 and 255
    with pytest.raises(DataError, match=r"masks/k1\.jpg: .*--mask-threshold 128"):
        pack_generic(tmp_path / "images", tmp_path / "masks", tmp_path / "out", size=0)
    assert not (tmp_path / "out").exists()
    pack_generic(tmp_path / "images", tmp_path / "masks", tmp_path / "out", size=0,
                 policy=MaskPolicy("threshold", threshold=128), fractions=(1, 0, 0))  # fmt: skip
    got = next(_raw_samples(tmp_path / "out", "train"))[2]
    assert (got != fg).mean() < 0.01  # JPEG ringing may flip a pixel or two at the edge


def test_hash_split_is_stable_when_images_are_added(tmp_path):
    _generic_set(tmp_path / "src", n=30, seed=0)
    first = generic.scan(tmp_path / "src/images", tmp_path / "src/masks")[0]
    _generic_set(tmp_path / "src", n=30, seed=1)  # 30 more images
    second = generic.scan(tmp_path / "src/images", tmp_path / "src/masks")[0]
    for split in generic.SPLITS:
        old = {p.name for p in first[split]}
        new = {p.name for p in second[split]}
        assert old <= new and all(n.startswith("img1_") for n in new - old)
    assert sum(len(v) for v in second.values()) == 60
    assert len(second["train"]) > len(second["val"])  # 0.8 / 0.1 / 0.1


def test_splits_from_folders_and_from_list_files(tmp_path):
    for split, seed in (("train", 0), ("val", 1)):
        src = tmp_path / "tmp" / split
        _generic_set(src, n=3, seed=seed)
        shutil.move(src / "images", tmp_path / "f/images" / split)
        shutil.move(src / "masks", tmp_path / "f/masks" / split)
    splits, _, how = generic.scan(tmp_path / "f/images", tmp_path / "f/masks")
    assert how == "folders" and set(splits) == {"train", "val"}
    assert {p.name for p in splits["val"]} == {f"img1_{i:03d}" for i in range(3)}

    _generic_set(tmp_path / "l", n=5)
    (tmp_path / "train.txt").write_text("# train\nimg0_000\nimg0_001.png\nimg0_002\n")
    (tmp_path / "test.txt").write_text("img0_003\n")
    lists = {"train": tmp_path / "train.txt", "test": tmp_path / "test.txt"}
    splits, _, how = generic.scan(tmp_path / "l/images", tmp_path / "l/masks", split_lists=lists)
    assert how == "lists" and [p.name for p in splits["test"]] == ["img0_003"]
    assert len(splits["train"]) == 3  # img0_004 is in no list: left out
    (tmp_path / "test.txt").write_text("img0_003\nnot_there\n")
    with pytest.raises(DataError, match="test.txt: lists not_there, which has no image"):
        generic.scan(tmp_path / "l/images", tmp_path / "l/masks", split_lists=lists)


def test_synthetic_generic_set_packs_with_its_broken_pairs_counted(tmp_path):
    summary = make_synthetic_generic(tmp_path / "g", num_images=10)
    images, masks = tmp_path / "g/images", tmp_path / "g/masks"
    with pytest.raises(DataError) as info:
        pack_generic(images, masks, tmp_path / "out", match="{stem}_mask", size=SIZE)
    assert "--skip-bad" in str(info.value)
    assert any(Path(f).name in str(info.value) for f in summary["broken"].values())
    m = pack_generic(images, masks, tmp_path / "out", match="{stem}_mask", size=SIZE,
                     skip_bad=True)  # fmt: skip
    assert sum(s["num_samples"] for s in m["splits"].values()) == summary["pairs"]
    skipped = m["source"]["skipped"]
    assert len(skipped) == 3
    for file in summary["broken"].values():
        assert sum(Path(file).name in line for line in skipped) == 1, file
    got = _all_loaded(tmp_path / "out")
    assert len(got) == summary["pairs"]
    assert all(set(np.unique(mask).tolist()) == {0, 1} for _, mask in got.values())
    gif = Image.open(next(masks.glob("*.gif")))
    assert gif.format == "GIF" and gif.mode == "P"


def test_pack_cli_generic_bad_mask_is_one_line(tmp_path):
    _generic_set(tmp_path / "src", n=3)
    bad = tmp_path / "src/masks/img0_000.png"
    Image.fromarray(np.array([[0, 1], [2, 3]], np.uint8)).resize((25, 25)).save(bad)
    r = run_cli(["pack", "--images", str(tmp_path / "src/images"), "--masks",
                 str(tmp_path / "src/masks"), "--out", str(tmp_path / "out"), "--size", "32",
                 "--workers", "1"], cwd=tmp_path)  # fmt: skip
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr
    assert "img0_000.png: mask values [0, 1, 2, 3]" in lines[0]
    assert not (tmp_path / "out").exists()
    r = run_cli(["pack", "--images", str(tmp_path / "src/images"), "--out", "x"], cwd=tmp_path)
    assert r.returncode == 2 and "--images and --masks go together" in r.stderr


def test_pets_tars_members_are_flat_and_named(packed):
    raw = json.loads((packed / MANIFEST).read_text())
    assert raw["format_version"] == 2 and raw["source"]["kind"] == "pets"
    assert raw["mask_policy"]["kind"] == "trimap"
    with tarfile.open(packed / raw["splits"]["val"]["shards"][0]["name"]) as tf:
        names = tf.getnames()
    assert {n.split(".", 1)[1] for n in names} == {"image.npy", "mask.npy", "json", "full.png"}


@pytest.mark.slow
def test_generic_folder_to_trained_model_with_the_shipped_config(tmp_path):
    """The README's commands: synth a generic folder, pack it from the command line, train
    with configs/your_data.yaml (tiny overrides, 1 loader worker, W&B offline), evaluate at
    the packed and the original size; counts match the manifest."""
    repo = Path(__file__).resolve().parents[1]
    r = run_cli(["synth", "--root", "data", "--layout", "generic", "--num-images", "24"], tmp_path)
    assert r.returncode == 0, r.stderr
    r = run_cli(["pack", "--images", "data/images", "--masks", "data/masks", "--match",
                 "{stem}_mask", "--out", "shards", "--size", "32", "--skip-bad",
                 "--split-fractions", "0.6,0.2,0.2", "--workers", "1"], tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "3 skipped" in r.stdout
    manifest = load_manifest(tmp_path / "shards")
    assert sum(manifest.num_samples(s) for s in manifest.splits) == 24
    r = run_cli(["train", "--config", str(repo / "configs/your_data.yaml"), *TINY,
                 "--set", "model.name=unet", "--set", "data.shards=shards",
                 "--set", "train.epochs=1", "--set", "wandb.mode=offline"], tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_cli(["evaluate", "--checkpoint", "runs/your_data/best.pt", "--shards", "shards",
                 "--split", "test", "--out", "ev", "--original-size"], tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads((tmp_path / "ev/metrics.json").read_text())
    assert result["num_images"] == manifest.num_samples("test") > 0
    assert result["original_size"]["num_images"] == result["num_images"]


def test_a_generic_folder_given_as_a_pets_root_says_how_to_pack_it(tmp_path):
    _generic_set(tmp_path / "mine", n=2)
    with pytest.raises(DataError, match=r"dist-seg pack --images .*mine/images --masks"):
        pets.check_root(tmp_path / "mine")
