"""Flip TTA: equal to the plain output for a flip-equivariant model, the mean of the four
manually flipped passes for a real one."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dist_seg.models import build_model
from dist_seg.tta import FLIPS, flip_tta


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_flip_equivariant_model_is_unchanged():
    model = nn.Conv2d(3, 1, kernel_size=1)  # per pixel, so flip(model(flip(x))) == model(x)
    images = torch.rand(2, 3, 16, 24)
    with torch.no_grad():
        plain = model(images)
        tta = flip_tta(model, images)
    assert tta.shape == (2, 1, 16, 24)
    torch.testing.assert_close(tta, plain)


@pytest.mark.parametrize(("name", "kwargs"), [("unet", {}), ("resnet34_unet", {"stem_pool": True})])
def test_mean_of_the_four_flipped_passes(name, kwargs):
    model = build_model(name, width=0.0625, **kwargs).eval()
    images = torch.rand(2, 3, 32, 48)
    with torch.no_grad():
        tta = flip_tta(model, images)
        plain = model(images)
        manual = (
            plain
            + model(images.flip(3)).flip(3)
            + model(images.flip(2)).flip(2)
            + model(images.flip(2).flip(3)).flip(3).flip(2)
        ) / 4
    assert tta.shape == (2, 1, 32, 48) and tta.dtype == torch.float32
    torch.testing.assert_close(tta, manual)
    assert not torch.allclose(tta, plain)  # a real model is not flip-equivariant
    assert len(FLIPS) == 4


def test_disabled_is_the_plain_forward():
    calls = []

    def model(x):
        calls.append(x.shape)
        return x[:, :1] * 2

    images = torch.rand(1, 3, 8, 8)
    assert torch.equal(flip_tta(model, images, enabled=False), images[:, :1] * 2)
    assert len(calls) == 1
    flip_tta(model, images)
    assert len(calls) == 5


def test_half_precision_logits_are_averaged_in_float32():
    model = nn.Conv2d(3, 1, kernel_size=3, padding=1).to(torch.bfloat16)
    images = torch.rand(1, 3, 16, 16, dtype=torch.bfloat16)
    with torch.no_grad():
        out = flip_tta(model, images)
    assert out.dtype == torch.float32 and out.shape == (1, 1, 16, 16)
