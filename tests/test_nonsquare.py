"""Non-square sizes (HxW, height first) and the aspect policy (stretch | pad), end to end:
pack, index, config, train, evaluate, predict and export (data/sizes.py)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
import yaml
from helpers import run_cli, tiny_config
from PIL import Image

from dist_seg import metrics
from dist_seg.checkpoint import load_checkpoint, model_from_config, save_checkpoint
from dist_seg.cli import main
from dist_seg.config import config_from_dict, load_config, parse_set
from dist_seg.data import pets
from dist_seg.data.index import index
from dist_seg.data.manifest import load_manifest
from dist_seg.data.pack import pack, pack_generic
from dist_seg.data.sizes import fit_pair, letterbox, parse_size, resolve, unfit_logits
from dist_seg.data.stream import build_loader
from dist_seg.errors import UserError
from dist_seg.evaluate import run_evaluate
from dist_seg.models import build_model
from dist_seg.predict import predict
from dist_seg.train import train

IGNORE = 255


def _loaded(out: Path, split: str, size=0, **kw) -> dict:
    """name -> (image HxWx3, mask HxW) as the loader yields them."""
    loader = build_loader(load_manifest(out), split, batch_size=3, train=False, size=size, **kw)
    return {
        n: (i.permute(1, 2, 0).numpy(), m.numpy())
        for b in loader
        for n, i, m in zip(b["name"], b["image"], b["mask"], strict=True)
    }


def _all(out: Path, **kw) -> dict:
    return {k: v for s in load_manifest(out).splits for k, v in _loaded(out, s, **kw).items()}


def _folder(root: Path, shapes: list[tuple[int, int]], seed: int = 0) -> dict[str, tuple]:
    """images/<name>.png (lossless, so the truth is exact) + masks/<name>.png (0/255) of the
    given (h, w) shapes; returns name -> (image, 0/1 mask) at the original size."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir(parents=True)
    truth = {}
    for i, (h, w) in enumerate(shapes):
        name = f"img_{i:02d}"
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        mask = (rng.random((h, w)) < 0.4).astype(np.uint8)
        Image.fromarray(image).save(root / "images" / f"{name}.png")
        Image.fromarray(mask * 255).save(root / "masks" / f"{name}.png")
        truth[name] = (image, mask)
    return truth


def _pil(array: np.ndarray, hw: tuple[int, int], resample) -> np.ndarray:
    """An independent resize: PIL directly, (h, w) given height first."""
    return np.asarray(Image.fromarray(array).resize((hw[1], hw[0]), resample))


# --- sizes ---------------------------------------------------------------------------------
def test_sizes_parse_height_first_and_configs_accept_them(tmp_path):
    assert parse_size(256, "s") == (256, 256)
    assert parse_size("192x320", "s") == (192, 320)
    assert parse_size(" 48X32 ", "s") == (48, 32)
    assert parse_size("0", "s") == (0, 0)
    assert parse_size((32, 48), "s") == (32, 48)
    # --set data.size=HxW and YAML `size: HxW`; a square HxW is written as its side
    assert load_config(None, [parse_set(["data.size=192x320"])]).data.size == "192x320"
    assert load_config(None, [parse_set(["data.size=64x64"])]).data.size == 64
    assert load_config(None, [parse_set(["data.size=96"])]).data.size == 96
    run = tmp_path / "run.yaml"
    run.write_text("data:\n  size: 32x48\n  aspect: pad\n")
    cfg = load_config(run)
    assert (cfg.data.size, cfg.data.aspect) == ("32x48", "pad")
    assert config_from_dict(cfg.to_dict()).data.size == "32x48"  # as a checkpoint holds it


