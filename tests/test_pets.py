"""The Oxford-IIIT Pet reader: split rule, decoding by content, mask policies, bad files."""

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dist_seg.data import pets
from dist_seg.data.synth import make_synthetic
from dist_seg.errors import DataError, UserError


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """A small synthetic set (24 images). Read-only: copy it before breaking anything."""
    root = tmp_path_factory.mktemp("pets") / "pets"
    make_synthetic(root, num_images=24, seed=3)
    return root


@pytest.fixture
def broken(root, tmp_path) -> Path:
    """A private copy of ``root`` that a test may damage."""
    return Path(shutil.copytree(root, tmp_path / "pets"))


def _bytes(array: np.ndarray, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_val_is_every_tenth_trainval_data_line(tmp_path):
    ann = tmp_path / "annotations"
    ann.mkdir()
    lines = [f"Abyssinian_{i} 1 1 1" for i in range(25)]
    # Comments and blank lines do not count when numbering data lines.
    text = "# header\n\n" + "\n".join(lines[:12]) + "\n# mid\n\n" + "\n".join(lines[12:]) + "\n"
    (ann / "trainval.txt").write_text(text)
    (ann / "test.txt").write_text("beagle_1 5 2 3\nbeagle_2 5 2 3\n")
    val = pets.read_split(tmp_path, "val")
    train = pets.read_split(tmp_path, "train")
    assert [r.name for r in val] == ["Abyssinian_0", "Abyssinian_10", "Abyssinian_20"]
    assert len(train) == 22 and not {r.name for r in train} & {r.name for r in val}
    assert pets.read_split(tmp_path, "test") == [
        pets.Record("beagle_1", 5, 2, 3),
        pets.Record("beagle_2", 5, 2, 3),
    ]


def test_split_sizes_of_synthetic_set(root):
    trainval = (root / "annotations" / "trainval.txt").read_text().split("\n")
    trainval = [line.split()[0] for line in trainval if line]
    train, val, test = (pets.read_split(root, s) for s in pets.SPLITS)
    assert [r.name for r in val] == trainval[::10]
    assert len(train) + len(val) == len(trainval) == 12 and len(test) == 12


@pytest.mark.parametrize(
    "line, what",
    [("Abyssinian_1 1 1", "expected"), ("Abyssinian_1 x 1 1", "integers"), ("a 38 1 1", "range")],
)
def test_malformed_line_names_file_and_line(tmp_path, line, what):
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "test.txt").write_text(f"beagle_1 5 2 3\n{line}\n")
    with pytest.raises(DataError, match=rf"test\.txt:2: .*{what}"):
        pets.read_split(tmp_path, "test")


def test_missing_split_file_and_unknown_split(tmp_path):
    with pytest.raises(DataError, match=r"trainval\.txt does not exist.*dist-seg synth"):
        pets.read_split(tmp_path, "train")
    with pytest.raises(UserError, match="train, val, test"):
        pets.read_split(tmp_path, "dev")


@pytest.mark.parametrize("missing", ["images", "annotations/trimaps", "annotations/test.txt"])
def test_check_root_names_what_is_missing(broken, missing):
    pets.check_root(broken)
    path = broken / missing
    shutil.rmtree(path) if path.is_dir() else path.unlink()
    with pytest.raises(DataError, match=missing.split("/")[-1]):
        pets.check_root(broken)


