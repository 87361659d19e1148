"""ImageNet ResNet34 weights from a local file in torchvision's exact key layout."""

from __future__ import annotations

import pytest
import torch

from dist_seg.errors import UserError
from dist_seg.models import ResNet34Encoder, ResNet34UNet
from dist_seg.models.pretrained import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    load_torchvision_resnet34,
    normalize_imagenet,
)


def torchvision_resnet34_shapes() -> dict[str, tuple[int, ...]]:
    """Key -> shape of ``torchvision.models.resnet34().state_dict()``, written out by hand."""
    shapes: dict[str, tuple[int, ...]] = {}

    def bn(prefix: str, c: int) -> None:
        for name in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{prefix}.{name}"] = (c,)
        shapes[f"{prefix}.num_batches_tracked"] = ()

    shapes["conv1.weight"] = (64, 3, 7, 7)
    bn("bn1", 64)
    c_in = 64
    for layer, (c, blocks) in enumerate([(64, 3), (128, 4), (256, 6), (512, 3)], start=1):
        for i in range(blocks):
            p = f"layer{layer}.{i}"
            shapes[f"{p}.conv1.weight"] = (c, c_in if i == 0 else c, 3, 3)
            bn(f"{p}.bn1", c)
            shapes[f"{p}.conv2.weight"] = (c, c, 3, 3)
            bn(f"{p}.bn2", c)
            if i == 0 and c != c_in:  # layers 2-4 start with a stride-2 block
                shapes[f"{p}.downsample.0.weight"] = (c, c_in, 1, 1)
                bn(f"{p}.downsample.1", c)
        c_in = c
    shapes["fc.weight"] = (1000, 512)
    shapes["fc.bias"] = (1000,)
    return shapes


def torchvision_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in torchvision_resnet34_shapes().items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.randint(1, 10**6, (), generator=g)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=g) + 0.5
        else:
            state[key] = torch.randn(shape, generator=g)
    return state


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("tv") / "resnet34.pth"
    torch.save(torchvision_state_dict(), path)
    return path


def test_layout_matches_torchvision_resnet34():
    shapes = torchvision_resnet34_shapes()
    assert len(shapes) == 218  # len(torchvision.models.resnet34().state_dict())
    params = sum(torch.Size(s).numel() for k, s in shapes.items() if "running" not in k
                 and "num_batches" not in k)  # fmt: skip
    assert params == 21_797_672  # torchvision's documented resnet34 parameter count


@pytest.mark.parametrize("stem_pool", [False, True])
def test_every_encoder_tensor_comes_from_the_file(weights_file, stem_pool):
    model = ResNet34UNet(stem_pool=stem_pool)
    decoder_before = {k: v.clone() for k, v in model.state_dict().items() if "encoder" not in k}
    load_torchvision_resnet34(model.encoder, weights_file)
    source = torchvision_state_dict()
    loaded = model.encoder.state_dict()
    assert set(loaded) == {k for k in source if not k.startswith("fc.")}
    for key, value in loaded.items():
        assert value.dtype == source[key].dtype and torch.equal(value, source[key]), key
    for key, value in model.state_dict().items():  # the decoder is left as it was
        if "encoder" not in key:
            assert torch.equal(value, decoder_before[key]), key


def test_files_without_num_batches_tracked_load(tmp_path):
    state = {k: v for k, v in torchvision_state_dict().items() if "num_batches" not in k}
    torch.save(state, tmp_path / "old.pth")
    encoder = ResNet34Encoder()
    load_torchvision_resnet34(encoder, tmp_path / "old.pth")
    assert torch.equal(encoder.conv1.weight, state["conv1.weight"])
    assert encoder.bn1.num_batches_tracked.item() == 0


