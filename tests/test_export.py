"""`dist-seg export`: ONNX and TorchScript with dynamic batch and size, checked against PyTorch."""

from __future__ import annotations

import argparse
import json
import sys

import pytest
import torch

from dist_seg import export
from dist_seg.checkpoint import model_from_checkpoint, model_from_config, save_checkpoint
from dist_seg.cli import add_plugin, main
from dist_seg.config import load_config
from dist_seg.data.pets import load_sample, read_split
from dist_seg.data.synth import make_synthetic
from dist_seg.errors import UserError
from dist_seg.export import export_checkpoint, exported_size, load_exported
from dist_seg.models.pretrained import normalize_imagenet
from dist_seg.predict import predict_mask

MODELS = [
    pytest.param("unet", {}, id="unet"),
    pytest.param("resnet34_unet", {}, id="resnet34_unet"),
    pytest.param("resnet34_unet", {"stem_pool": True}, id="resnet34_unet-stem_pool"),
]
FORMATS = ["onnx", "torchscript"]
# The test split of the default synthetic check set: PNG RGBA and RGB named .jpg, two JPEGs.
SYNTH_TEST = ["Abyssinian_5", "Egyptian_Mau_156", "Maine_Coon_1", "staffordshire_bull_terrier_1"]


def make_checkpoint(path, name, size=32, **model):
    """A checkpoint as train writes it (model + config), with non-trivial norm statistics."""
    cfg = load_config(None, [{"model": {"name": name, "width": 0.0625, **model},
                              "data": {"size": size}}])  # fmt: skip
    torch.manual_seed(0)
    net = model_from_config(cfg)
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    save_checkpoint({"model": net.state_dict(), "config": cfg.to_dict()}, path)
    return path


def _needs(fmt):
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
        pytest.importorskip("onnx")


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(("name", "kwargs"), MODELS)
def test_export_is_checked_and_runs_at_other_batch_and_size(tmp_path, fmt, name, kwargs):
    _needs(fmt)
    ckpt = make_checkpoint(tmp_path / "best.pt", name, **kwargs)
    out = tmp_path / "out" / f"model.{fmt}"
    report = export_checkpoint(ckpt, fmt, out)
    saved = json.loads((tmp_path / "out" / f"model.{fmt}.json").read_text())
    assert saved == json.loads(json.dumps(report))
    assert [c["shape"] for c in saved["checks"]] == [[1, 3, 32, 32], [2, 3, 64, 48]]
    assert saved["max_abs_diff"] < 1e-4 and saved["tolerance"] == 1e-3
    assert saved["model"] == name and saved["image_size"] == 32 and saved["format"] == fmt
    assert saved["traced_at"][0] == 1  # traced at batch 1, one size: the rest is dynamic
    assert saved["check_data"].startswith("synthetic")
    small = pytest.approx(0, abs=1e-4)
    assert saved["checks_real"] == [
        {"shape": [4, 3, 32, 32], "images": SYNTH_TEST, "max_abs_diff": small},
        {"shape": [1, 3, 64, 64], "images": SYNTH_TEST[:1], "max_abs_diff": small},
    ]
    assert 0 <= saved["max_abs_diff_real"] < 1e-4  # finite: NaN fails both

    model, _, _ = model_from_checkpoint(ckpt)
    model.eval()
    exported = load_exported(out)
    assert exported.format == fmt and exported.image_size == 32 == exported_size(out)
    g = torch.Generator().manual_seed(5)
    for shape in [(2, 3, 64, 48), (3, 3, 48, 80), (1, 3, 32, 32)]:
        images = torch.rand(shape, generator=g)
        with torch.no_grad():
            expected = model(images)
        got = exported(images)
        assert got.shape == (shape[0], 1, *shape[2:]) and got.dtype == torch.float32
        assert (got - expected).abs().max().item() < 1e-4, shape
        assert torch.equal(exported(images.numpy()), got)  # numpy in, same logits out
    assert not list(tmp_path.glob("out/.*"))  # no temporary file left


def test_onnx_metadata_props(tmp_path):
    _needs("onnx")
    import onnx

    out = tmp_path / "m.onnx"
    export_checkpoint(make_checkpoint(tmp_path / "c.pt", "resnet34_unet", size=48), "onnx", out)
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert props["image_size"] == "48" and props["model"] == "resnet34_unet"
    assert json.loads(props["dist_seg"])["width"] == 0.0625
    assert exported_size(out) == 48


@pytest.mark.parametrize("fmt", FORMATS)
def test_cli_subcommand(tmp_path, fmt, capsys):
    _needs(fmt)
    parser = argparse.ArgumentParser()
    add_plugin(parser.add_subparsers(dest="command"), "export")
    out = tmp_path / f"unet.{fmt}"
    args = parser.parse_args(["export", "--checkpoint", str(make_checkpoint(tmp_path / "c.pt",
                              "unet")), "--format", fmt, "--out", str(out)])  # fmt: skip
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert out.is_file() and f"as {fmt} to {out}" in printed
    assert "on 4 real-layout images (synthetic" in printed


