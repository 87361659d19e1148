"""Reader for the Oxford-IIIT Pet data set in its own layout (real or made by ``synth``).

Layout under ``root``: ``images/<name>.jpg``, ``annotations/trimaps/<name>.png``,
``annotations/trainval.txt`` and ``annotations/test.txt``. Only names listed in a split
file are ever opened, so macOS ``._*`` files and stray ``.mat`` files are never read.
Images are decoded by content, never by extension: the real set has GIF, PNG (RGB and
RGBA) and grayscale files named ``.jpg``, and JPEG streams that decode with a warning.
"""

import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from dist_seg.errors import DataError, UserError

SPLITS = ("train", "val", "test")
BORDER_POLICIES = ("foreground", "background", "ignore")
IGNORE_INDEX = 255

# The 37 breeds in class-id order (1..37): cats are capitalized, dogs lowercase.
BREEDS = (
    "Abyssinian", "american_bulldog", "american_pit_bull_terrier", "basset_hound", "beagle",
    "Bengal", "Birman", "Bombay", "boxer", "British_Shorthair", "chihuahua", "Egyptian_Mau",
    "english_cocker_spaniel", "english_setter", "german_shorthaired", "great_pyrenees",
    "havanese", "japanese_chin", "keeshond", "leonberger", "Maine_Coon", "miniature_pinscher",
    "newfoundland", "Persian", "pomeranian", "pug", "Ragdoll", "Russian_Blue", "saint_bernard",
    "samoyed", "scottish_terrier", "shiba_inu", "Siamese", "Sphynx",
    "staffordshire_bull_terrier", "wheaten_terrier", "yorkshire_terrier",
)  # fmt: skip

_SPLIT_FILES = {"train": "trainval.txt", "val": "trainval.txt", "test": "test.txt"}
_HINT = "run `dist-seg download --root DIR` or `dist-seg synth --root DIR`"
_SKIP_HINT = "fix or remove the file; --skip-bad skips such samples"


@dataclass(frozen=True)
class Record:
    """One line of a split file."""

    name: str
    class_id: int  # 1..37, index into BREEDS plus one
    species: int  # 1 cat, 2 dog
    breed_id: int  # 1-based within the species


@dataclass
class Sample:
    """One decoded image (HxWx3 uint8) with its trimap (HxW uint8, values 1/2/3)."""

    name: str
    image: np.ndarray
    trimap: np.ndarray


def check_root(root: Path) -> None:
    """Raise DataError with one line if ``root`` does not look like the Pet layout."""
    root = Path(root)
    needed = [
        root,
        root / "images",
        root / "annotations" / "trimaps",
        root / "annotations" / "trainval.txt",
        root / "annotations" / "test.txt",
    ]
    for path in needed:
        if not path.exists():
            hint = _HINT
            if (root / "images").is_dir() and (root / "masks").is_dir():
                hint = (
                    f"for a folder of images and masks, pack it with `dist-seg pack --images "
                    f"{root / 'images'} --masks {root / 'masks'} --out SHARDS` and train on "
                    "data.shards=SHARDS (README 'Your own data')"
                )
            raise DataError(f"{path} does not exist: not an Oxford-IIIT Pet root; {hint}")


def _parse_line(line: str, where: str) -> Record:
    parts = line.split()
    if len(parts) != 4:
        raise DataError(f"{where}: expected '<name> <class_id> <species> <breed_id>', got {line!r}")
    name = parts[0]
    try:
        class_id, species, breed_id = (int(p) for p in parts[1:])
    except ValueError:
        raise DataError(
            f"{where}: class, species and breed ids must be integers: {line!r}"
        ) from None
    if not 1 <= class_id <= len(BREEDS) or species not in (1, 2) or breed_id < 1 or "/" in name:
        raise DataError(f"{where}: ids out of range (class 1-37, species 1|2): {line!r}")
    return Record(name, class_id, species, breed_id)


def read_split(root: Path, split: str) -> list[Record]:
    """Records of one split: val is every 10th data line of trainval.txt (index % 10 == 0),
    train the other nine in ten, test all of test.txt."""
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    path = Path(root) / "annotations" / _SPLIT_FILES[split]
    if not path.is_file():
        raise DataError(f"{path} does not exist; {_HINT}")
    records = []
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        line = line.strip()
        if line and not line.startswith("#"):
            records.append(_parse_line(line, f"{path}:{lineno}"))
    if split == "train":
        return [r for i, r in enumerate(records) if i % 10 != 0]
    if split == "val":
        return [r for i, r in enumerate(records) if i % 10 == 0]
    return records


