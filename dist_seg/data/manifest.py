"""manifest.json: what a pack holds, and the check that shards are still what it says.

Schema (format_version 2), written by `dist-seg pack` (or `dist-seg index`) after every
shard is whole::

    {
      "format_version": 2,
      "toolkit_version": "0.1.0",         # dist_seg that wrote it
      "created": "2026-11-24T12:00:00Z",
      "source": {"kind": "pets",          # pets | generic | webdataset (shards by others)
                 "root": "/abs/path", "skipped": ["name: reason"], ...},
      "mask_policy": {"kind": "trimap", "values": [], "threshold": 0, "ignore": null},
      "members": {"image": "image.npy", "mask": "mask.npy", "meta": "json",
                  "full_mask": "full.png"},   # null with --size 0; `index`: the user's keys
      "image_size": 256,                  # side of every sample, or "HxW" (height first)
                                          # when not square; 0 = original sizes kept
      "height": 256, "width": 256,        # the same as numbers (0, 0: original sizes)
      "aspect": "stretch",                # how images were (or, size 0, will be) fitted to
                                          # a size: stretch | pad (letterbox, data.sizes)
      "encoding": "raw",                  # "raw" (.npy arrays) or "jpeg" (image.jpg + mask.png)
      "jpeg_quality": 95,                 # only meaningful for "jpeg"
      "splits": {
        "train": {"num_samples": 3312,
                  "shards": [{"name": "train-000000.tar", "num_samples": 256,
                              "sha256": "…", "bytes": 67000000}, …]},
        "val": {…}, "test": {…}
      }
    }

The sample format (members, mask values) is dist_seg.data.codec's docstring. A pack's masks
are already 0/1/255 (the mask policy records how they were made); for Pets the 255s are
the trimap's border, resolved by data.border at train time. Shards indexed by `dist-seg
index` keep their own members, and their mask policy is applied as they are read.
format_version 1 packs (Pets: ``image.u8`` + ``trimap.u8``, or ``image.jpg`` +
``trimap.png``) are still read. Shard names are relative to the manifest's location.
"""

from __future__ import annotations

import hashlib
import json
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from dist_seg import __version__
from dist_seg.data.codec import PACKED, V1, Members, Reader
from dist_seg.data.masks import MaskPolicy
from dist_seg.data.sizes import check_aspect, check_refit, format_size, parse_size
from dist_seg.errors import DataError, UserError

FORMAT_VERSION = 2
SOURCE_KINDS = ("pets", "generic", "webdataset")
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class Shard:
    url: str  # local path or any URL webdataset opens
    num_samples: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    location: str
    size: tuple[int, int]  # (height, width) of every sample; (0, 0): as stored
    encoding: str
    splits: dict[str, list[Shard]]
    raw: dict
    kind: str = "pets"  # the source: pets | generic | webdataset
    members: Members = PACKED["raw"]
    mask_policy: MaskPolicy = MaskPolicy("trimap")
    version: int = FORMAT_VERSION
    aspect: str = "stretch"  # data.sizes.ASPECTS: how samples are fitted to a size

    @property
    def image_size(self) -> int | str:
        """The size as the manifest writes it: the side (0: as stored) or "HxW"."""
        return format_size(self.size)

    def reader(
        self, border: str = "foreground", size=0, full: bool = False, aspect: str | None = None
    ) -> Reader:
        """The sample decoder for this pack: fitted to ``size`` (a side, "HxW" or (h, w);
        0: as packed) under this pack's aspect policy (or ``aspect``, where the pack kept
        original sizes), with the Pets ``border`` policy where the masks' 255 is the trimap
        border; ``full``: also the mask at the original size (Reader)."""
        hw = parse_size(size, "data.size")
        if hw == (0, 0):
            hw = self.size
        check_refit(self, hw)
        return Reader(
            self.members,
            size=hw if hw != (0, 0) else None,
            border=border if self.kind == "pets" else None,
            policy=self.mask_policy if self.kind == "webdataset" else None,
            trimap=self.version == 1,
            full=full,
            aspect=self.fit_aspect(aspect),
        )

    def fit_aspect(self, aspect: str | None = None) -> str:
        """The policy samples are fitted with when read: a pack fitted already keeps its
        own (sizes.resolve refuses another); shards fitted only when read (``--size 0``,
        ``index``) take ``aspect`` where one is given (not None nor "auto")."""
        if aspect in (None, "auto") or self.size != (0, 0):
            return self.aspect
        return check_aspect(aspect, "data.aspect")

    def num_samples(self, split: str) -> int:
        return sum(s.num_samples for s in self.shards(split))

    def shards(self, split: str) -> list[Shard]:
        if split not in self.splits:
            raise DataError(
                f"{self.location}/{MANIFEST} has no split {split!r} "
                f"(it has {sorted(self.splits)}); repack with `dist-seg pack`"
            )
        return self.splits[split]


