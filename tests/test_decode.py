"""data.decode=gpu (dist_seg/data/decode.py): workers hand over JPEG bytes, the training
process decodes each batch. Without CUDA the same batch path runs with the workers' own
decoder, so here its batches must equal data.decode=cpu's, pixel for pixel. The nvJPEG
branch's own logic (stacking, fitting on the device, pixels passed through) runs here with a
stand-in for torchvision; tests/test_gpu.py compares real nvJPEG with a tolerance."""

from __future__ import annotations

import io
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from conftest import COUNTS, SIZE
from helpers import tiny_config
from PIL import Image

from dist_seg.data import decode
from dist_seg.data.codec import decode_rgb
from dist_seg.data.index import index
from dist_seg.data.manifest import load_manifest
from dist_seg.data.stream import build_loader
from dist_seg.errors import UserError


@pytest.fixture(autouse=True)
def fresh_notices():
    """Each test sees the one-line notices again (they are said once per process)."""
    decode._SAID.clear()
    yield
    decode._SAID.clear()


def read_all(manifest, split="train", **kw) -> dict:
    """name -> (image, mask, key, full mask or None); every batch is held until the end,
    so a worker's ring buffer rewritten under a held batch would show."""
    kw = {"batch_size": 3, "train": split == "train", "size": SIZE, **kw}
    loader = build_loader(manifest, split, **kw)
    if kw["train"]:
        loader.set_epoch(0)
    batches = list(loader)
    out = {}
    for b in batches:
        assert b["image"].dtype == torch.uint8 and b["image"].shape[1] == 3
        assert "image_bytes" not in b and "image_info" not in b
        fulls = b.get("full_mask", [None] * len(b["name"]))
        for name, image, mask, key, full in zip(b["name"], b["image"], b["mask"], b["key"], fulls, strict=True):  # fmt: skip
            out[name] = (image, mask, key, full)
    return out


def assert_same(a: dict, b: dict, image_tolerance: int = 0) -> int:
    """Same names, keys, masks (exactly) and full masks; images within ``image_tolerance``
    levels. Returns the largest image difference."""
    assert a.keys() == b.keys() and a
    largest = 0
    for name in a:
        (ia, ma, ka, fa), (ib, mb, kb, fb) = a[name], b[name]
        assert ka == kb and torch.equal(ma, mb), name
        assert (fa is None) == (fb is None) and (fa is None or np.array_equal(fa, fb)), name
        assert ia.shape == ib.shape, name
        largest = max(largest, int((ia.int() - ib.int()).abs().max()))
    assert largest <= image_tolerance
    return largest


