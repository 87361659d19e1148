"""`dist-seg evaluate` and `dist-seg predict` on a tiny trained checkpoint."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from dist_seg.cli import main
from dist_seg.config import load_config
from dist_seg.evaluate import run_evaluate
from dist_seg.predict import predict
from dist_seg.train import train

KEYS = {"dice_per_image", "dice_dataset", "iou_per_image", "iou_dataset", "loss", "num_images"}


@pytest.fixture(scope="module")
def checkpoint(packed, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    cfg = load_config(None, [{
        "data": {"shards": str(packed), "size": 32, "num_workers": 0},
        "model": {"width": 0.0625},
        "train": {"epochs": 1, "batch_size": 4, "precision": "no"},
        "run": {"out_dir": str(out), "name": "tiny"},
    }])  # fmt: skip
    train(cfg)
    return out / "tiny" / "best.pt"


def test_evaluate_writes_metrics_masks_and_overlays(checkpoint, packed, tmp_path):
    result = run_evaluate(str(checkpoint), str(packed), "test", str(tmp_path), str(tmp_path / "m"),
                          batch_size=5, num_workers=1)  # fmt: skip
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved.keys() >= KEYS and saved["num_images"] == 32 == result["num_images"]
    assert (
        0 <= saved["dice_dataset"] <= 1
        and 0 <= saved["iou_per_image"] <= saved["dice_per_image"] + 1e-9
    )
    masks = sorted((tmp_path / "m" / "masks").glob("*.png"))
    assert len(masks) == 32
    values = np.unique(np.concatenate([np.asarray(Image.open(p)).ravel() for p in masks]))
    assert set(values.tolist()) <= {0, 255}
    overlay = Image.open(tmp_path / "m" / "overlays" / masks[0].name)
    assert overlay.size[0] > 3 * 32 and overlay.mode == "RGB"  # image | truth | prediction


def test_evaluate_defaults_to_the_checkpoint_directory(checkpoint, packed):
    run_evaluate(str(checkpoint), str(packed), "val", num_workers=0)
    assert json.loads((checkpoint.parent / "metrics.json").read_text())["num_images"] == 4


def test_predict_keeps_original_resolution_and_skips_unreadable(checkpoint, synth_root, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    names = ["Abyssinian_34", "Egyptian_Mau_14", "staffordshire_bull_terrier_2"]  # GIF, RGBA, L
    for name in names:
        (src / f"{name}.jpg").write_bytes((synth_root / "images" / f"{name}.jpg").read_bytes())
    (src / "broken.jpg").write_bytes(b"not an image")
    (src / "._Abyssinian_34.jpg").write_bytes(b"\x00\x05\x16\x07 macOS junk")
    assert predict(str(checkpoint), str(src), str(tmp_path / "out")) == 3
    for name in names:
        original = Image.open(synth_root / "images" / f"{name}.jpg")
        mask = Image.open(tmp_path / "out" / f"{name}_mask.png")
        assert mask.size == original.size
        assert set(np.unique(np.asarray(mask)).tolist()) <= {0, 255}
        assert (tmp_path / "out" / f"{name}_overlay.png").exists()
    assert not (tmp_path / "out" / "broken_mask.png").exists()


def test_predict_on_one_unreadable_file_is_one_line(checkpoint, tmp_path, capsys):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"nope")
    with pytest.raises(SystemExit) as exit_:
        main(
            [
                "predict",
                "--checkpoint",
                str(checkpoint),
                "--input",
                str(bad),
                "--out",
                str(tmp_path / "o"),
            ]
        )
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad.jpg" in err[0]


def test_truncated_checkpoint_is_a_clear_error(checkpoint, tmp_path, capsys):
    cut = tmp_path / "cut.pt"
    cut.write_bytes(checkpoint.read_bytes()[:2000])
    with pytest.raises(SystemExit) as exit_:
        main(
            [
                "predict",
                "--checkpoint",
                str(cut),
                "--input",
                str(tmp_path),
                "--out",
                str(tmp_path / "o"),
            ]
        )
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cut.pt" in err[0] and "truncated" in err[0]


def test_evaluate_with_tta_reports_its_effect(checkpoint, packed, tmp_path):
    result = run_evaluate(
        str(checkpoint), str(packed), "test", str(tmp_path), tta=True, num_workers=0
    )
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["tta"] is True and saved["no_tta"].keys() >= KEYS
    plain = run_evaluate(str(checkpoint), str(packed), "test", str(tmp_path / "p"), num_workers=0)
    assert saved["no_tta"]["dice_per_image"] == pytest.approx(plain["dice_per_image"], abs=1e-9)
    assert result["loss"] != plain["loss"]  # averaged logits are other logits


def test_predict_runs_from_an_exported_file(checkpoint, synth_root, tmp_path):
    from dist_seg.export import export_checkpoint

    exported = tmp_path / "model.pt"
    export_checkpoint(checkpoint, "torchscript", exported)
    src = tmp_path / "in"
    src.mkdir()
    for name in ("Abyssinian_34", "beagle_116"):
        (src / f"{name}.jpg").write_bytes((synth_root / "images" / f"{name}.jpg").read_bytes())
    assert predict(None, str(src), str(tmp_path / "a"), exported=str(exported)) == 2
    assert predict(str(checkpoint), str(src), str(tmp_path / "b")) == 2
    for name in ("Abyssinian_34", "beagle_116"):
        a = np.asarray(Image.open(tmp_path / "a" / f"{name}_mask.png")).astype(int)
        b = np.asarray(Image.open(tmp_path / "b" / f"{name}_mask.png")).astype(int)
        assert (a != b).mean() < 0.001  # the same masks, up to float noise at the threshold


def test_evaluate_original_size_scores_against_the_original_masks(checkpoint, packed, synth_root, tmp_path):  # fmt: skip
    """--original-size: logits upsampled to each image's size, scored against the trimap read
    from the source files (not from the pack), checked with a few lines of numpy."""
    import torch
    import torch.nn.functional as F

    from dist_seg.checkpoint import model_from_checkpoint
    from dist_seg.data import pets
    from dist_seg.data.manifest import load_manifest
    from dist_seg.data.stream import build_loader

    result = run_evaluate(str(checkpoint), str(packed), "test", str(tmp_path), batch_size=5,
                          num_workers=1, original_size=True)  # fmt: skip
    full = result["original_size"]
    assert full.keys() >= KEYS and full["num_images"] == result["num_images"] == 32
    assert result["size"] == [32, 32]
    model, cfg, _ = model_from_checkpoint(str(checkpoint))
    model.eval()
    truth = {s.name: pets.trimap_to_mask(s.trimap, cfg.data.border)
             for s in pets.iter_split(synth_root, "test")}  # fmt: skip
    dice = []
    loader = build_loader(load_manifest(packed), "test", batch_size=5, train=False, size=32)
    with torch.no_grad():
        for batch in loader:
            logits = model(batch["image"].float() / 255)
            for name, lg in zip(batch["name"], logits):
                t = truth[name]
                pred = F.interpolate(lg[None], size=t.shape, mode="bilinear")[0, 0].numpy() > 0
                valid = t != 255
                p, g = pred & valid, (t == 1) & valid
                dice.append((2 * (p & g).sum() + 1e-7) / (p.sum() + g.sum() + 1e-7))
    assert full["dice_per_image"] == pytest.approx(np.mean(dice), abs=1e-6)
    assert len(dice) == 32
