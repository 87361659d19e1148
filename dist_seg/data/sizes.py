"""Image sizes and the aspect-ratio policy: how an image of any shape becomes H x W.

A size is written as a side (``256``: 256 x 256) or ``HxW``, height first (``192x320``:
192 rows, 320 columns); in Python it is ``(height, width)``, and ``(0, 0)`` means "as
stored" (a pack made with ``--size 0``). The models downsample 16x, so both sides are
multiples of 16. ``format_size`` writes a size back the way configs, manifests and exported
files hold it: an int when square, else the ``"HxW"`` string.

Aspect policies (``ASPECTS``), named in the manifest and in the run's config:

* ``stretch`` (the seed's): resize to H x W, whatever the image's own aspect ratio.
* ``pad`` (letterbox): resize keeping the aspect ratio so that the image fits H x W, then
  centre it; the image is padded with 0 (black), the mask with IGNORE (255), so padding is
  neither foreground nor background in the loss and the metrics. ``letterbox`` gives the
  box the image occupies; ``unfit_logits`` crops predictions to it before resizing them
  back to the image's own size.

Images resize bilinear, masks nearest (no in-between values), as everywhere in dist_seg.
"""

from __future__ import annotations

import re

import numpy as np
from PIL import Image

from dist_seg.errors import UserError

ASPECTS = ("stretch", "pad")
IGNORE = 255
MULTIPLE = 16
_HXW = re.compile(r"^\s*(\d+)\s*[xX]\s*(\d+)\s*$")
EXAMPLE = "a side or HxW, height first, like 256 or 192x320"


def parse_size(value, what: str, *, zero: str | None = "the pack's own size") -> tuple[int, int]:
    """``256``, ``"256"``, ``"192x320"`` or ``(192, 320)`` -> (height, width); 0 -> (0, 0)
    where ``zero`` says what 0 means (None: 0 is not allowed). UserError naming ``what`` (a
    flag or config key) if it is not a size or a side is not a positive multiple of 16."""
    hw = _split(value)
    if hw is None:
        raise UserError(f"{what} {value!r}: not a size; give {EXAMPLE}")
    if hw == (0, 0) and zero:
        return hw
    if min(hw) <= 0 or hw[0] % MULTIPLE or hw[1] % MULTIPLE:
        shown = (
            "x".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value).strip()
        )
        zero = f" (or 0: {zero})" if zero else ""
        raise UserError(
            f"{what} {shown} must be a multiple of 16 (the models downsample 16x): {EXAMPLE}{zero}"
        )
    return hw


def _split(value) -> tuple[int, int] | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return (value, value)
    if isinstance(value, (tuple, list)) and len(value) == 2:
        if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return (int(value[0]), int(value[1]))
        return None
    if isinstance(value, str):
        text = value.strip()
        if text.isdigit():
            return (int(text), int(text))
        m = _HXW.match(text)
        if m:
            return (int(m.group(1)), int(m.group(2)))
    return None


def format_size(hw: tuple[int, int]) -> int | str:
    """(h, w) as configs and manifests hold it: the side when square (0: as stored), else "HxW"."""
    h, w = hw
    return h if h == w else f"{h}x{w}"


def check_aspect(aspect: str, what: str = "--aspect") -> str:
    if aspect not in ASPECTS:
        raise UserError(f"{what} {aspect!r}: choose one of {', '.join(ASPECTS)}")
    return aspect