def test_decode_image_by_content_not_extension(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    rgba = np.dstack([rgb, np.full((20, 30), 255, np.uint8)])
    sources = {
        "gif": _bytes(rgb, "GIF"),
        "png": _bytes(rgb, "PNG"),
        "rgba": _bytes(rgba, "PNG"),
        "gray": _bytes(rgb[..., 0], "JPEG"),
        "jpeg": _bytes(rgb, "JPEG"),
    }
    for kind, data in sources.items():
        path = tmp_path / f"{kind}.jpg"  # every one named .jpg, as in the real set
        path.write_bytes(data)
        for src in (path, data):
            image = pets.decode_image(src)
            assert image.shape == (20, 30, 3) and image.dtype == np.uint8, kind
    assert (pets.decode_image(sources["png"]) == rgb).all()
    assert (pets.decode_image(sources["rgba"]) == rgb).all()


def test_undecodable_image_names_the_file(tmp_path):
    path = tmp_path / "Bengal_1.jpg"
    path.write_bytes(b"\x00\x05\x16\x07 not an image")
    with pytest.raises(DataError, match="Bengal_1.jpg"):
        pets.decode_image(path)
    truncated = _bytes(np.zeros((64, 64, 3), np.uint8) + 100, "JPEG")[:300]
    with pytest.raises(DataError, match="pug_9.jpg"):
        pets.decode_image(truncated, name="pug_9.jpg")


def test_decode_trimap_rejects_other_values(tmp_path):
    good = np.array([[1, 2], [3, 2]], np.uint8)
    assert (pets.decode_trimap(_bytes(good, "PNG")) == good).all()
    path = tmp_path / "pug_1.png"
    path.write_bytes(_bytes(good * 80, "PNG"))
    with pytest.raises(DataError, match=r"pug_1\.png.*1, 2 or 3"):
        pets.decode_trimap(path)


def test_mask_policies():
    trimap = np.array([[1, 2, 3], [3, 2, 1]], np.uint8)
    want = {
        "foreground": [[1, 0, 1], [1, 0, 1]],
        "background": [[1, 0, 0], [0, 0, 1]],
        "ignore": [[1, 0, 255], [255, 0, 1]],
    }
    for border, expected in want.items():
        mask = pets.trimap_to_mask(trimap, border)
        assert mask.dtype == np.uint8 and mask.tolist() == expected, border
    assert pets.trimap_to_mask(trimap).tolist() == want["foreground"]
    with pytest.raises(UserError, match="foreground, background, ignore"):
        pets.trimap_to_mask(trimap, "border")


def test_resize_pair_is_nearest_for_trimaps():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    trimap = rng.choice(np.array([1, 2, 3], np.uint8), (37, 53))
    img, tri = pets.resize_pair(image, trimap, 16)
    assert img.shape == (16, 16, 3) and img.dtype == np.uint8
    assert tri.shape == (16, 16) and set(np.unique(tri)) <= {1, 2, 3}
    # Bilinear on a random trimap would make in-between values; nearest makes none.
    img, tri = pets.resize_pair(image, trimap, 91)
    assert set(np.unique(tri)) == {1, 2, 3} and img.shape == (91, 91, 3)
    same = pets.resize_pair(image, trimap, 0)
    assert same[0] is image and same[1] is trimap


def test_iter_split_never_reads_junk(root):
    names = {p.name for p in (root / "images").iterdir()}
    names |= {p.name for p in (root / "annotations" / "trimaps").iterdir()}
    assert any(n.endswith(".mat") for n in names) and any(n.startswith("._") for n in names)
    seen = []
    for split in pets.SPLITS:
        for s in pets.iter_split(root, split):
            assert s.image.shape[:2] == s.trimap.shape and s.image.shape[2] == 3
            seen.append(s.name)
    assert len(seen) == len(set(seen)) == 24
    assert not [n for n in seen if n.startswith("._") or "." in n]


def test_missing_trimap_raises_naming_it(broken):
    name = pets.read_split(broken, "test")[1].name
    (broken / "annotations" / "trimaps" / f"{name}.png").unlink()
    with pytest.raises(DataError, match=rf"{name}\.png does not exist.*--skip-bad"):
        list(pets.iter_split(broken, "test"))
    skipped = []
    samples = list(pets.iter_split(broken, "test", skip_bad=True, skipped=skipped))
    assert len(samples) == 11 and name not in {s.name for s in samples}
    assert len(skipped) == 1 and skipped[0].startswith(f"{name}: ")


def test_missing_image_and_size_mismatch_and_garbage(broken):
    names = [r.name for r in pets.read_split(broken, "train")]
    (broken / "images" / f"{names[0]}.jpg").unlink()
    trimap = broken / "annotations" / "trimaps" / f"{names[1]}.png"
    Image.fromarray(np.full((10, 12), 2, np.uint8)).save(trimap)
    (broken / "images" / f"{names[2]}.jpg").write_bytes(b"garbage")
    with pytest.raises(DataError, match=rf"{names[0]}\.jpg does not exist"):
        next(pets.iter_split(broken, "train"))
    with pytest.raises(DataError, match=rf"{names[1]}\.png: trimap is 12x10 but its image is"):
        pets.load_sample(broken, names[1])
    with pytest.raises(DataError, match=rf"{names[2]}\.jpg"):
        pets.load_sample(broken, names[2])
    skipped = []
    samples = list(pets.iter_split(broken, "train", skip_bad=True, skipped=skipped))
    assert [s.split(":")[0] for s in skipped] == names[:3]
    assert [s.name for s in samples] == names[3:]
