"""Fetch and unpack the Oxford-IIIT Pet archives: resumable, checksummed, atomic.

For each archive: stream it to `root/.downloads/<file>.part` (resuming an earlier partial
file with an HTTP Range request), check its md5, rename it to `root/.downloads/<file>`,
extract it into a temporary directory inside `root`, rename its top-level directory into
place and write `root/.downloads/<name>.ok` holding the md5. A second call with every
marker and directory in place touches neither the network nor the disk.
"""

from __future__ import annotations

import hashlib
import http.client
import shutil
import tarfile
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.error import HTTPError, URLError
from urllib.request import Request, urlopen

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from dist_seg.errors import DataError

CHUNK = 1 << 20  # bytes per read
RETRY_DELAY_S = 2.0  # the n-th retry waits (n - 1) * RETRY_DELAY_S


@dataclass(frozen=True)
class Archive:
    """One downloadable archive and the top-level directory it extracts to."""

    name: str
    url: str
    md5: str
    directory: str

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]


_PETS = "https://www.robots.ox.ac.uk/~vgg/data/pets/data"
ARCHIVES = (
    Archive("images", f"{_PETS}/images.tar.gz", "5c4f3ee8e5d25df40f4fd59a7f44e54c", "images"),
    Archive(
        "annotations",
        f"{_PETS}/annotations.tar.gz",
        "95a8c909bbe2e81eed6a22bccdf3f68f",
        "annotations",
    ),
)


class _Cut(Exception):
    """The server closed the connection before sending Content-Length bytes."""


def download(
    root: Path,
    archives: Sequence[Archive] = ARCHIVES,
    progress: bool = True,
    retries: int = 3,
    timeout: float = 60,
    base_url: str | None = None,
) -> None:
    """Download, verify and extract `archives` under `root`; skip those already in place.

    `base_url` replaces the directory part of each archive's URL (a mirror, or a test server).
    Every failure a user can meet is raised as a one-line `DataError`.
    """
    root = Path(root)
    cache = root / ".downloads"
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create {cache}: {_why(e)}; choose a writable --root") from None
    todo = [a for a in archives if not _done(root, a)]
    if not todo:
        return
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=Console(stderr=True), disable=not progress) as bar:
        for archive in todo:
            url = archive.url if base_url is None else f"{base_url.rstrip('/')}/{archive.filename}"
            path = _fetch_verified(archive, url, cache, bar, retries, timeout)
            marker = cache / f"{archive.name}.ok"
            marker.unlink(missing_ok=True)
            _extract(path, root, archive.directory)
            marker.write_text(archive.md5 + "\n")
            if progress:
                bar.console.print(
                    f"{archive.filename}: md5 ok, extracted {root / archive.directory}"
                )


def _done(root: Path, archive: Archive) -> bool:
    marker = root / ".downloads" / f"{archive.name}.ok"
    try:
        ok = marker.read_text().strip() == archive.md5
    except OSError:
        return False
    return ok and (root / archive.directory).is_dir()


def _fetch_verified(
    archive: Archive, url: str, cache: Path, bar: Progress, retries: int, timeout: float
) -> Path:
    """Return the path of the archive with the right md5, downloading it if needed."""
    final = cache / archive.filename
    if final.is_file() and _md5_of(final).hexdigest() == archive.md5:
        return final
    final.unlink(missing_ok=True)
    part = cache / f"{archive.filename}.part"
    task = bar.add_task(archive.filename, total=None)
    for _ in range(2):  # a completed file with a wrong md5 is fetched once more from scratch
        got = _fetch_with_retries(url, part, bar, task, retries, timeout)
        if got == archive.md5:
            part.replace(final)
            return final
        part.unlink()
    raise DataError(
        f"{archive.filename} from {url} has md5 {got}, expected {archive.md5} (downloaded twice);"
        " the server sends a different file: try again later or use another mirror (--base-url)"
    )


