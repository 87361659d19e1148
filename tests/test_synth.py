"""The synthetic twin: real layout, every real oddity planted, learnable masks, determinism."""

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dist_seg.data import pets
from dist_seg.data.synth import make_synthetic
from dist_seg.errors import DataError, UserError

NUM_IMAGES = 20


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("synth") / "pets"
    return root, make_synthetic(root, num_images=NUM_IMAGES, seed=0)


def _tree_hash(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def test_layout_and_split_files(made):
    root, summary = made
    pets.check_root(root)
    list_lines = (root / "annotations" / "list.txt").read_text().splitlines()
    assert all(line.startswith("#") for line in list_lines[:6])
    listed = [line.split() for line in list_lines[6:]]
    assert len(listed) == NUM_IMAGES
    for name, class_id, species, breed_id in listed:
        breed = name.rsplit("_", 1)[0]
        assert pets.BREEDS[int(class_id) - 1] == breed
        assert int(species) == (1 if breed[0].isupper() else 2)
        same_species = [b for b in pets.BREEDS if b[0].isupper() == breed[0].isupper()]
        assert same_species.index(breed) + 1 == int(breed_id)
        assert (root / "images" / f"{name}.jpg").is_file()
        assert (root / "annotations" / "trimaps" / f"{name}.png").is_file()
    counts = {s: len(pets.read_split(root, s)) for s in pets.SPLITS}
    assert (
        counts
        == {s: summary["counts"][s] for s in pets.SPLITS}
        == {
            "train": 9,
            "val": 1,
            "test": 10,
        }
    )
    assert list((root / "annotations" / "xmls").glob("*.xml"))


def test_breed_list_is_the_real_one():
    assert len(pets.BREEDS) == 37 and list(pets.BREEDS) == sorted(pets.BREEDS, key=str.lower)
    cats = [b for b in pets.BREEDS if b[0].isupper()]
    assert len(cats) == 12 and "British_Shorthair" in cats and "yorkshire_terrier" in pets.BREEDS


def test_every_oddity_is_what_it_claims_and_decodes(made):
    root, summary = made
    kinds = summary["oddities"]
    assert set(kinds.values()) == {"gif", "png_rgb", "png_rgba", "gray", "corrupt_jpeg"}
    assert kinds["images/Abyssinian_34.jpg"] == "gif"
    for rel, kind in kinds.items():
        path = root / rel
        data = path.read_bytes()
        with Image.open(path) as img:
            fmt, mode = img.format, img.mode
        if kind == "gif":
            assert data[:6] in (b"GIF87a", b"GIF89a") and fmt == "GIF"
        elif kind.startswith("png"):
            assert data[:8] == b"\x89PNG\r\n\x1a\n"
            assert mode == ("RGBA" if kind == "png_rgba" else "RGB")
        elif kind == "gray":
            assert data[:2] == b"\xff\xd8" and mode == "L"
        else:  # bytes that are not a marker between the last scan and EOI
            assert data[:2] == b"\xff\xd8" and data[-2:] == b"\xff\xd9" and data[-3] != 0xFF
            assert data[-7:-2] == b"\x13\x37\x00\x42\x07"
        image = pets.decode_image(path)
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
        assert (
            image.shape[:2]
            == pets.decode_trimap(
                path.parent.parent / "annotations" / "trimaps" / f"{path.stem}.png"
            ).shape
        )


def test_oddities_in_both_splits(made):
    root, summary = made
    odd = {Path(rel).stem for rel in summary["oddities"]}
    trainval = {r.name for s in ("train", "val") for r in pets.read_split(root, s)}
    test = {r.name for r in pets.read_split(root, "test")}
    assert odd & trainval and odd & test and odd <= trainval | test


def test_junk_is_present_but_never_yielded(made):
    root, summary = made
    mats = list((root / "images").glob("*.mat"))
    apple = list((root / "annotations" / "trimaps").glob("._*.png"))
    assert len(mats) == 3 and len(apple) >= 1
    assert {f"images/{p.name}" for p in mats} | {
        f"annotations/trimaps/{p.name}" for p in apple
    } == set(summary["junk"])
    with pytest.raises(DataError):
        pets.decode_trimap(apple[0])  # AppleDouble metadata, not a PNG
    yielded = [s.name for split in pets.SPLITS for s in pets.iter_split(root, split)]
    assert len(yielded) == NUM_IMAGES
    assert not [n for n in yielded if n.startswith("._") or n.startswith("Abyssinian_10")]


def test_images_and_masks_are_plausible(made):
    root, _ = made
    shapes = []
    for split in pets.SPLITS:
        for s in pets.iter_split(root, split):
            h, w = s.trimap.shape
            assert 200 <= h <= 500 and 200 <= w <= 500
            assert set(np.unique(s.trimap)) == {1, 2, 3}
            pet = pets.trimap_to_mask(s.trimap).mean()
            assert 0.05 < pet < 0.8, s.name
            mask = pets.trimap_to_mask(s.trimap).astype(bool)
            inside, outside = s.image[mask].mean(0), s.image[~mask].mean(0)
            assert np.abs(inside - outside).max() > 5, s.name  # the pet is visible
            assert s.image.std() > 10  # textured, not flat
            shapes.append((h, w))
    assert sum(h != w for h, w in shapes) > len(shapes) // 2


def test_same_seed_same_bytes_other_seed_differs(made, tmp_path):
    root, _ = made
    again = tmp_path / "again"
    make_synthetic(again, num_images=NUM_IMAGES, seed=0)
    assert _tree_hash(again) == _tree_hash(root)
    other = tmp_path / "other"
    make_synthetic(other, num_images=NUM_IMAGES, seed=1)
    assert _tree_hash(other) != _tree_hash(root)
    img0 = (root / "images" / "Abyssinian_34.jpg").read_bytes()
    assert (other / "images" / "Abyssinian_34.jpg").read_bytes() != img0


def test_refuses_to_mix_sets_unless_overwrite(made, tmp_path):
    root, _ = made
    target = tmp_path / "pets"
    make_synthetic(target, num_images=5, seed=0)
    with pytest.raises(UserError, match="already holds"):
        make_synthetic(target, num_images=5, seed=0)
    summary = make_synthetic(target, num_images=NUM_IMAGES, seed=0, overwrite=True)
    assert summary["counts"]["test"] == 10 and _tree_hash(target) == _tree_hash(root)
    with pytest.raises(UserError, match="at least 5"):
        make_synthetic(tmp_path / "tiny", num_images=4)


def test_smallest_set_still_plants_every_kind(tmp_path):
    summary = make_synthetic(tmp_path, num_images=5, seed=2)
    assert len(set(summary["oddities"].values())) == 5
    assert summary["counts"]["train"] >= 1 and summary["counts"]["test"] >= 1