@pytest.mark.parametrize("fmt", FORMATS)
def test_difference_above_tolerance_writes_nothing(tmp_path, fmt, monkeypatch):
    _needs(fmt)
    monkeypatch.setattr(export, "TOLERANCE", -1.0)
    out = tmp_path / f"m.{fmt}"
    with pytest.raises(UserError, match=f"the {fmt} export of .*c.pt differs"):
        export_checkpoint(make_checkpoint(tmp_path / "c.pt", "unet"), fmt, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_trace_that_does_not_generalize_is_caught(tmp_path, fmt, monkeypatch):
    """Traced at 32 (no decoder resize), stem_pool's 48-px side needs one: the check fails."""
    _needs(fmt)
    monkeypatch.setitem(export.TRACE_SIDE, "resnet34_unet", 32)
    ckpt = make_checkpoint(tmp_path / "c.pt", "resnet34_unet", stem_pool=True)
    with pytest.raises(UserError, match=r"fails on images \[2, 3, 64, 48\]"):
        export_checkpoint(ckpt, fmt, tmp_path / "m")
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("fmt", FORMATS)
def test_imagenet_normalization_is_inside_the_export(tmp_path, fmt, monkeypatch):
    _needs(fmt)
    monkeypatch.setattr(export, "uses_imagenet_norm", lambda cfg: True)
    ckpt = make_checkpoint(tmp_path / "c.pt", "resnet34_unet")
    export_checkpoint(ckpt, fmt, tmp_path / "m")
    model, _, _ = model_from_checkpoint(ckpt)
    images = torch.rand(2, 3, 32, 48)
    with torch.no_grad():
        expected = model.eval()(normalize_imagenet(images))
    exported = load_exported(tmp_path / "m")
    assert exported.meta["imagenet_norm"] is True
    assert (exported(images) - expected).abs().max().item() < 1e-4


def test_real_layout_images_are_what_predict_feeds_the_model(tmp_path):
    """--check-data: the first 4 test images, each the very tensor predict_mask passes on."""
    root = tmp_path / "pets"
    make_synthetic(root, num_images=8, seed=1)
    source, [(names, images), (first, larger)] = export._real_layout_inputs(root, 32)
    assert source == str(root) and first == names[:1]
    assert names == [r.name for r in read_split(root, "test")][:4]
    assert images.shape == (4, 3, 32, 32) and larger.shape == (1, 3, 64, 64)
    seen = []

    def model(x):
        seen.append(x)
        return torch.zeros(x.shape[0], 1, *x.shape[2:])

    for name, x in zip(names, images):
        predict_mask(model, load_sample(root, name).image, 32)
        assert torch.equal(seen[-1], x[None])
    predict_mask(model, load_sample(root, names[0]).image, 64)
    assert torch.equal(seen[-1], larger)


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_difference_on_real_layout_images_only_is_caught(tmp_path, fmt, monkeypatch):
    """The exported model is off by 0.01 on the real-layout images alone: no export."""
    _needs(fmt)
    real, real_layout_inputs, call = [], export._real_layout_inputs, export.ExportedModel.__call__

    def recorded(*args):
        source, batches = real_layout_inputs(*args)
        real.extend(images for _, images in batches)
        return source, batches

    def off_on_real(self, images):
        return call(self, images) + (0.01 if any(images is r for r in real) else 0.0)

    monkeypatch.setattr(export, "_real_layout_inputs", recorded)
    monkeypatch.setattr(export.ExportedModel, "__call__", off_on_real)
    with pytest.raises(UserError, match=r"by 0.01 \(> 0.001\) on real-layout \(synthetic") as err:
        export_checkpoint(make_checkpoint(tmp_path / "c.pt", "unet"), fmt, tmp_path / "m")
    assert "Abyssinian_5" in str(err.value) and "\n" not in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt"]


@pytest.mark.parametrize("check_data", ["not-pets", "missing"])
def test_check_data_that_is_not_a_pets_root_is_one_line_and_writes_nothing(
    tmp_path, check_data, capsys
):
    (tmp_path / "not-pets" / "images").mkdir(parents=True)
    (tmp_path / "not-pets" / "images" / "cat.jpg").write_bytes(b"not read")
    ckpt = make_checkpoint(tmp_path / "c.pt", "unet")
    out = tmp_path / "m.pt"
    out.write_bytes(b"an earlier export")
    with pytest.raises(SystemExit) as exit_:
        main(["export", "--checkpoint", str(ckpt), "--format", "torchscript", "--out", str(out),
              "--check-data", str(tmp_path / check_data)])  # fmt: skip
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1
    assert err.startswith(f"dist-seg: error: --check-data {tmp_path / check_data}: ")
    assert "not an Oxford-IIIT Pet root" in err
    assert out.read_bytes() == b"an earlier export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt", "m.pt", "not-pets"]


def test_onnx_without_onnx_installed_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx -> ImportError
    with pytest.raises(UserError, match=r'pip install -e "\.\[export\]"'):
        export_checkpoint(tmp_path / "c.pt", "onnx", tmp_path / "m.onnx")


def test_load_exported_rejects_other_files(tmp_path):
    with pytest.raises(UserError, match="nope.onnx not found"):
        load_exported(tmp_path / "nope.onnx")
    ckpt = make_checkpoint(tmp_path / "best.pt", "unet")  # a zip, but not an export
    with pytest.raises(UserError, match="best.pt has no dist_seg metadata"):
        load_exported(ckpt)
    pytest.importorskip("onnxruntime")
    (tmp_path / "junk.onnx").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(UserError, match="junk.onnx is neither"):
        exported_size(tmp_path / "junk.onnx")