def is_url(location: str) -> bool:
    return "://" in location or location.startswith("pipe:")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def load_manifest(location: str | Path) -> Manifest:
    """Read ``<location>/manifest.json``; location is a directory or an http(s) URL of one."""
    location = str(location).rstrip("/")
    where = f"{location}/{MANIFEST}"
    try:
        if is_url(location):
            with urllib.request.urlopen(where, timeout=60) as r:
                raw = json.loads(r.read())
        else:
            raw = json.loads(Path(where).read_text())
    except FileNotFoundError:
        raise DataError(
            f"no {MANIFEST} in {location}: pack the data set first with "
            f"`dist-seg pack --root DATA --out {location}`"
        ) from None
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read {where}: {e}; repack with `dist-seg pack`") from None
    version = raw.get("format_version") if isinstance(raw, dict) else None
    if not isinstance(version, int):
        raise DataError(f"{where} is not a dist_seg manifest (no format_version); repack it")
    if version > FORMAT_VERSION:
        raise DataError(
            f"{where} has format_version {version}, newer than this dist_seg "
            f"({__version__}, reads {FORMAT_VERSION}); upgrade dist_seg or repack"
        )
    try:
        splits = {
            split: [
                Shard(f"{location}/{s['name']}", int(s["num_samples"]), s["sha256"])
                for s in info["shards"]
            ]
            for split, info in raw["splits"].items()
        }
        if version == 1:  # Pets only, image + trimap members
            extra = {"members": V1[raw["encoding"]], "version": 1}
        else:
            kind = raw["source"]["kind"]
            if kind not in SOURCE_KINDS:
                raise ValueError(f"source kind {kind!r}")
            m = raw["members"]
            extra = {
                "kind": kind,
                "members": Members(m["image"], m["mask"], m.get("meta"), m.get("full_mask")),
                "mask_policy": MaskPolicy.from_dict(raw["mask_policy"]),
            }
        if "height" in raw:  # written since non-square sizes: image_size may be "HxW"
            size = (int(raw["height"]), int(raw["width"]))
            extra["aspect"] = check_aspect(raw.get("aspect", "stretch"), "aspect")
        else:
            side = int(raw["image_size"])
            size = (side, side)
        return Manifest(location, size, raw["encoding"], splits, raw, **extra)
    except (KeyError, TypeError, ValueError, UserError) as e:
        raise DataError(f"{where} is malformed ({e!r} missing or wrong); repack it") from None


def verify_shards(shards: list[Shard]) -> None:
    """Check local shards' sha256 against the manifest (remote ones are count-checked as read).

    A shard cut at a tar header boundary yields fewer samples with no error at all
    (DESIGN.md section 2), so the hash is the only reliable check before training on it.
    """
    for shard in shards:
        if is_url(shard.url):
            continue
        path = Path(shard.url)
        if not path.exists():
            raise DataError(f"shard {path} listed in the manifest is missing; repack the data set")
        if sha256_file(path) != shard.sha256:
            raise DataError(
                f"shard {path} does not match its manifest sha256 (truncated or altered); "
                "repack with `dist-seg pack`"
            )


def check_shards(
    manifest: Manifest, splits, rank: int = 0, world_size: int = 1
) -> DataError | None:
    """verify_shards over this rank's share (every world_size-th shard) of ``splits``;
    returns the error instead of raising, for runtime.raise_on_any_rank."""
    try:
        for split in splits:
            verify_shards(manifest.shards(split)[rank::world_size])
    except DataError as e:
        return e
    return None