def letterbox(height: int, width: int, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """(top, left, h, w): the box an image of ``height`` x ``width`` occupies once fitted
    into ``size`` keeping its aspect ratio, centred (pad policy). The scale is the largest
    that fits; each side is rounded half up and at least 1 pixel."""
    H, W = size
    scale = min(H / height, W / width)
    h = min(H, max(1, int(height * scale + 0.5)))
    w = min(W, max(1, int(width * scale + 0.5)))
    return (H - h) // 2, (W - w) // 2, h, w


def _resize(array: np.ndarray, hw: tuple[int, int], resample) -> np.ndarray:
    if array.shape[:2] == tuple(hw):
        return array
    resized = Image.fromarray(np.ascontiguousarray(array)).resize((hw[1], hw[0]), resample)
    return np.asarray(resized)


def fit_pair(
    image: np.ndarray, mask: np.ndarray | None, size: tuple[int, int], aspect: str = "stretch"
) -> tuple[np.ndarray, np.ndarray | None]:
    """``image`` (HxWx3 uint8) and its ``mask`` (HxW uint8, or None) at ``size`` under the
    ``aspect`` policy: bilinear for the image, nearest for the mask; a pair already that
    size is returned as it is. ``pad`` fills the image's border with 0 and the mask's with
    IGNORE."""
    size = (int(size[0]), int(size[1]))
    if image.shape[:2] == size and (mask is None or mask.shape[:2] == size):
        return image, mask
    if aspect == "stretch":
        image = _resize(image, size, Image.BILINEAR)
        return image, None if mask is None else _resize(mask, size, Image.NEAREST)
    top, left, h, w = letterbox(image.shape[0], image.shape[1], size)
    canvas = np.zeros((*size, *image.shape[2:]), dtype=image.dtype)
    canvas[top : top + h, left : left + w] = _resize(image, (h, w), Image.BILINEAR)
    if mask is None:
        return canvas, None
    padded = np.full(size, IGNORE, dtype=mask.dtype)
    padded[top : top + h, left : left + w] = _resize(mask, (h, w), Image.NEAREST)
    return canvas, padded


def unfit_logits(logits, original: tuple[int, int], aspect: str = "stretch"):
    """Logits [B, C, H, W] of images fitted by ``fit_pair`` back at the images' own size
    ``original`` (h, w), bilinear: for ``pad``, the letterbox is cropped off first."""
    import torch.nn.functional as F

    if aspect == "pad":
        top, left, h, w = letterbox(original[0], original[1], tuple(logits.shape[-2:]))
        logits = logits[..., top : top + h, left : left + w]
    if tuple(logits.shape[-2:]) == tuple(original):
        return logits
    return F.interpolate(logits, size=tuple(original), mode="bilinear", align_corners=False)


def resolve(size, aspect: str, manifest) -> tuple[int | str, str]:
    """The size and aspect policy a run trains at, as its config records them: ``size`` 0
    takes the pack's own; ``aspect`` "auto" takes the pack's. A pack already fitted at a
    size (not ``--size 0`` nor indexed) keeps the policy it was packed with: asking for the
    other is a UserError, and so is reading a letterboxed pack at another size (it would be
    letterboxed twice)."""
    packed = manifest.size
    hw = parse_size(size, "data.size")
    if hw == (0, 0):
        if packed == (0, 0):
            raise UserError(
                f"{manifest.location} keeps original image sizes (packed with --size 0 or "
                "indexed); set data.size to a side or HxW (multiples of 16) to batch them"
            )
        hw = packed
    if aspect == "auto":
        return format_size(hw), manifest.aspect
    check_aspect(aspect, "data.aspect")
    if packed != (0, 0) and aspect != manifest.aspect:
        raise UserError(
            f"data.aspect={aspect}, but {manifest.location} was packed at "
            f"{format_size(packed)} with --aspect {manifest.aspect}: set data.aspect=auto "
            f"(or {manifest.aspect}), or repack with --aspect {aspect}"
        )
    return format_size(hw), aspect


def check_refit(manifest, hw: tuple[int, int]) -> None:
    """UserError if a letterboxed pack would be read at another size than it was packed at."""
    packed = manifest.size
    if manifest.aspect == "pad" and packed != (0, 0) and hw != packed:
        raise UserError(
            f"{manifest.location} was packed letterboxed (--aspect pad) at "
            f"{format_size(packed)}; reading it at {format_size(hw)} would letterbox it "
            f"twice: set data.size=0 (the pack's size) or repack with --size "
            f"{format_size(hw)}"
        )


def trained_aspect(cfg) -> str:
    """The aspect policy a checkpoint's config trained with ("auto" in checkpoints from
    before the policy was recorded: the seed's stretch, the only one there was)."""
    return "stretch" if cfg.data.aspect == "auto" else cfg.data.aspect