def _open(src: Path | bytes, name: str) -> tuple[Image.Image, str]:
    label = name or (str(src) if isinstance(src, Path | str) else "<bytes>")
    try:
        return Image.open(io.BytesIO(src) if isinstance(src, bytes) else src), label
    except FileNotFoundError:
        raise DataError(f"{label} does not exist") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise DataError(f"{label} is not a readable image ({e})") from None


def decode_image(src: Path | bytes, *, name: str = "") -> np.ndarray:
    """Decode any image PIL reads (JPEG, GIF, PNG, grayscale, RGBA) to HxWx3 uint8.

    ``name`` labels error messages when ``src`` is bytes.
    """
    img, label = _open(src, name)
    try:
        with img:
            return np.asarray(img.convert("RGB"))
    except (OSError, ValueError, SyntaxError) as e:
        raise DataError(f"{label} cannot be decoded ({e})") from None


def decode_trimap(src: Path | bytes, *, name: str = "") -> np.ndarray:
    """Decode a trimap PNG to HxW uint8 and check its values are in {1, 2, 3}."""
    img, label = _open(src, name)
    try:
        with img:
            arr = np.asarray(img if img.mode in ("L", "P") else img.convert("L"))
    except (OSError, ValueError, SyntaxError) as e:
        raise DataError(f"{label} cannot be decoded ({e})") from None
    bad = np.setdiff1d(np.unique(arr), [1, 2, 3])
    if bad.size:
        raise DataError(f"{label}: trimap values must be 1, 2 or 3, found {bad[:5].tolist()}")
    return arr.astype(np.uint8, copy=False)


def trimap_to_mask(trimap: np.ndarray, border: str = "foreground") -> np.ndarray:
    """Binary mask from a trimap: pet 1, background 0, border as the policy says
    (``foreground`` 1, ``background`` 0, ``ignore`` IGNORE_INDEX)."""
    if border not in BORDER_POLICIES:
        raise UserError(
            f"unknown border policy {border!r}; choose one of {', '.join(BORDER_POLICIES)}"
        )
    border_value = {"foreground": 1, "background": 0, "ignore": IGNORE_INDEX}[border]
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    lut[[1, 2, 3]] = [1, 0, border_value]
    return lut[trimap]


def resize_pair(image: np.ndarray, trimap: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Resize to size x size: bilinear for the image, nearest for the trimap; 0 keeps both."""
    if size < 0:
        raise UserError(f"image size must be >= 0 (0 keeps the original), got {size}")
    if size == 0:
        return image, trimap
    img = Image.fromarray(image).resize((size, size), Image.BILINEAR)
    tri = Image.fromarray(trimap).resize((size, size), Image.NEAREST)
    return np.asarray(img), np.asarray(tri)


def load_sample(root: Path, name: str) -> Sample:
    """Decode ``images/<name>.jpg`` and ``annotations/trimaps/<name>.png``.

    DataError (naming the file, with a --skip-bad hint) if either is missing or
    undecodable, or if their sizes differ.
    """
    image_path = Path(root) / "images" / f"{name}.jpg"
    trimap_path = Path(root) / "annotations" / "trimaps" / f"{name}.png"
    try:
        for path in (image_path, trimap_path):
            if not path.is_file():
                raise DataError(f"{path} does not exist")
        image = decode_image(image_path)
        trimap = decode_trimap(trimap_path)
    except DataError as e:
        raise DataError(f"{e}; {_SKIP_HINT}") from None
    if image.shape[:2] != trimap.shape:
        raise DataError(
            f"{trimap_path}: trimap is {trimap.shape[1]}x{trimap.shape[0]} but its image is "
            f"{image.shape[1]}x{image.shape[0]}; {_SKIP_HINT}"
        )
    return Sample(name, image, trimap)


def iter_split(
    root: Path, split: str, skip_bad: bool = False, skipped: list[str] | None = None
) -> Iterator[Sample]:
    """Decoded samples of one split, in split-file order.

    A missing, undecodable or mismatched file raises DataError; with ``skip_bad`` the sample
    is left out and ``"<name>: <reason>"`` appended to ``skipped``.
    """
    root = Path(root)
    check_root(root)
    for record in read_split(root, split):
        try:
            sample = load_sample(root, record.name)
        except DataError as e:
            if not skip_bad:
                raise
            if skipped is not None:
                skipped.append(f"{record.name}: {e}")
            continue
        yield sample
