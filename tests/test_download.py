"""download(): resumable, checksummed, atomic, against a real loopback HTTP server."""

import hashlib
import io
import socket
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dist_seg.data import download as dl
from dist_seg.data.download import Archive, download
from dist_seg.errors import DataError


class _Handler(BaseHTTPRequestHandler):
    """GET with `Range: bytes=N-`, 404 for unknown files, and a switch to cut a transfer."""

    def do_GET(self) -> None:
        state: _Server = self.server.state
        name = self.path.rsplit("/", 1)[-1]
        byte_range = self.headers.get("Range")
        state.requests.append((name, byte_range))
        data = state.files.get(name)
        if data is None:
            self.send_error(404)
            return
        start = 0
        if byte_range and state.ranges:
            start = int(byte_range.removeprefix("bytes=").split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if state.cuts_left > 0:  # send part of the body, then close the connection
            state.cuts_left -= 1
            body = body[: state.cut_after]
            self.close_connection = True
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


class _Server:
    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.requests: list[tuple[str, str | None]] = []  # (file name, Range header)
        self.ranges = True  # False: ignore Range and answer 200 with the whole file
        self.cut_after = 0  # body bytes sent before a cut ...
        self.cuts_left = 0  # ... on this many next requests
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.state = self
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/pets"

    def requests_for(self, name: str) -> list[str | None]:
        return [byte_range for file, byte_range in self.requests if file == name]


@pytest.fixture
def server():
    srv = _Server()
    thread = threading.Thread(target=srv.httpd.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    yield srv
    srv.httpd.shutdown()
    srv.httpd.server_close()
    thread.join()


def _dead_url() -> str:
    """A loopback URL where nothing listens: any request fails with 'connection refused'."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/pets"


def _jpeg(rng: np.random.Generator) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _png(rng: np.random.Generator) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(1, 4, (32, 32), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def pets(tmp_path_factory) -> Path:
    """A tiny tree with the layout of the two official archives."""
    src = tmp_path_factory.mktemp("pets-src")
    rng = np.random.default_rng(0)
    names = ["Abyssinian_1", "Abyssinian_2", "beagle_1", "beagle_2"]
    (src / "images").mkdir()
    (src / "annotations" / "trimaps").mkdir(parents=True)
    for name in names:
        (src / "images" / f"{name}.jpg").write_bytes(_jpeg(rng))
        (src / "annotations" / "trimaps" / f"{name}.png").write_bytes(_png(rng))
    (src / "annotations" / "trimaps" / "._beagle_1.png").write_bytes(b"\x00\x05\x16\x07mac")
    lines = [f"{n} {1 + i // 2} {1 + i // 2} {1 + i % 2}" for i, n in enumerate(names)]
    (src / "annotations" / "list.txt").write_text("#header\n" + "\n".join(lines) + "\n")
    (src / "annotations" / "trainval.txt").write_text("\n".join(lines[:2]) + "\n")
    (src / "annotations" / "test.txt").write_text("\n".join(lines[2:]) + "\n")
    return src


def _targz(src: Path, top: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(src / top, arcname=top)
    return buf.getvalue()


def _archive(name: str, data: bytes, md5: str | None = None) -> Archive:
    md5 = md5 or hashlib.md5(data).hexdigest()
    return Archive(name, f"https://mirror.invalid/pets/{name}.tar.gz", md5, name)


@pytest.fixture
def archives(pets, server) -> tuple[Archive, Archive]:
    """(images, annotations) served by `server`, with their real md5s."""
    out = []
    for name in ("images", "annotations"):
        data = _targz(pets, name)
        server.files[f"{name}.tar.gz"] = data
        out.append(_archive(name, data))
    return tuple(out)


def _tree(path: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()
    }


def _run(root: Path, archives, base_url: str, **kw) -> None:
    download(root, archives, progress=False, timeout=5, base_url=base_url, **kw)


def test_good_run_extracts_and_writes_markers(tmp_path, pets, server, archives):
    root = tmp_path / "data"
    _run(root, archives, server.url)
    for archive in archives:
        assert _tree(root / archive.directory) == _tree(pets / archive.directory)
        assert (root / ".downloads" / f"{archive.name}.ok").read_text().strip() == archive.md5
        assert (root / ".downloads" / archive.filename).is_file()
        assert not (root / ".downloads" / f"{archive.filename}.part").exists()
    assert sorted(p.name for p in root.iterdir()) == [".downloads", "annotations", "images"]


def test_second_call_touches_neither_network_nor_files(tmp_path, server, archives):
    root = tmp_path / "data"
    _run(root, archives, server.url)
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    _run(root, archives, _dead_url(), retries=0)
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == before
    assert len(server.requests) == 2


def test_bad_checksum_is_one_clear_line_and_leaves_nothing(tmp_path, pets, server, archives):
    images, annotations = archives
    bad = Archive(images.name, images.url, "0" * 32, images.directory)
    root = tmp_path / "data"
    with pytest.raises(DataError) as info:
        _run(root, (annotations, bad), server.url)
    message = str(info.value)
    assert "\n" not in message
    assert "images.tar.gz" in message and "0" * 32 in message
    assert hashlib.md5(server.files["images.tar.gz"]).hexdigest() in message
    assert server.requests_for("images.tar.gz") == [None, None]  # fetched twice from scratch
    assert not (root / "images").exists()
    assert not list((root / ".downloads").glob("images*"))
    assert _tree(root / "annotations") == _tree(pets / "annotations")
    assert (root / ".downloads" / "annotations.ok").is_file()


def test_cut_transfer_resumes_with_range(tmp_path, pets, server, archives):
    half = len(server.files["images.tar.gz"]) // 2
    server.cut_after, server.cuts_left = half, 1
    root = tmp_path / "data"
    _run(root, archives, server.url)
    assert server.requests_for("images.tar.gz") == [None, f"bytes={half}-"]
    assert _tree(root / "images") == _tree(pets / "images")


def test_network_failure_keeps_part_for_next_run(tmp_path, pets, server, archives):
    third = len(server.files["images.tar.gz"]) // 3
    server.cut_after, server.cuts_left = third, 2
    root = tmp_path / "data"
    with pytest.raises(DataError, match=r"images\.tar\.gz .*2 attempts.*resumes"):
        _run(root, archives, server.url, retries=1)
    part = root / ".downloads" / "images.tar.gz.part"
    assert part.stat().st_size == 2 * third  # the retry resumed, and was cut again
    _run(root, archives, server.url)
    assert server.requests_for("images.tar.gz")[-1] == f"bytes={2 * third}-"
    assert _tree(root / "images") == _tree(pets / "images")


def test_stale_corrupt_part_is_caught_by_md5_and_fetched_again(tmp_path, pets, server, archives):
    half = len(server.files["images.tar.gz"]) // 2
    root = tmp_path / "data"
    (root / ".downloads").mkdir(parents=True)
    (root / ".downloads" / "images.tar.gz.part").write_bytes(b"x" * half)
    _run(root, archives, server.url)
    assert server.requests_for("images.tar.gz") == [f"bytes={half}-", None]
    assert _tree(root / "images") == _tree(pets / "images")


def test_server_ignoring_range_starts_over(tmp_path, pets, server, archives):
    server.ranges = False
    data = server.files["images.tar.gz"]
    root = tmp_path / "data"
    (root / ".downloads").mkdir(parents=True)
    (root / ".downloads" / "images.tar.gz.part").write_bytes(data[:100])
    _run(root, archives, server.url)
    assert server.requests_for("images.tar.gz") == ["bytes=100-"]  # answered 200, whole file
    assert _tree(root / "images") == _tree(pets / "images")


def test_complete_part_is_verified_without_downloading_again(tmp_path, pets, server, archives):
    root = tmp_path / "data"
    (root / ".downloads").mkdir(parents=True)
    (root / ".downloads" / "images.tar.gz.part").write_bytes(server.files["images.tar.gz"])
    _run(root, archives, server.url)
    assert server.requests_for("images.tar.gz") == [f"bytes={len(server.files['images.tar.gz'])}-"]
    assert _tree(root / "images") == _tree(pets / "images")


def test_incomplete_old_directory_is_replaced(tmp_path, pets, server, archives):
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    (root / "images" / "half_extracted.jpg").write_bytes(b"junk")
    _run(root, archives, server.url)
    assert _tree(root / "images") == _tree(pets / "images")


def test_http_404_is_a_data_error(tmp_path, server, archives):
    del server.files["images.tar.gz"]
    with pytest.raises(DataError, match=r"images\.tar\.gz: HTTP 404 .*127\.0\.0\.1"):
        _run(tmp_path / "data", archives, server.url)
    assert server.requests_for("images.tar.gz") == [None]  # no retries on a 4xx


def test_unreachable_host_is_a_data_error(tmp_path, archives, monkeypatch):
    monkeypatch.setattr(dl, "RETRY_DELAY_S", 0.0)
    with pytest.raises(DataError, match=r"cannot download images\.tar\.gz .*2 attempts.*refused"):
        _run(tmp_path / "data", archives, _dead_url(), retries=1)


def test_root_not_writable_is_a_data_error(tmp_path, archives):
    root = tmp_path / "a_file"
    root.write_text("not a directory")
    with pytest.raises(DataError, match=r"cannot create .*\.downloads.*writable"):
        _run(root, archives, _dead_url())


@pytest.mark.parametrize("evil", ["../evil", "images/../../evil", "/tmp/dist_seg_evil"])
def test_unsafe_tar_member_is_refused(tmp_path, server, evil):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, payload in (("images/ok.jpg", b"fine"), (evil, b"pwned")):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    server.files["images.tar.gz"] = buf.getvalue()
    root = tmp_path / "a" / "data"
    with pytest.raises(DataError, match="unsafe member"):
        _run(root, [_archive("images", buf.getvalue())], server.url)
    assert not (tmp_path / "a" / "evil").exists() and not (tmp_path / "evil").exists()
    assert not Path("/tmp/dist_seg_evil").exists()
    assert sorted(p.name for p in root.iterdir()) == [".downloads"]  # no images/, no temp dir
    assert not (root / ".downloads" / "images.ok").exists()