def _fetch_with_retries(
    url: str, part: Path, bar: Progress, task: TaskID, retries: int, timeout: float
) -> str:
    """Complete `part` from `url`, resuming after network errors; return its md5."""
    label = part.name.removesuffix(".part")
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(RETRY_DELAY_S * (attempt - 1))
        try:
            return _fetch(url, part, bar, task, timeout)
        except HTTPError as e:
            if e.code == 416 and part.exists():  # the .part already holds the whole file
                return _md5_of(part).hexdigest()
            if e.code < 500:
                raise DataError(
                    f"cannot download {label}: HTTP {e.code} {e.reason} from {url};"
                    " check the URL (or --base-url)"
                ) from None
            error: Exception = e
        except (OSError, http.client.HTTPException, _Cut) as e:
            error = e
    kept = f"; {part} is kept and the next run resumes it" if part.exists() else ""
    raise DataError(
        f"cannot download {label} from {url} ({retries + 1} attempt{'s' if retries else ''},"
        f" last: {_why(error)}); check the network and run again{kept}"
    )


def _fetch(url: str, part: Path, bar: Progress, task: TaskID, timeout: float) -> str:
    """Append the rest of `url` to `part` (or restart it); return the md5 of the whole file."""
    offset = part.stat().st_size if part.exists() else 0
    request = Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    with urlopen(request, timeout=timeout) as response:
        if getattr(response, "status", None) != 206:
            offset = 0  # no partial file, or the server ignored the Range: start over
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length else None
        md5 = _md5_of(part) if offset else hashlib.md5()
        bar.update(task, total=total, completed=offset)
        with part.open("ab" if offset else "wb") as f:
            while chunk := response.read(CHUNK):
                f.write(chunk)
                md5.update(chunk)
                bar.advance(task, len(chunk))
    size = part.stat().st_size
    if total is not None and size < total:
        raise _Cut(f"connection closed after {size} of {total} bytes")
    return md5.hexdigest()


def _extract(archive: Path, root: Path, directory: str) -> None:
    """Extract `archive` beside `root/directory`, then rename its `directory` into place."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory}-", dir=root))
    try:
        try:
            with tarfile.open(archive, "r:*") as tar:
                safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
                tar.extractall(tmp, members=_checked(tar, archive), **safe)
        except (tarfile.TarError, EOFError, OSError) as e:
            raise DataError(
                f"cannot extract {archive}: {_why(e)}; check free space in {root},"
                f" or delete {archive} and download again"
            ) from None
        source, dest, old = tmp / directory, root / directory, tmp / ".old"
        if not source.is_dir():
            raise DataError(f"{archive} holds no top-level {directory}/; is it the right file?")
        try:
            if dest.exists() or dest.is_symlink():
                dest.rename(old)  # set aside; removed with tmp once the new one is in place
            source.rename(dest)
        except OSError as e:
            if not dest.exists() and old.exists():
                old.rename(dest)
            raise DataError(f"cannot move {directory}/ into {root}: {_why(e)}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _checked(tar: tarfile.TarFile, archive: Path) -> Iterator[tarfile.TarInfo]:
    """Yield the members of `tar`, refusing absolute paths and '..' in names or link targets."""
    for member in tar:
        names = [member.name] + ([member.linkname] if member.issym() or member.islnk() else [])
        for name in names:
            if name.startswith(("/", "\\")) or ".." in PurePosixPath(name).parts:
                raise DataError(
                    f"{archive} has an unsafe member {name!r} (absolute or with '..');"
                    " refusing to extract it: this is not the expected archive, use another mirror"
                )
        yield member


def _md5_of(path: Path):  # -> hashlib's md5 object, updated with the file's bytes
    md5 = hashlib.md5()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            md5.update(chunk)
    return md5


def _why(error: BaseException) -> str:
    """A short reason for a network or file error, without the exception's class wall."""
    if isinstance(error, URLError) and not isinstance(error, HTTPError):
        reason = error.reason
        return _why(reason) if isinstance(reason, BaseException) else str(reason)
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error) or type(error).__name__
