"""Small pieces shared by both models."""

from collections.abc import Callable

from torch import nn

NormLayer = Callable[[int], nn.Module]
"""Builds a normalization layer from a channel count, e.g. ``nn.BatchNorm2d``."""


def scale_channels(channels: int, width: float) -> int:
    """The channel count of a layer in a model scaled by ``width`` (at least 1)."""
    return max(1, round(channels * width))
