"""`dist-seg index`: a manifest for WebDataset shards written by others, so the toolkit
trains and evaluates on them without repacking.

The shards stay as they are (flat ``*.tar`` files in one directory); the manifest written
beside them records every shard's sample count and sha256, the member mapping (which
member is the image, which the mask, e.g. ``jpg`` and ``png``) and the mask policy, which
is applied as samples are read. Images of any size are fitted at load time to
``data.size`` as the packer would (bilinear image, nearest mask), under the ``aspect``
policy recorded here (stretch, or pad: letterbox; data.sizes).

Every sample is checked here: one whose members do not match the mapping is one DataError
naming the shard, the key and the members found.
"""

from __future__ import annotations

import json
import os
import re
import tarfile
from datetime import datetime, timezone
from pathlib import Path

from dist_seg import __version__
from dist_seg.data.manifest import FORMAT_VERSION, MANIFEST, sha256_file
from dist_seg.data.masks import MaskPolicy
from dist_seg.data.sizes import check_aspect
from dist_seg.data.tarread import _split
from dist_seg.errors import DataError, UserError

SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
_PREFIX = re.compile(r"^([A-Za-z]+)[-_.]")


def _shard_split(name: str, by_prefix: bool, default: str) -> str:
    if not by_prefix:
        return default
    m = _PREFIX.match(name)
    if not m:
        raise DataError(
            f"shard {name}: --split-by-prefix needs names like train-000000.tar "
            "(the split, then - or _); rename it or index each split's folder with --split"
        )
    return m.group(1)


def _samples(path: Path, image: str, mask: str, meta: str | None) -> int:
    """Samples in ``path``, each checked to hold the mapped members (DataError if not)."""
    wanted = [m for m in (image, mask, meta) if m]
    count, key, found = 0, None, set()

    def check():
        if key is not None and not set(wanted) <= found:
            raise DataError(
                f"shard {path} sample {key!r} has members {sorted(found)}, not the mapped "
                f"{wanted}; choose --image-key/--mask-key among its members"
            )

    try:
        with tarfile.open(path, "r:*") as tf:
            for member in tf:
                if not member.isfile():
                    continue
                k, ext = _split(member.name)
                if k != key:
                    check()
                    count += key is not None
                    key, found = k, set()
                found.add(ext)
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"shard {path} is not a readable tar archive ({e})") from None
    check()
    return count + (key is not None)


def index(
    shards: Path,
    *,
    image_key: str = "jpg",
    mask_key: str = "png",
    meta_key: str | None = None,
    policy: MaskPolicy | None = None,
    split_by_prefix: bool = False,
    split: str = "train",
    aspect: str = "stretch",
) -> dict:
    """Write ``<shards>/manifest.json`` for the shards in ``shards``; returns it."""
    shards = Path(shards)
    if not shards.is_dir():
        raise UserError(f"--shards {shards} is not a directory")
    if image_key == mask_key:
        raise UserError(f"--image-key and --mask-key are both {image_key!r}")
    policy = policy or MaskPolicy()
    check_aspect(aspect)
    existing = shards / MANIFEST
    if existing.exists():
        try:
            kind = json.loads(existing.read_text()).get("source", {}).get("kind")
        except (ValueError, AttributeError):
            kind = None
        if kind != "webdataset":
            raise UserError(
                f"{existing} exists and was not written by `dist-seg index`: it is a pack "
                "already; remove it first if you mean to index these shards anew"
            )
    files = sorted(p for p in shards.iterdir() if p.name.endswith(SHARD_SUFFIXES))
    if not files:
        raise DataError(f"no shard (*.tar, *.tar.gz) in {shards}")
    splits: dict[str, dict] = {}
    for path in files:
        n = _samples(path, image_key, mask_key, meta_key)
        info = {"name": path.name, "num_samples": n, "sha256": sha256_file(path),
                "bytes": path.stat().st_size}  # fmt: skip
        entry = splits.setdefault(_shard_split(path.name, split_by_prefix, split),
                                  {"num_samples": 0, "shards": []})  # fmt: skip
        entry["num_samples"] += n
        entry["shards"].append(info)
    manifest = {
        "format_version": FORMAT_VERSION,
        "toolkit_version": __version__,
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "source": {"kind": "webdataset", "directory": str(shards.resolve()), "skipped": []},
        "mask_policy": policy.to_dict(),
        "members": {"image": image_key, "mask": mask_key, "meta": meta_key, "full_mask": None},
        "image_size": 0,  # as stored: fitted to data.size when read, under "aspect"
        "height": 0,
        "width": 0,
        "aspect": aspect,
        "encoding": "foreign",
        "splits": splits,
    }
    tmp = shards / (MANIFEST + ".tmp")
    try:
        tmp.write_text(json.dumps(manifest, indent=1))
        os.replace(tmp, existing)
    except OSError as e:
        raise UserError(
            f"cannot write {existing}: {e.strerror}; the shard folder must be writable"
        ) from None
    return manifest
