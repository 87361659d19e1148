"""Models at small widths on 32x32 inputs; parameter counts pinned at full width."""

import pytest
import torch

from dist_seg.errors import UserError
from dist_seg.models import (
    MODELS,
    ResNet34Encoder,
    ResNet34UNet,
    UNet,
    build_model,
    count_parameters,
)

SMALL = 0.125
MODEL_KWARGS = [
    pytest.param("unet", {}, id="unet"),
    pytest.param("resnet34_unet", {}, id="resnet34_unet"),
    pytest.param("resnet34_unet", {"stem_pool": True}, id="resnet34_unet-stem_pool"),
]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize(
    ("cls", "expected"), [(UNet, 31_037_633), (ResNet34UNet, 23_613_313)], ids=["unet", "r34"]
)
def test_parameter_count_at_full_width(cls, expected):
    assert count_parameters(cls()) == expected


def test_stem_pool_does_not_change_parameter_count():
    assert count_parameters(ResNet34UNet(width=SMALL, stem_pool=True)) == count_parameters(
        ResNet34UNet(width=SMALL)
    )


@pytest.mark.parametrize("name", MODELS)
def test_width_scales_parameter_count_monotonically(name):
    counts = [count_parameters(build_model(name, width=w)) for w in (0.0625, 0.125, 0.25, 0.5)]
    assert counts == sorted(counts) and len(set(counts)) == len(counts)


@pytest.mark.parametrize(("name", "kwargs"), MODEL_KWARGS)
@pytest.mark.parametrize("shape", [(2, 3, 32, 32), (1, 3, 32, 48)], ids=["32x32", "32x48"])
def test_forward_returns_one_logit_per_pixel(name, kwargs, shape):
    model = build_model(name, width=SMALL, **kwargs).eval()
    with torch.no_grad():
        y = model(torch.randn(shape))
    assert y.shape == (shape[0], 1, *shape[2:])


@pytest.mark.parametrize("in_channels", [1, 4])
@pytest.mark.parametrize("name", MODELS)
def test_in_and_out_channels(name, in_channels):
    model = build_model(name, in_channels=in_channels, out_channels=2, width=SMALL).eval()
    with torch.no_grad():
        y = model(torch.randn(1, in_channels, 32, 32))
    assert y.shape == (1, 2, 32, 32)


def test_full_width_forward_on_a_small_input():
    for model in (UNet(), ResNet34UNet()):
        with torch.no_grad():
            y = model.eval()(torch.randn(1, 3, 32, 32))
        assert y.shape == (1, 1, 32, 32)


def test_unet_rejects_sizes_not_divisible_by_16():
    with pytest.raises(ValueError, match="divisible by 16"):
        UNet(width=SMALL)(torch.randn(1, 3, 32, 40))


@pytest.mark.parametrize(("name", "kwargs"), MODEL_KWARGS)
def test_channels_last_matches_contiguous(name, kwargs):
    model = build_model(name, width=SMALL, **kwargs).eval()
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        expected = model(x)
        model = model.to(memory_format=torch.channels_last)
        actual = model(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("stem_pool", "strides"), [(False, (2, 2, 4, 8, 16)), (True, (2, 4, 8, 16, 32))]
)
def test_encoder_features_have_documented_channels_and_strides(stem_pool, strides):
    encoder = ResNet34Encoder(width=SMALL, stem_pool=stem_pool).eval()
    assert encoder.strides == strides
    assert encoder.channels == (8, 8, 16, 32, 64)
    with torch.no_grad():
        features = encoder(torch.randn(1, 3, 64, 96))
    assert [f.shape for f in features] == [
        (1, c, 64 // s, 96 // s) for c, s in zip(encoder.channels, encoder.strides, strict=True)
    ]


@pytest.mark.parametrize(("name", "kwargs"), MODEL_KWARGS)
def test_gradient_reaches_every_parameter(name, kwargs):
    model = build_model(name, width=SMALL, **kwargs).train()
    model(torch.randn(2, 3, 32, 32)).mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing


def test_build_model_alias():
    model = build_model("resnet34", width=SMALL)
    assert isinstance(model, ResNet34UNet)


def test_build_model_unknown_name_lists_valid_names():
    with pytest.raises(UserError, match="unet, resnet34_unet") as info:
        build_model("vgg")
    assert "\n" not in str(info.value)
