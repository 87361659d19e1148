"""Mask policies: how a data set's stored mask values become 0 (background), 1 (foreground)
and 255 (ignored, not scored).

Named and stored in the manifest (``mask_policy``), so a pack says how it was made:

* ``nonzero`` (default): 0 is background, any other value foreground. A mask holding more
  than one distinct non-zero value (besides ``ignore``) is an error: that is a lossy mask
  (use ``threshold``) or a label map (use ``values``), and guessing would train on halos.
* ``values``: the listed values are foreground, 0 background; any other value is an error.
* ``threshold``: values >= the threshold are foreground (masks stored lossy, e.g. Kvasir-SEG's
  JPEG masks, smeared around 0 and 255: threshold 128).
* ``ignore`` (optional, any kind): pixels of this value become 255, not scored.
* ``trimap`` (Oxford-IIIT Pet only): 1 pet, 2 background, 3 border; the border is kept as 255
  in the pack and the border policy (data.border) chosen at train time.

Masks may be 1-bit, 8-bit grey, palette (the palette *index* is the value: Carvana's GIFs
hold 0/1), 16-bit, or RGB(A) whose channels are equal (a grey mask saved as colour, or a
JPEG mask: its channels are averaged for ``threshold``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from dist_seg.errors import DataError, UserError

IGNORE = 255
KINDS = ("nonzero", "values", "threshold", "trimap")


@dataclass(frozen=True)
class MaskPolicy:
    kind: str = "nonzero"
    values: tuple[int, ...] = field(default=())  # "values": the foreground values
    threshold: float = 0.0  # "threshold": values >= it are foreground
    ignore: int | None = None  # a stored value that means "not scored"

    def __post_init__(self):
        if self.kind not in KINDS:
            raise UserError(f"mask policy {self.kind!r}: choose one of {', '.join(KINDS)}")
        if self.kind == "values" and not self.values:
            raise UserError("mask policy 'values' needs the foreground values (--foreground 255)")
        if self.kind == "threshold" and self.threshold <= 0:
            raise UserError(f"mask threshold {self.threshold}: must be > 0")
        if self.ignore is not None and (self.ignore == 0 or self.ignore in self.values):
            raise UserError(f"ignore value {self.ignore} is also background or foreground")

    def to_dict(self) -> dict:
        return {"kind": self.kind, "values": list(self.values), "threshold": self.threshold,
                "ignore": self.ignore}  # fmt: skip

    @classmethod
    def from_dict(cls, raw: dict) -> MaskPolicy:
        return cls(raw.get("kind", "nonzero"), tuple(int(v) for v in raw.get("values", ())),
                   float(raw.get("threshold", 0)), raw.get("ignore"))  # fmt: skip

    def describe(self) -> str:
        what = {"nonzero": "any non-zero value is foreground",
                "values": f"foreground values {list(self.values)}, 0 background",
                "threshold": f"values >= {self.threshold:g} are foreground",
                "trimap": "Pets trimap (1 pet, 2 background, 3 border)"}[self.kind]  # fmt: skip
        return what + (f", {self.ignore} ignored" if self.ignore is not None else "")

    def apply(self, mask: np.ndarray, label: str) -> np.ndarray:
        """HxW (or HxWxC) stored values -> HxW uint8 0/1/255; DataError naming ``label`` and
        the values found when they are not what this policy expects."""
        mask = _single_channel(mask, label, average=self.kind == "threshold")
        ignored = mask == self.ignore if self.ignore is not None else None
        if self.kind == "threshold":
            out = (mask >= self.threshold).view(np.uint8)
        else:
            found = np.unique(mask)
            rest = found[found != 0]
            if self.ignore is not None:
                rest = rest[rest != self.ignore]
            if self.kind == "trimap":
                bad = np.setdiff1d(found, [1, 2, 3])
                if bad.size:
                    raise DataError(f"{label}: trimap values must be 1, 2 or 3, found {_vals(bad)}")
                return trimap_to_mask(mask)
            if self.kind == "nonzero":
                if rest.size > 1:
                    raise DataError(
                        f"{label}: mask values {_vals(found)} hold more than one non-zero value; "
                        "for a lossy (JPEG) mask use --mask-threshold 128, for a label map "
                        "--foreground-values V[,V...]"
                    )
                out = (mask != 0).view(np.uint8)
            else:
                bad = np.setdiff1d(rest, self.values)
                if bad.size:
                    raise DataError(
                        f"{label}: mask values {_vals(found)} include {_vals(bad)}, neither 0 "
                        f"nor the foreground values {list(self.values)}"
                        + ("" if self.ignore is None else f" nor the ignore value {self.ignore}")
                    )
                out = np.isin(mask, self.values).view(np.uint8)
        if ignored is not None:
            out = np.where(ignored, np.uint8(IGNORE), out)
        return out


def trimap_to_mask(trimap: np.ndarray) -> np.ndarray:
    """Pets trimap (1 pet, 2 background, 3 border) -> 0/1/255, losslessly (border 255)."""
    lut = np.full(256, IGNORE, np.uint8)
    lut[1], lut[2] = 1, 0
    return lut[trimap]


def _vals(values: np.ndarray, most: int = 8) -> str:
    v = [int(x) for x in values[:most]]
    return str(v) if values.size <= most else f"{str(v)[:-1]}, ... ({values.size} values)]"


def _single_channel(mask: np.ndarray, label: str, average: bool) -> np.ndarray:
    if mask.ndim == 2:
        return mask
    if mask.ndim == 3:
        channels = mask[..., :3]
        if average:
            return channels.mean(axis=2)
        if (channels == channels[..., :1]).all():
            return channels[..., 0]
        raise DataError(
            f"{label}: a colour mask whose channels differ; save it as a grey or palette "
            "image (or use --mask-threshold for a lossy mask)"
        )
    raise DataError(f"{label}: a mask must be a 2-D image, got shape {mask.shape}")