@pytest.mark.parametrize(
    ("value", "fact"),
    [
        ("100x50", "100x50 must be a multiple of 16"),
        ("48x0", "48x0 must be a multiple of 16"),
        ("big", "'big': not a size"),
        ("32x48x3", "'32x48x3': not a size"),
    ],
)
def test_bad_sizes_are_one_line_and_exit_2(value, fact, capsys):
    for argv, where in (
        (["train", "--set", f"data.size={value}"], "config data.size: "),
        (["pack", "--images", "i", "--masks", "m", "--out", "o", "--size", value], "--size "),
    ):
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        assert e.value.code == 2 and len(err) == 1, err
        assert err[0].startswith(f"dist-seg: error: {where}{fact}"), err
        assert "HxW, height first" in err[0]


def test_bad_size_from_the_real_command_line(tmp_path):
    proc = run_cli(["pack", "--root", "nowhere", "--out", "o", "--size", "40x32"], tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "dist-seg: error: --size 40x32 must be a multiple of 16 (the models downsample 16x): "
        "a side or HxW, height first, like 256 or 192x320 (or 0: keep original sizes)"
    ]


def test_letterbox_known_answer():
    """A 20x40 (h x w) image letterboxed into 32x32: scale min(32/20, 32/40) = 0.8, so it
    fills 16 rows x 32 columns, centred: 8 padding rows above and 8 below."""
    rng = np.random.default_rng(0)
    image = rng.integers(1, 256, (20, 40, 3), dtype=np.uint8)
    mask = np.zeros((20, 40), np.uint8)
    mask[:, :20] = 1  # left half foreground
    # the expectation, in a few lines of numpy
    scale = min(32 / 20, 32 / 40)
    rows, cols = int(20 * scale + 0.5), int(40 * scale + 0.5)
    top = (32 - rows) // 2
    expected_mask = np.full((32, 32), IGNORE, np.uint8)
    expected_mask[top : top + rows, :cols] = 0
    expected_mask[top : top + rows, : cols // 2] = 1
    assert (rows, cols, top) == (16, 32, 8)
    assert letterbox(20, 40, (32, 32)) == (8, 0, 16, 32)

    fitted, fitted_mask = fit_pair(image, mask, (32, 32), "pad")
    np.testing.assert_array_equal(fitted_mask, expected_mask)
    assert (fitted_mask[:8] == IGNORE).all() and (fitted_mask[24:] == IGNORE).all()
    assert (fitted[:8] == 0).all() and (fitted[24:] == 0).all()  # image padded with black
    np.testing.assert_array_equal(fitted[8:24], _pil(image, (16, 32), Image.BILINEAR))
    # portrait: columns padded instead
    assert letterbox(40, 20, (32, 32)) == (0, 8, 32, 16)
    # stretch ignores the aspect ratio, as the seed did
    stretched, stretched_mask = fit_pair(image, mask, (32, 32), "stretch")
    np.testing.assert_array_equal(stretched, _pil(image, (32, 32), Image.BILINEAR))
    assert set(np.unique(stretched_mask)) == {0, 1}

    # padding is scored as neither: perfect inside the box, nonsense in the padding, Dice 1
    logits = torch.where(torch.from_numpy(fitted_mask == 1), 10.0, -10.0)
    logits[:8] = 10.0
    result = metrics.summarize(
        metrics.batch_stats(logits[None, None], torch.from_numpy(fitted_mask)[None])
    )
    assert result["dice_per_image"] == pytest.approx(1.0) and result["loss"] < 1e-3

    # the prediction maps back to the original 20x40 without the letterbox
    back = unfit_logits(logits[None, None], (20, 40), "pad")
    assert back.shape == (1, 1, 20, 40)
    np.testing.assert_array_equal((back[0, 0] > 0).numpy(), mask.astype(bool))


# --- pack and index ------------------------------------------------------------------------
def test_generic_pack_hxw_round_trips_pixel_exact(tmp_path):
    truth = _folder(tmp_path / "src", [(20, 40), (40, 20), (32, 48), (50, 50), (17, 93)])
    out = tmp_path / "out"
    m = pack_generic(tmp_path / "src/images", tmp_path / "src/masks", out, size="32x48",
                     split_lists=None, fractions=(1.0, 0.0, 0.0))  # fmt: skip
    assert (m["image_size"], m["height"], m["width"], m["aspect"]) == ("32x48", 32, 48, "stretch")
    manifest = load_manifest(out)
    assert manifest.size == (32, 48) and manifest.image_size == "32x48"
    loaded = _all(out)
    assert sorted(loaded) == sorted(truth)
    for name, (image, mask) in truth.items():
        got_image, got_mask = loaded[name]
        assert got_image.shape == (32, 48, 3) and got_mask.shape == (32, 48)
        np.testing.assert_array_equal(got_image, _pil(image, (32, 48), Image.BILINEAR))
        np.testing.assert_array_equal(got_mask, _pil(mask, (32, 48), Image.NEAREST))

    pad = tmp_path / "pad"
    m = pack_generic(tmp_path / "src/images", tmp_path / "src/masks", pad, size="48x32",
                     aspect="pad", fractions=(1.0, 0.0, 0.0))  # fmt: skip
    assert (m["image_size"], m["aspect"]) == ("48x32", "pad")
    loaded = _all(pad)
    for name, (image, mask) in truth.items():
        top, left, h, w = letterbox(*image.shape[:2], (48, 32))
        want = np.full((48, 32), IGNORE, np.uint8)
        want[top : top + h, left : left + w] = _pil(mask, (h, w), Image.NEAREST)
        np.testing.assert_array_equal(loaded[name][1], want)
    # the json member records the letterbox for readers without dist_seg
    shard = out.parent / "pad" / m["splits"]["train"]["shards"][0]["name"]
    meta = next(iter(wds.WebDataset(str(shard), shardshuffle=False).decode()))["json"]
    h, w = meta["orig_height"], meta["orig_width"]
    assert meta["letterbox"] == list(letterbox(h, w, (48, 32)))
    assert (meta["height"], meta["width"]) == (48, 32)


def test_pets_pack_hxw_round_trips_pixel_exact(synth_root, tmp_path):
    out = tmp_path / "pets"
    proc = run_cli(["pack", "--root", str(synth_root), "--out", str(out), "--size", "48x32",
                    "--shard-size", "16", "--workers", "1"], tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "(raw, 48x32 px, stretch)" in proc.stdout
    loaded = _loaded(out, "val", border="ignore")
    assert loaded
    for name, (image, mask) in loaded.items():
        sample = pets.load_sample(synth_root, name)
        np.testing.assert_array_equal(image, _pil(sample.image, (48, 32), Image.BILINEAR))
        trimap = _pil(sample.trimap, (48, 32), Image.NEAREST)
        np.testing.assert_array_equal(mask, pets.trimap_to_mask(trimap, "ignore"))


def test_index_fits_foreign_shards_at_load_time_with_its_aspect(tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    rng = np.random.default_rng(1)
    truth = {}
    with wds.TarWriter(str(folder / "train-000000.tar"), encoder=False) as sink:
        for i, (h, w) in enumerate([(20, 40), (44, 30), (32, 48)]):
            image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            mask = (rng.random((h, w)) < 0.5).astype(np.uint8)
            enc = {}
            for k, a in (("png", mask * 255), ("image.png", image)):
                buf = io.BytesIO()
                Image.fromarray(a).save(buf, format="PNG")
                enc[k] = buf.getvalue()
            sink.write({"__key__": f"k{i}", **enc})
            truth[f"k{i}"] = (image, mask)
    m = index(folder, image_key="image.png", mask_key="png", aspect="pad")
    assert (m["aspect"], m["height"], m["width"]) == ("pad", 0, 0)
    loaded = _loaded(folder, "train", size="32x48")
    for key, (image, mask) in truth.items():
        top, left, h, w = letterbox(*image.shape[:2], (32, 48))
        want = np.full((32, 48), IGNORE, np.uint8)
        want[top : top + h, left : left + w] = _pil(mask, (h, w), Image.NEAREST)
        np.testing.assert_array_equal(loaded[key][1], want)
        assert (loaded[key][0][want == IGNORE] == 0).all()
    # the run's data.aspect may choose another policy for shards fitted only when read
    stretched = _loaded(folder, "train", size="32x48", aspect="stretch")
    assert all((m != IGNORE).all() for _, m in stretched.values())


def test_a_letterboxed_pack_is_not_refitted_nor_restretched(tmp_path):
    _folder(tmp_path / "src", [(20, 40), (40, 20)])
    out = tmp_path / "pad"
    pack_generic(tmp_path / "src/images", tmp_path / "src/masks", out, size="32x48",
                 aspect="pad", fractions=(1.0, 0.0, 0.0))  # fmt: skip
    manifest = load_manifest(out)
    with pytest.raises(UserError, match="letterbox it twice: set data.size=0"):
        build_loader(manifest, "train", batch_size=1, train=False, size=32)
    with pytest.raises(UserError, match="data.aspect=stretch, but .* with --aspect pad"):
        resolve(0, "stretch", manifest)
    assert resolve(0, "auto", manifest) == ("32x48", "pad")
    assert resolve("32x48", "pad", manifest) == ("32x48", "pad")


# --- the models, train, evaluate, predict, export --------------------------------------------
@pytest.mark.parametrize("name", ["unet", "resnet34_unet"])
def test_models_take_height_other_than_width(name):
    model = build_model(name, width=0.0625).eval()
    for h, w in ((32, 48), (48, 32), (16, 64)):
        with torch.no_grad():
            assert model(torch.rand(2, 3, h, w)).shape == (2, 1, h, w)


@pytest.fixture(scope="module")
def letterboxed(tmp_path_factory) -> Path:
    """A generic folder of landscape and portrait images packed at 32x48 with --aspect pad."""
    root = tmp_path_factory.mktemp("nonsquare")
    shapes = [(20 + 3 * i, 40 + 5 * (i % 4)) if i % 2 else (45, 25 + 2 * i) for i in range(24)]
    _folder(root / "src", shapes)
    pack_generic(root / "src/images", root / "src/masks", root / "pad", size="32x48",
                 aspect="pad", fractions=(0.6, 0.2, 0.2))  # fmt: skip
    return root


@pytest.mark.slow  # ~14 s: a training run, then evaluate and predict
def test_train_evaluate_predict_on_a_nonsquare_pack(letterboxed, tmp_path):
    shards = letterboxed / "pad"
    cfg = tiny_config(shards, tmp_path, "ns", data={"size": 0}, train={"epochs": 1})
    train(cfg)
    run = tmp_path / "ns"
    saved = yaml.safe_load((run / "config.yaml").read_text())["data"]
    assert (saved["size"], saved["aspect"]) == ("32x48", "pad")  # resolved from the pack
    ckpt = load_checkpoint(run / "best.pt")
    assert (ckpt["config"]["data"]["size"], ckpt["config"]["data"]["aspect"]) == ("32x48", "pad")

    result = run_evaluate(str(run / "best.pt"), str(shards), "test", str(tmp_path / "eval"),
                          batch_size=3, num_workers=0, original_size=True)  # fmt: skip
    assert result["size"] == [32, 48]
    assert result["num_images"] == load_manifest(shards).num_samples("test")
    assert result["original_size"]["num_images"] == result["num_images"]

    images = tmp_path / "photos"
    images.mkdir()
    for name, (h, w) in {"wide": (37, 90), "tall": (81, 29)}.items():
        array = np.random.default_rng(h).integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(array).save(images / f"{name}.jpg")
    assert predict(str(run / "best.pt"), str(images), str(tmp_path / "pred")) == 2
    for name, (h, w) in {"wide": (37, 90), "tall": (81, 29)}.items():
        with Image.open(tmp_path / "pred" / f"{name}_mask.png") as mask:
            assert mask.size == (w, h)


def test_evaluate_original_size_crops_the_letterbox(letterboxed, tmp_path):
    """A model that predicts the truth exactly inside the box scores 1 at the original size
    only if the letterbox is cropped off before the logits are resized back."""
    from dist_seg.evaluate import original_size_stats

    full = np.zeros((20, 40), np.uint8)
    full[5:15, 10:30] = 1
    _, small = fit_pair(np.zeros((20, 40, 3), np.uint8), full, (32, 48), "pad")
    logits = torch.where(torch.from_numpy(small == 1), 20.0, -20.0)[None, None]
    logits[..., torch.from_numpy(small == IGNORE)] = 20.0  # nonsense in the padding
    pad = metrics.summarize(original_size_stats(logits, [full], "pad"))
    stretch = metrics.summarize(original_size_stats(logits, [full], "stretch"))
    assert pad["dice_per_image"] > 0.95 > stretch["dice_per_image"]


SLOW = pytest.mark.slow  # 10-13 s each here; the UNet ONNX one (~6 s) stays in the fast tier
EXPORTS = [
    pytest.param("onnx", "unet", id="onnx-unet"),
    pytest.param("onnx", "resnet34_unet", id="onnx-resnet34_unet", marks=SLOW),
    pytest.param("torchscript", "unet", id="torchscript-unet", marks=SLOW),
    pytest.param("torchscript", "resnet34_unet", id="torchscript-resnet34_unet", marks=SLOW),
]


@pytest.mark.parametrize(("fmt", "name"), EXPORTS)
def test_export_checks_at_the_trained_hxw(fmt, name, tmp_path):
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
        pytest.importorskip("onnx")
    from dist_seg.export import export_checkpoint, exported_size, load_exported

    cfg = load_config(None, [{"model": {"name": name, "width": 0.0625},
                              "data": {"size": "32x48", "aspect": "pad"}}])  # fmt: skip
    torch.manual_seed(0)
    net = model_from_config(cfg)
    save_checkpoint({"model": net.state_dict(), "config": cfg.to_dict()}, tmp_path / "best.pt")
    out = tmp_path / f"model.{fmt}"
    report = export_checkpoint(tmp_path / "best.pt", fmt, out)
    assert [c["shape"] for c in report["checks"]] == [[1, 3, 32, 48], [2, 3, 64, 64]]
    assert report["checks_real"][0]["shape"][2:] == [32, 48]
    assert (report["image_size"], report["aspect"]) == ("32x48", "pad")
    exported = load_exported(out)
    assert exported.size == (32, 48) and exported.aspect == "pad"
    assert exported_size(out) == "32x48"
    # predict from the exported file maps back to the image's own size
    photo = tmp_path / "photo.png"
    Image.fromarray(np.zeros((27, 70, 3), np.uint8)).save(photo)
    predict(None, str(photo), str(tmp_path / "pred"), exported=str(out))
    with Image.open(tmp_path / "pred" / "photo_mask.png") as mask:
        assert mask.size == (70, 27)


def test_manifest_without_height_reads_as_before(tmp_path, synth_root):
    """A pack written before HxW (image_size only) still loads, as stretch."""
    out = tmp_path / "old"
    pack(synth_root, out, size=32, shard_size=64)
    raw = json.loads((out / "manifest.json").read_text())
    for key in ("height", "width", "aspect"):
        del raw[key]
    (out / "manifest.json").write_text(json.dumps(raw))
    m = load_manifest(out)
    assert (m.size, m.aspect, m.image_size) == ((32, 32), "stretch", 32)
    assert tarfile.is_tarfile(out / raw["splits"]["val"]["shards"][0]["name"])
