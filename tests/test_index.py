"""Shards written by others: `dist-seg index` writes their manifest; the toolkit trains and
evaluates on them as they are, and a wrong member mapping is one clear error."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from conftest import SIZE
from helpers import TINY, run_cli
from PIL import Image

from dist_seg.data.index import index
from dist_seg.data.manifest import MANIFEST, load_manifest, sha256_file
from dist_seg.data.masks import MaskPolicy
from dist_seg.data.stream import build_loader
from dist_seg.errors import DataError, UserError

COUNTS = {"train": 12, "val": 4}


def _encode(array: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt)
    return buf.getvalue()


def _foreign(folder: Path, counts=COUNTS, seed: int = 0) -> dict[str, tuple]:
    """A webdataset user's shards: `__key__` + jpg (any size) + png (0/255) + cls, two shards
    per split named <split>-NNNNNN.tar; returns key -> (image as decoded, 0/1 mask)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    truth = {}
    for split, n in counts.items():
        for shard in range(2):
            with wds.TarWriter(str(folder / f"{split}-{shard:06d}.tar"), encoder=False) as sink:
                for i in range(n // 2):
                    key = f"{split}{shard}_{i:03d}"
                    h, w = int(rng.integers(24, 60)), int(rng.integers(24, 60))
                    yy, xx = np.mgrid[:h, :w]
                    fg = (yy - h / 2) ** 2 + (xx - w / 3) ** 2 < (min(h, w) / 3) ** 2
                    image = np.stack([fg * 200 + 20, xx * 3, yy * 3], -1).astype(np.uint8)
                    jpg = _encode(image, "JPEG")
                    sink.write({"__key__": key, "jpg": jpg, "cls": b"1",
                                "png": _encode(fg.astype(np.uint8) * 255, "PNG")})  # fmt: skip
                    decoded = np.asarray(Image.open(io.BytesIO(jpg)).convert("RGB"))
                    truth[key] = (decoded, fg.astype(np.uint8))
    return truth


@pytest.fixture(scope="module")
def foreign(tmp_path_factory) -> tuple[Path, dict]:
    folder = tmp_path_factory.mktemp("foreign") / "shards"
    truth = _foreign(folder)
    index(folder, image_key="jpg", mask_key="png", split_by_prefix=True)
    return folder, truth


def test_index_writes_counts_hashes_and_mapping(foreign):
    folder, truth = foreign
    raw = json.loads((folder / MANIFEST).read_text())
    assert raw["source"]["kind"] == "webdataset" and raw["format_version"] == 2
    assert raw["members"]["image"] == "jpg" and raw["members"]["mask"] == "png"
    assert raw["mask_policy"]["kind"] == "nonzero"
    for split, n in COUNTS.items():
        info = raw["splits"][split]
        assert info["num_samples"] == n
        for shard in info["shards"]:
            assert shard["num_samples"] == n // 2
            assert shard["sha256"] == sha256_file(folder / shard["name"])
    assert sum(COUNTS.values()) == len(truth)


def test_foreign_samples_load_resized_as_the_packer_would(foreign):
    folder, truth = foreign
    manifest = load_manifest(folder)
    got = {}
    for split in COUNTS:
        loader = build_loader(manifest, split, batch_size=3, train=False, size=SIZE)
        for b in loader:
            for name, image, mask in zip(b["name"], b["image"], b["mask"], strict=True):
                got[name] = (image.permute(1, 2, 0).numpy(), mask.numpy())
    assert sorted(got) == sorted(truth)
    for key, (image, fg) in truth.items():
        want = np.asarray(Image.fromarray(image).resize((SIZE, SIZE), Image.BILINEAR))
        np.testing.assert_array_equal(got[key][0], want, err_msg=key)
        want = np.asarray(Image.fromarray(fg).resize((SIZE, SIZE), Image.NEAREST))
        np.testing.assert_array_equal(got[key][1], want, err_msg=key)


def test_wrong_mapping_is_one_clear_error_at_index_and_at_load(foreign, tmp_path):
    folder, _ = foreign
    with pytest.raises(DataError) as info:
        index(folder, image_key="jpg", mask_key="mask.png", split_by_prefix=True)
    msg = str(info.value)
    assert "train-000000.tar sample 'train0_000' has members ['cls', 'jpg', 'png']" in msg
    assert "truncated" not in msg and "fewer" not in msg
    # a manifest edited by hand to the wrong member: the loader says the same, not "truncated"
    raw = json.loads((folder / MANIFEST).read_text())
    raw["members"]["mask"] = "mask.png"
    bad = tmp_path / "bad"
    bad.mkdir()
    for s in raw["splits"]["val"]["shards"]:
        (bad / s["name"]).write_bytes((folder / s["name"]).read_bytes())
    raw["splits"] = {"val": raw["splits"]["val"]}
    (bad / MANIFEST).write_text(json.dumps(raw))
    loader = build_loader(load_manifest(bad), "val", batch_size=2, train=False, size=SIZE)
    with pytest.raises(DataError) as info:
        list(loader)
    msg = str(info.value)
    assert "val-000000.tar sample 'val0_000' has members ['cls', 'jpg', 'png']" in msg
    assert "mask -> 'mask.png'" in msg and "fewer" not in msg


def test_index_refuses_to_overwrite_a_pack_and_checks_policy(packed, tmp_path):
    with pytest.raises(UserError, match="is a pack already"):
        index(packed)
    folder = tmp_path / "s"
    _foreign(folder, {"train": 2})
    with pytest.raises(UserError, match="both 'png'"):
        index(folder, image_key="png", mask_key="png")
    index(folder, policy=MaskPolicy("values", (7,)))  # masks are 0/255: 255 unexpected
    loader = build_loader(load_manifest(folder), "train", batch_size=2, train=False, size=SIZE)
    with pytest.raises(DataError, match=r"train-000000.tar sample 'train0_000'.*include \[255\]"):
        list(loader)


@pytest.mark.slow
def test_train_and_evaluate_on_foreign_shards_end_to_end(foreign, tmp_path):
    """`dist-seg index` from the command line, then train and evaluate on the shards as they
    are, with loader workers on; evaluate's count matches the manifest."""
    folder, _ = foreign
    r = run_cli(["index", "--shards", str(folder), "--image-key", "jpg", "--mask-key", "png",
                 "--split-by-prefix"], cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "indexed {'train': 12, 'val': 4}" in r.stdout
    args = ["train", *TINY, "--set", f"data.shards={folder}", "--set", "train.epochs=2",
            "--set", "run.out_dir=runs", "--set", "run.name=foreign",
            "--set", "wandb.mode=offline"]  # fmt: skip
    r = run_cli(args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_cli(["evaluate", "--checkpoint", "runs/foreign/best.pt", "--shards", str(folder),
                 "--split", "val", "--out", "ev"], cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["num_images"] == COUNTS["val"]
    assert 0 <= metrics["dice_per_image"] <= 1
