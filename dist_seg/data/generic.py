"""Reader for the generic layout: a folder of images and a folder of binary masks.

How most segmentation sets come (Carvana, ISIC, Kvasir-SEG, building footprints, nnU-Net's
and MONAI's 2-D folders)::

    IMAGES/<stem>.<jpg|png|tif|...>        MASKS/<match(stem)>.<png|gif|tif|jpg|...>

* Matching: a mask's name without its extension is ``match`` with ``{stem}`` replaced by the
  image's name without its extension: ``{stem}`` (default: same name), ``{stem}_mask``
  (Carvana), ``{stem}_segmentation`` (ISIC). Extensions never need to agree.
* Splits, first that applies: ``train/ val/ test/`` sub-folders under both roots (any of
  them); list files (``--split-list train=FILE``: one name per line, the image's stem or
  file name; ``#`` comments); else a hash split of the stem with ``--split-fractions``
  (default 0.8,0.1,0.1): sha256(stem) decides, so adding images never moves old ones.
* Images are decoded by content (JPEG, PNG, GIF, TIFF, grey, RGBA), as for Pets; masks by
  ``masks.MaskPolicy`` (palette indices, 1/8/16-bit, or RGB with equal channels).
* An image without a mask, a mask without an image, a mask of another size than its image,
  an unreadable file or mask values the policy does not expect: one DataError naming the
  file, or (``skip_bad``) skipped and counted in the manifest.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from dist_seg.data.masks import MaskPolicy
from dist_seg.data.pets import decode_image
from dist_seg.errors import DataError, UserError

SPLITS = ("train", "val", "test")
EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".tif", ".tiff", ".bmp", ".webp")
DEFAULT_FRACTIONS = (0.8, 0.1, 0.1)
_SKIP_HINT = "fix or remove the file; --skip-bad skips such samples"


@dataclass(frozen=True)
class Pair:
    """One image and its mask (None: no mask found, an error unless skipped)."""

    name: str  # the image's stem: the sample's key
    image: Path
    mask: Path | None


def _files(folder: Path) -> dict[str, Path]:
    """stem -> path of the image files directly in ``folder`` (hidden files ignored)."""
    out: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix.lower() in EXTENSIONS and not path.name.startswith("."):
            if path.stem in out:
                raise DataError(
                    f"{path} and {out[path.stem]} have the same name: rename one "
                    "(a sample's key is its file name without the extension)"
                )
            out[path.stem] = path
    return out


def check_match(match: str) -> None:
    if "{stem}" not in match or match.replace("{stem}", "").count("{"):
        raise UserError(f"--match {match!r}: a name pattern holding {{stem}}, like '{{stem}}_mask'")


def _pairs(images: Path, masks: Path, match: str) -> tuple[list[Pair], list[Path]]:
    """(pairs, masks without an image) of one folder pair."""
    for folder, flag in ((images, "--images"), (masks, "--masks")):
        if not folder.is_dir():
            raise DataError(f"{flag} {folder} is not a directory")
    image_files, mask_files = _files(images), _files(masks)
    pairs = [Pair(stem, path, mask_files.get(match.format(stem=stem))) for stem, path in image_files.items()]  # fmt: skip
    used = {match.format(stem=stem) for stem in image_files}
    orphans = [path for stem, path in mask_files.items() if stem not in used]
    return pairs, orphans


def hash_split(stem: str, fractions: tuple[float, float, float]) -> str:
    """The split of ``stem`` from sha256(stem) alone: stable as images are added or removed."""
    u = int.from_bytes(hashlib.sha256(stem.encode()).digest()[:8], "big") / 2**64
    edge = 0.0
    for split, fraction in zip(SPLITS, fractions):
        edge += fraction
        if u < edge:
            return split
    return SPLITS[-1]


def parse_fractions(text: str | None) -> tuple[float, float, float]:
    if not text:
        return DEFAULT_FRACTIONS
    try:
        parts = tuple(float(p) for p in text.split(","))
    except ValueError:
        parts = ()
    if len(parts) != 3 or min(parts) < 0 or abs(sum(parts) - 1) > 1e-6 or parts[0] == 0:
        raise UserError(
            f"--split-fractions {text!r}: three fractions train,val,test summing to 1, like 0.8,0.1,0.1"
        )
    return parts  # type: ignore[return-value]


def _read_list(path: Path) -> list[str]:
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise DataError(f"split list {path}: {e.strerror}") from None
    return [
        Path(line.split()[0]).stem for line in lines if line.strip() and not line.startswith("#")
    ]


def scan(
    images: Path,
    masks: Path,
    *,
    match: str = "{stem}",
    split_lists: dict[str, Path] | None = None,
    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS,
    skip_bad: bool = False,
) -> tuple[dict[str, list[Pair]], list[str], str]:
    """(split -> pairs in name order, skipped "name: reason" lines, how the split was made).

    Missing counterparts raise DataError naming the file, or with ``skip_bad`` are listed
    in skipped."""
    check_match(match)
    images, masks = Path(images), Path(masks)
    folders = [s for s in SPLITS if (images / s).is_dir()]
    skipped: list[str] = []
    problems: list[str] = []
    if folders:
        how = "folders"
        splits = {}
        for split in folders:
            pairs, orphans = _pairs(images / split, masks / split, match)
            splits[split] = pairs
            problems += [f"{p}: a mask with no image {images / split}/{_stem_hint(p, match)}.*" for p in orphans]  # fmt: skip
    else:
        pairs, orphans = _pairs(images, masks, match)
        problems += [
            f"{p}: a mask with no image {images}/{_stem_hint(p, match)}.*" for p in orphans
        ]
        if split_lists:
            how = "lists"
            by_name = {p.name: p for p in pairs}
            splits, seen = {}, {}
            for split, path in split_lists.items():
                if split not in SPLITS:
                    raise UserError(f"--split-list {split}=...: the splits are {', '.join(SPLITS)}")
                splits[split] = []
                for name in _read_list(path):
                    if name in seen:
                        raise DataError(f"split list {path}: {name} is also in {seen[name]}")
                    seen[name] = path
                    if name not in by_name:
                        problems.append(f"{path}: lists {name}, which has no image in {images}")
                    else:
                        splits[split].append(by_name[name])
        else:
            how = f"hash of the name, fractions {list(fractions)}"
            splits = {s: [] for s in SPLITS}
            for pair in pairs:
                splits[hash_split(pair.name, fractions)].append(pair)
    for split, pairs in splits.items():
        kept = []
        for pair in pairs:
            if pair.mask is None:
                problems.append(
                    f"{pair.image}: no mask {masks}/{match.format(stem=pair.name)}.* for this image"
                )
            else:
                kept.append(pair)
        splits[split] = kept
    if problems:
        if not skip_bad:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise DataError(f"{problems[0]}{more}; {_SKIP_HINT}")
        skipped += problems
    if not any(splits.values()):
        raise DataError(f"no image with a mask in {images} (masks {masks}, --match {match!r})")
    return splits, skipped, how


def _stem_hint(mask: Path, match: str) -> str:
    prefix, _, suffix = match.partition("{stem}")
    stem = mask.stem
    if stem.startswith(prefix) and stem.endswith(suffix):
        return stem[len(prefix) : len(stem) - len(suffix)]
    return f"<name matching {match!r}>"


def decode_mask(path: Path) -> np.ndarray:
    """A mask file's stored values: palette indices for P (Carvana GIF), 0/1 for 1-bit,
    grey values, 16-bit values, or HxWxC for colour."""
    try:
        with Image.open(path) as img:
            if img.mode == "1":
                return np.asarray(img, dtype=np.uint8)
            if img.mode == "LA":
                img = img.getchannel("L")
            elif img.mode == "PA":
                img = img.getchannel("P") if "P" in img.getbands() else img.convert("P")
            return np.asarray(img)
    except FileNotFoundError:
        raise DataError(f"{path} does not exist") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise DataError(f"{path} is not a readable image ({e})") from None


@dataclass(frozen=True)
class GenericSource:
    """Loads one Pair as (key, image HxWx3 uint8, mask HxW 0/1/255 at the original size,
    metadata); picklable, for the packer's worker processes."""

    policy: MaskPolicy

    def load(self, pair: Pair) -> tuple[str, np.ndarray, np.ndarray, dict]:
        try:
            image = decode_image(pair.image)
            mask = self.policy.apply(decode_mask(pair.mask), str(pair.mask))
        except DataError as e:
            raise DataError(f"{e}; {_SKIP_HINT}") from None
        if image.shape[:2] != mask.shape:
            raise DataError(
                f"{pair.mask}: mask is {mask.shape[1]}x{mask.shape[0]} but its image "
                f"{pair.image.name} is {image.shape[1]}x{image.shape[0]}; {_SKIP_HINT}"
            )
        meta = {"name": pair.name, "source": "generic", "image_file": pair.image.name,
                "mask_file": pair.mask.name}  # fmt: skip
        return pair.name, image, mask, meta
