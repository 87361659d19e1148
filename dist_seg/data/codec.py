"""The sample format every source packs to and the loader reads (manifest format_version 2).

One sample, key = the image file's stem (for Pets, the name), members::

    <key>.image.npy   HxWx3 uint8 (encoding "raw")   or  <key>.image.jpg  (encoding "jpeg")
    <key>.mask.npy    HxW uint8   (encoding "raw")   or  <key>.mask.png   (encoding "jpeg")
    <key>.full.png    the mask at the image's original size, lossless (for evaluate
                      --original-size); omitted when the pack keeps original sizes
    <key>.json        {"name", "source", "height", "width", "orig_height", "orig_width", ...}
                      (--aspect pad also "letterbox": [top, left, height, width], the box
                      the image occupies; its outside is 0 in the image, IGNORE in the mask)

Mask values: 0 background, 1 foreground, 255 (IGNORE) not scored. For Pets, 255 marks the
trimap's border, so the trimap stays lossless (1 pet -> 1, 2 background -> 0, 3 border ->
255) and the border policy is still chosen at train time (``apply_border``).

Every member is read by a plain ``wds.WebDataset(urls).decode("rgb8")`` without this
project's code: ``.npy`` by numpy (no pickle), ``.png``/``.jpg`` as images, ``.json``.

Shards written by others (``dist-seg index``) keep their own member names: ``Members``
maps them, and their masks go through the manifest's mask policy when read.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from dist_seg.data.sizes import fit_pair
from dist_seg.errors import DataError

IGNORE = 255
JPEG_QUALITY = 95
JPEG_SUBSAMPLING = 0  # 4:4:4; mean error 1.4/255 vs 1.9/255 for 4:2:0 at 256 px (synthetic set)
ENCODINGS = ("raw", "jpeg")
FULL_MASK = "full.png"


@dataclass(frozen=True)
class Members:
    """Which members of a sample hold the image, the mask and the metadata (None: absent)."""

    image: str
    mask: str
    meta: str | None = "json"
    full_mask: str | None = None


PACKED = {
    "raw": Members("image.npy", "mask.npy", "json", FULL_MASK),
    "jpeg": Members("image.jpg", "mask.png", "json", FULL_MASK),
}
V1 = {  # format_version 1 (Pets only): image + trimap, no full-size mask
    "raw": Members("image.u8", "trimap.u8"),
    "jpeg": Members("image.jpg", "trimap.png"),
}


# --- .npy, zero-copy -----------------------------------------------------------------------
_NPY_HEADERS: dict[bytes, tuple[np.dtype, tuple[int, ...]]] = {}


def npy_bytes(array: np.ndarray) -> bytes:
    """``array`` as a .npy file (numpy's own writer, no pickle)."""
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def npy_view(data) -> np.ndarray:
    """A read-only array viewing ``data`` (bytes or memoryview of a .npy file), no copy.

    np.load copies the data and parses the header each time; every sample of a pack has
    the same header, so it is parsed once (numpy.lib.format, no pickle) and looked up."""
    view = memoryview(data)
    if len(view) < 12:
        raise ValueError("not a .npy member (too short)")
    small = view[6] == 1
    start = (10 if small else 12) + int.from_bytes(view[8:10] if small else view[8:12], "little")
    header = bytes(view[:start])
    parsed = _NPY_HEADERS.get(header)
    if parsed is None:  # first of its shape: check and parse it (numpy's parser, no pickle)
        if header[:6] != b"\x93NUMPY":
            raise ValueError("not a .npy member")
        fp = io.BytesIO(header)
        read = {(1, 0): np.lib.format.read_array_header_1_0}.get(
            np.lib.format.read_magic(fp), np.lib.format.read_array_header_2_0
        )
        shape, fortran, dtype = read(fp)
        if dtype.hasobject or fortran:
            raise ValueError(f"unsupported .npy member (dtype {dtype}, fortran {fortran})")
        parsed = _NPY_HEADERS[header] = (dtype, tuple(shape), math.prod(shape))
    dtype, shape, count = parsed
    return np.frombuffer(view, dtype, count=count, offset=start).reshape(shape)


# --- images --------------------------------------------------------------------------------
def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def jpeg_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(
        buf, format="JPEG", quality=JPEG_QUALITY, subsampling=JPEG_SUBSAMPLING
    )
    return buf.getvalue()


def decode_rgb(data) -> np.ndarray:
    image = Image.open(io.BytesIO(data))
    if image.mode != "RGB":  # packed as RGB: convert() would be one more copy (-20%)
        image = image.convert("RGB")
    return np.asarray(image)


def decode_gray(data) -> np.ndarray:
    """A single-channel image (L, P, I;16 ...) as its stored values; RGB is an error upstream."""
    return np.asarray(Image.open(io.BytesIO(data)))


def decode_member(data, ext: str, *, gray: bool) -> np.ndarray:
    """A member by its extension: npy zero-copy, anything else through PIL."""
    if ext.endswith("npy"):
        return npy_view(data)
    return decode_gray(data) if gray else decode_rgb(data)


# --- one sample ----------------------------------------------------------------------------
def encode(
    key: str,
    image: np.ndarray,
    mask: np.ndarray,
    meta: dict,
    encoding: str,
    full_mask: np.ndarray | None = None,
) -> dict:
    """One sample as WebDataset members (bytes only: nothing is pickled). ``mask`` holds
    0/1/IGNORE; ``full_mask`` is the same mask at the original size (None: not kept)."""
    members = PACKED[encoding]
    sample = {"__key__": key, "json": json.dumps(meta).encode()}
    if encoding == "raw":
        sample[members.image] = npy_bytes(image.astype(np.uint8, copy=False))
        sample[members.mask] = npy_bytes(mask.astype(np.uint8, copy=False))
    else:
        sample[members.image] = jpeg_bytes(image)
        sample[members.mask] = png_bytes(mask)
    if full_mask is not None:
        sample[FULL_MASK] = png_bytes(full_mask)
    return sample


def apply_border(mask: np.ndarray, border: str) -> np.ndarray:
    """The Pets border policy on a packed 0/1/255 mask whose 255 is the trimap's border:
    ``foreground`` 255 -> 1 (the seed's), ``background`` 255 -> 0, ``ignore`` kept.
    Bit arithmetic, ~2 us per 256 px mask (np.minimum(mask, 1) takes 32 us, a lookup
    table with np.take ~50 us)."""
    if border == "foreground":
        return mask & 1  # 0 -> 0, 1 -> 1, 255 -> 1
    if border == "background":
        return (mask == 1).view(np.uint8)
    return mask


def decode(
    sample: dict, members: Members, with_meta: bool = True
) -> tuple[str, np.ndarray, np.ndarray, dict]:
    """(key, image HxWx3 uint8, mask HxW as stored, meta) of one sample; no pickle.
    The caller maps the mask to 0/1/IGNORE (its source's policy) and resizes. The json
    is parsed only ``with_meta`` (2 us of the raw path's ~10) or for format_version 1."""
    v1 = members.image == "image.u8"
    meta = json.loads(sample[members.meta]) if members.meta and (with_meta or v1) else {}
    if v1:  # format_version 1: raw bytes, shape from the json
        h, w = meta["height"], meta["width"]
        image = np.frombuffer(sample["image.u8"], np.uint8).reshape(h, w, 3)
        mask = np.frombuffer(sample[members.mask], np.uint8).reshape(h, w)
        return sample["__key__"], image, mask, meta
    image = decode_member(sample[members.image], members.image, gray=False)
    mask = decode_member(sample[members.mask], members.mask, gray=True)
    return sample["__key__"], image, mask, meta


def is_complete(sample: dict, members: Members) -> bool:
    """Every mapped member is there (a shard cut inside a sample leaves only its first ones)."""
    return (
        members.image in sample
        and members.mask in sample
        and (members.meta is None or members.meta in sample)
        and (members.full_mask is None or members.full_mask in sample)
    )


def is_packed_sample(sample: dict) -> bool:
    """A whole sample of any member set dist_seg writes (this format or version 1)."""
    return any(is_complete(sample, m) for m in (*PACKED.values(), *V1.values()))


def resize_pair(
    image: np.ndarray, mask: np.ndarray, size: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Resize to ``size`` (height, width): bilinear for the image, nearest for the mask (no
    in-between values); a pair already that size is returned as it is."""
    h, w = size
    if image.shape[:2] == (h, w) and mask.shape[:2] == (h, w):
        return image, mask
    img = Image.fromarray(np.ascontiguousarray(image)).resize((w, h), Image.BILINEAR)
    msk = Image.fromarray(np.ascontiguousarray(mask)).resize((w, h), Image.NEAREST)
    return np.asarray(img), np.asarray(msk)


@dataclass(frozen=True)
class Reader:
    """One stored sample -> (key, image HxWx3 uint8, mask HxW uint8 0/1/255) at ``size``.

    ``border``: the Pets border policy (packs whose 255 is the trimap border), else None.
    ``policy``: a MaskPolicy applied on read (shards written by others), else None.
    ``trimap``: the mask member is a Pets trimap (format_version 1 packs).
    ``full``: also return the mask at the image's original size (evaluate --original-size):
    the ``full.png`` member, or the stored mask itself where the pack kept original sizes
    (or the shards are someone else's).
    ``aspect``: how a sample of another size is fitted to ``size`` (sizes.ASPECTS)."""

    members: Members
    size: tuple[int, int] | None = None  # (height, width); None: as stored
    border: str | None = None
    policy: object | None = None
    trimap: bool = False
    full: bool = False
    aspect: str = "stretch"

    def __call__(self, sample: dict) -> tuple:
        key, image, mask, _ = decode(sample, self.members, with_meta=False)
        mask, full = self.labels(sample, key, mask, image.shape[:2])
        if self.size is not None and image.shape[:2] != self.size:
            image, mask = fit_pair(image, mask, self.size, self.aspect)
        if self.border is not None:
            mask = apply_border(mask, self.border)
        if self.full:
            return key, image, mask, full
        return key, image, mask

    def labels(self, sample: dict, key: str, mask: np.ndarray, image_hw: tuple) -> tuple:
        """(the stored mask as 0/1/255 labels at the image's size ``image_hw``, the
        original-size mask or None): the mask steps every reader shares (the batch decode
        of data.decode=gpu too, which never decodes the image here)."""
        if self.trimap:
            from dist_seg.data.masks import trimap_to_mask

            mask = trimap_to_mask(mask)
        if self.policy is not None:
            where = (
                f"shard {sample.get('__url__', '?')} sample {key!r} member {self.members.mask!r}"
            )
            mask = self.policy.apply(mask, where)
            if mask.shape != tuple(image_hw):
                raise DataError(
                    f"{where}: mask is {mask.shape[1]}x{mask.shape[0]} but its image is "
                    f"{image_hw[1]}x{image_hw[0]}"
                )
        return mask, self._full_mask(sample, key, mask) if self.full else None

    def _full_mask(self, sample: dict, key: str, mask: np.ndarray) -> np.ndarray:
        if self.members.full_mask and self.members.full_mask in sample:
            full = decode_gray(sample[self.members.full_mask])
        elif self.trimap or (self.members.full_mask and self.size is not None):
            raise DataError(
                f"shard {sample.get('__url__', '?')} sample {key!r} has no original-size mask "
                "(packed by an older dist_seg): repack it with `dist-seg pack` to evaluate "
                "at the original size"
            )
        else:  # kept at its original size, or resized only when read
            full = mask
        return full if self.border is None else apply_border(full, self.border)

    def complete(self, sample: dict) -> bool:
        return is_complete(sample, self.members)

    def check_members(self, sample: dict) -> None:
        """DataError when an incomplete sample holds members the mapping does not name:
        the mapping is wrong (a cut shard leaves only a subset of the mapped members)."""
        found = sorted(k for k in sample if not k.startswith("__"))
        wanted = [m for m in (self.members.image, self.members.mask, self.members.meta) if m]
        if set(found) - set(wanted) - {self.members.full_mask}:
            raise DataError(
                f"shard {sample.get('__url__', '?')} sample {sample.get('__key__')!r} has "
                f"members {found}, the manifest maps image -> {self.members.image!r}, mask -> "
                f"{self.members.mask!r}"
                + (f", meta -> {self.members.meta!r}" if self.members.meta else "")
                + "; write the manifest again with `dist-seg index --image-key K --mask-key K`"
            )