def _bad(tmp_path, name, mutate):
    state = torchvision_state_dict()
    state = mutate(state)
    path = tmp_path / name
    torch.save(state, path)
    return path


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (
            lambda s: {k: v for k, v in s.items() if k != "layer3.2.bn2.running_var"},
            "missing layer3.2.bn2.running_var",
        ),
        (
            lambda s: {**s, "layer2.0.downsample.0.weight": torch.zeros(128, 64, 3, 3)},
            "wrong shape layer2.0.downsample.0.weight (128, 64, 3, 3) (expected (128, 64, 1, 1))",
        ),
        (lambda s: {**s, "layer5.0.conv1.weight": torch.zeros(1)}, "unexpected layer5.0.conv1"),
        (lambda s: {f"module.{k}": v for k, v in s.items()}, "missing conv1.weight"),
        (lambda s: {"state_dict": s, "epoch": 3}, "is not a state dict"),
        (lambda s: [1, 2, 3], "is not a state dict"),
    ],
    ids=["missing-key", "wrong-shape", "extra-key", "prefixed", "wrapped", "list"],
)
def test_files_that_do_not_fit_name_the_file(tmp_path, mutate, message):
    path = _bad(tmp_path, "bad.pth", mutate)
    encoder = ResNet34Encoder()
    before = encoder.conv1.weight.clone()
    with pytest.raises(UserError, match="bad.pth") as err:
        load_torchvision_resnet34(encoder, path)
    assert message in str(err.value)
    assert torch.equal(encoder.conv1.weight, before)  # nothing half-loaded


def test_truncated_and_missing_files(tmp_path, weights_file):
    cut = tmp_path / "cut.pth"
    cut.write_bytes(weights_file.read_bytes()[:100_000])
    with pytest.raises(UserError, match="cut.pth.*cannot be read"):
        load_torchvision_resnet34(ResNet34Encoder(), cut)
    (tmp_path / "text.pth").write_text("not a checkpoint")
    with pytest.raises(UserError, match="text.pth.*cannot be read"):
        load_torchvision_resnet34(ResNet34Encoder(), tmp_path / "text.pth")
    with pytest.raises(UserError, match="nope.pth not found"):
        load_torchvision_resnet34(ResNet34Encoder(), tmp_path / "nope.pth")


@pytest.mark.parametrize("kwargs", [{"width": 0.5}, {"in_channels": 4}], ids=["width", "in"])
def test_encoder_must_be_resnet34_at_width_1_on_rgb(weights_file, kwargs):
    with pytest.raises(UserError, match="resnet34.pth.*width") as err:
        load_torchvision_resnet34(ResNet34Encoder(**kwargs), weights_file)
    assert "model.width" in str(err.value)


def test_normalize_imagenet():
    images = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    out = normalize_imagenet(images)
    for c in range(3):
        expected = (images[:, c] - IMAGENET_MEAN[c]) / IMAGENET_STD[c]
        assert torch.allclose(out[:, c], expected)
    assert out.dtype == torch.float64 and out.shape == images.shape
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        normalize_imagenet(torch.rand(3, 8, 8))


def test_training_starts_from_the_file_with_imagenet_inputs(weights_file, packed, tmp_path):
    from dist_seg.checkpoint import load_checkpoint
    from dist_seg.config import load_config
    from dist_seg.train import train

    cfg = load_config(None, [{
        "data": {"shards": str(packed), "size": 32, "num_workers": 0},
        "model": {"name": "resnet34_unet", "pretrained": str(weights_file)},
        "optim": {"lr": 1e-12},
        "train": {"epochs": 1, "batch_size": 4, "precision": "no"},
        "run": {"out_dir": str(tmp_path), "name": "pre"},
    }])  # fmt: skip
    train(cfg)
    saved = load_checkpoint(tmp_path / "pre" / "last.pt")["model"]
    source = torch.load(weights_file, weights_only=True)
    for key in ("conv1.weight", "layer3.2.conv2.weight", "layer4.0.downsample.0.weight"):
        assert torch.allclose(saved[f"encoder.{key}"], source[key], atol=1e-6), key


def test_pretrained_is_refused_for_unet(weights_file):
    from dist_seg.config import load_config
    from dist_seg.errors import UserError

    with pytest.raises(UserError, match="model.pretrained"):
        load_config(None, [{"model": {"name": "unet", "pretrained": str(weights_file)}}])