# --- Pets jpeg pack at its own size ------------------------------------------------------------
@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("train", [True, False])
def test_gpu_path_on_cpu_gives_the_worker_decode_pixel_for_pixel(packed_jpeg, workers, train):
    manifest = load_manifest(packed_jpeg)
    split = "train" if train else "test"
    cpu = read_all(manifest, split, num_workers=workers)
    gpu = read_all(manifest, split, num_workers=workers, decode="gpu")
    assert len(gpu) == (COUNTS[split] // 3 * 3 if train else COUNTS[split])
    assert_same(cpu, gpu)
    # channels-last in memory, like the worker path's batches
    batch = next(iter(build_loader(manifest, split, batch_size=3, train=False, decode="gpu")))
    assert batch["image"].permute(0, 2, 3, 1).is_contiguous()


def test_one_line_at_start_says_why_and_once_per_process(packed_jpeg, packed, capsys):
    manifest = load_manifest(packed_jpeg)
    for split in ("train", "val"):  # the Trainer builds two loaders: one line
        build_loader(manifest, split, batch_size=2, train=False, decode="gpu")
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("data.decode=gpu: no CUDA device") and "CPU" in lines[0]
    # raw shards: nothing to decode, the workers' path, said in one line
    raw = load_manifest(packed)
    loader = build_loader(raw, "val", batch_size=2, train=False, decode="gpu")
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and "nothing to decode" in lines[0] and ".npy" in lines[0]
    assert loader.decoder is None
    cpu = read_all(raw, "val")
    assert_same(cpu, read_all(raw, "val", decode="gpu"))
    # say=None: silent (ranks other than the main one pass their silent console's line)
    build_loader(manifest, "val", batch_size=2, train=False, decode="gpu", say=None)
    assert capsys.readouterr().out == ""


def test_without_torchvision_on_cuda_it_says_so(monkeypatch):
    """On a CUDA device whose torchvision does not load (PyPI's against a CPU torch) the
    backend is PIL, and the line says why."""
    monkeypatch.setitem(sys.modules, "torchvision", None)  # import raises ImportError
    monkeypatch.setattr(decode, "_BACKENDS", {})
    assert decode.choose_backend(torch.device("cuda")) == ("cpu", "torchvision is not installed")
    broken = types.ModuleType("torchvision")

    def fail(name):
        raise RuntimeError("operator torchvision::nms does not exist")

    broken.__getattr__ = fail
    monkeypatch.setitem(sys.modules, "torchvision", broken)
    monkeypatch.setitem(sys.modules, "torchvision.io", None)
    monkeypatch.setattr(decode, "_BACKENDS", {})
    backend, why = decode.choose_backend(torch.device("cuda"))
    assert backend == "cpu" and why.startswith("torchvision")
    assert decode.choose_backend(torch.device("cpu")) == ("cpu", "no CUDA device")


def test_a_bad_decode_value_is_a_user_error(packed_jpeg, tmp_path):
    with pytest.raises(UserError, match="data.decode 'xpu'"):
        build_loader(load_manifest(packed_jpeg), "val", batch_size=2, train=False, decode="xpu")
    with pytest.raises(UserError, match="data.decode"):
        tiny_config(packed_jpeg, tmp_path, "bad", data={"decode": "xpu"})


# --- foreign shards: resized (stretch, pad, non-square), odd members ---------------------------
def _encode(array: np.ndarray, fmt: str, mode: str | None = None, **kw) -> bytes:
    image = Image.fromarray(array)
    buf = io.BytesIO()
    (image.convert(mode) if mode else image).save(buf, format=fmt, **kw)
    return buf.getvalue()


def _foreign(folder: Path) -> None:
    """A webdataset user's shards of images of many sizes under `jpg`, among them what
    nvJPEG does not get: PNG content, CMYK; and grayscale and progressive JPEGs, which it
    does. Masks 0/255 PNG."""
    rng = np.random.default_rng(1)
    folder.mkdir(parents=True)
    for split, n in {"train": 12, "val": 8}.items():
        with wds.TarWriter(str(folder / f"{split}-000000.tar"), encoder=False) as sink:
            for i in range(n):
                h, w = int(rng.integers(20, 90)), int(rng.integers(20, 90))
                yy, xx = np.mgrid[:h, :w]
                fg = (yy - h / 2) ** 2 + (xx - w / 3) ** 2 < (min(h, w) / 3) ** 2
                image = np.stack([fg * 200 + 20, xx * 3, rng.integers(0, 255, (h, w))], -1)
                image = image.astype(np.uint8)
                kind = i % 6
                if kind == 1:
                    jpg = _encode(image, "PNG")  # PNG content named .jpg
                elif kind == 2:
                    jpg = _encode(image[..., 0], "JPEG")  # grayscale
                elif kind == 3:
                    jpg = _encode(image, "JPEG", progressive=True)
                elif kind == 4:
                    jpg = _encode(image, "JPEG", mode="CMYK")
                else:
                    jpg = _encode(image, "JPEG", quality=90)
                png = _encode(fg.astype(np.uint8) * 255, "PNG")
                sink.write({"__key__": f"{split}_{i:03d}", "jpg": jpg, "png": png})


@pytest.fixture(scope="module")
def foreign(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("foreign-decode") / "shards"
    _foreign(folder)
    index(folder, image_key="jpg", mask_key="png", split_by_prefix=True)
    return folder


def test_header_reader_knows_what_nvjpeg_decodes(foreign):
    image = np.zeros((40, 56, 3), np.uint8)
    assert decode.jpeg_header(_encode(image, "JPEG")) == (40, 56)
    assert decode.jpeg_header(_encode(image, "JPEG", progressive=True)) == (40, 56)
    assert decode.jpeg_header(_encode(image[..., 0], "JPEG")) == (40, 56)
    cmyk = _encode(image, "JPEG", mode="CMYK")
    for other in (_encode(image, "PNG"), cmyk, b"", b"\xff\xd8\xff", b"GIF89a"):
        assert decode.jpeg_header(other) is None


@pytest.mark.parametrize("size", [SIZE, "32x48"])
@pytest.mark.parametrize("aspect", ["stretch", "pad"])
@pytest.mark.parametrize("workers", [0, 2])
def test_foreign_shards_resized_match_the_worker_path(foreign, size, aspect, workers):
    manifest = load_manifest(foreign)
    kw = {"size": size, "aspect": aspect, "num_workers": workers, "full_masks": True}
    cpu = read_all(manifest, "val", **kw)
    assert_same(cpu, read_all(manifest, "val", decode="gpu", **kw))
    assert_same(read_all(manifest, "train", **kw), read_all(manifest, "train", decode="gpu", **kw))


# --- the nvJPEG branch's logic, with torchvision's decode_jpeg stood in for by PIL -------------
@pytest.fixture
def stand_in_torchvision(monkeypatch):
    calls = []

    def decode_jpeg(inputs, mode=None, device="cpu"):
        assert isinstance(inputs, list) and all(t.dim() == 1 and t.is_contiguous() for t in inputs)
        calls.append(len(inputs))
        return [
            torch.from_numpy(decode_rgb(t.numpy()).copy()).permute(2, 0, 1).to(device)
            for t in inputs
        ]

    io_module = types.ModuleType("torchvision.io")
    io_module.decode_jpeg = decode_jpeg
    io_module.ImageReadMode = types.SimpleNamespace(RGB="RGB")
    package = types.ModuleType("torchvision")
    package.io, package.__version__ = io_module, "stand-in"
    monkeypatch.setitem(sys.modules, "torchvision", package)
    monkeypatch.setitem(sys.modules, "torchvision.io", io_module)
    return calls


def _with_nvjpeg_branch(loader):
    d = loader.decoder
    loader.decoder = decode.BatchDecoder(d.size, d.aspect, torch.device("cpu"), "nvjpeg")
    return loader


def read_via_nvjpeg_branch(manifest, split, **kw):
    loader = _with_nvjpeg_branch(build_loader(manifest, split, batch_size=3, train=False,
                                              decode="gpu", **kw))  # fmt: skip
    return {n: (i, m, k, None) for b in loader
            for n, i, m, k in zip(b["name"], b["image"], b["mask"], b["key"])}  # fmt: skip


def test_nvjpeg_branch_stacks_a_batch_at_its_size(packed_jpeg, stand_in_torchvision):
    manifest = load_manifest(packed_jpeg)
    got = read_via_nvjpeg_branch(manifest, "test", size=SIZE)
    assert_same(read_all(manifest, "test"), got)
    assert stand_in_torchvision and max(stand_in_torchvision) == 3  # one call per batch


@pytest.mark.parametrize("aspect", ["stretch", "pad"])
def test_nvjpeg_branch_fits_on_the_device_within_a_level(foreign, aspect, stand_in_torchvision):
    """Images not at the batch size are resized on the device (F.interpolate, antialiased:
    at most 1 level from PIL); samples that are not for nvJPEG arrive as final pixels."""
    manifest = load_manifest(foreign)
    for size in (SIZE, "32x48"):
        cpu = read_all(manifest, "train", size=size, aspect=aspect)
        got = read_via_nvjpeg_branch(manifest, "train", size=size, aspect=aspect)
        assert_same({k: (*v[:3], None) for k, v in cpu.items()}, got, image_tolerance=1)


# --- a tiny training: same weights ------------------------------------------------------------
def test_training_with_gpu_decode_on_cpu_gives_the_same_weights(packed_jpeg, tmp_path, capsys):
    from dist_seg.train import Trainer, weights_digest

    digests = {}
    for mode in ("cpu", "gpu"):
        cfg = tiny_config(packed_jpeg, tmp_path, mode, data={"decode": mode, "num_workers": 1},
                          train={"epochs": 1})  # fmt: skip
        trainer = Trainer(cfg)
        model = trainer.raw_model
        trainer.fit()
        digests[mode] = weights_digest(model)
    assert digests["cpu"] == digests["gpu"]
    out = capsys.readouterr().out
    assert out.count("data.decode=gpu: no CUDA device") == 1


# --- the bench's rows --------------------------------------------------------------------------
def test_bench_data_times_gpu_decode_beside_the_workers_decode(tmp_path, capsys):
    from test_bench import TINY_DATA, close, parse, run_bench  # inside: not collected here

    from dist_seg import bench

    r = run_bench(["data", "--work", str(tmp_path), "--workers", "0,1", "--epochs", "1",
                   "--decode", "gpu", *TINY_DATA], tmp_path / "r.json")  # fmt: skip
    assert "jpeg, gpu decode" in capsys.readouterr().out
    assert r["config"]["decode"] == "gpu" and "--decode gpu" in r["command"]
    assert r["gpu_decode"]["backend"] == "cpu" and r["gpu_decode"]["note"] == "no CUDA device"
    assert all(us > 0 for us in r["gpu_decode"]["us_per_sample"].values())
    for row in r["results"]:
        g, jpeg = row["loaders"]["jpeg, gpu decode"], row["loaders"]["jpeg"]
        assert g["samples"] == 18 and close(g["ratio"], g["per_core"] / row["loaders"]["seed"]["per_core"])  # fmt: skip
        assert close(g["vs_jpeg"], g["samples_per_s"] / jpeg["samples_per_s"])
        assert close(g["vs_jpeg_cpu"], g["samples_per_cpu_s"] / jpeg["samples_per_cpu_s"])
    args = parse(["bench", "data", "--decode", "gpu"])
    assert vars(parse(bench.command_line(args).split()[1:])) == vars(args)
