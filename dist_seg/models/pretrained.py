"""ImageNet weights for the ResNet34 encoder, read from a local torchvision ``resnet34`` file.

The file is a torchvision ``resnet34`` state dict saved with ``torch.save`` (for example
``torch.save(torchvision.models.resnet34(weights="IMAGENET1K_V1").state_dict(), path)``);
nothing is downloaded. ``ResNet34Encoder`` names its modules as torchvision does
(``conv1``, ``bn1``, ``layer1``..``layer4`` of ``BasicBlock``s with ``conv1``, ``bn1``,
``conv2``, ``bn2`` and ``downsample.0``/``.1``), so every encoder key is the torchvision key
of the same name; only the classifier (``fc.*``) is left out. A model that starts from these
weights expects inputs normalized as ImageNet's: ``normalize_imagenet``.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from torch import Tensor

from dist_seg.errors import UserError
from dist_seg.models.resnet34_unet import ResNet34Encoder

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

UNUSED_PREFIXES = ("fc.",)  # torchvision's classifier: no counterpart in the encoder
RESNET34_CHANNELS = (64, 64, 128, 256, 512)  # ResNet34Encoder.channels at width 1


def normalize_imagenet(images: Tensor) -> Tensor:
    """``(images - mean) / std`` per channel for float images in [0, 1] of shape [B, 3, H, W]."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape [B, 3, H, W], got {tuple(images.shape)}")
    mean, std = _imagenet_stats(images.dtype, images.device)
    return (images - mean) / std


@functools.cache
def _imagenet_stats(dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    """Mean and std [3, 1, 1], made once per dtype and device: a tensor built from Python
    numbers is a blocking host-to-device copy, which every training step would pay."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=dtype, device=device)[:, None, None]
    std = torch.tensor(IMAGENET_STD, dtype=dtype, device=device)[:, None, None]
    return mean, std


def uses_imagenet_norm(cfg) -> bool:
    """Whether a run's models see ImageNet-normalized inputs: it started from ImageNet weights
    (``model.pretrained`` names the file). Train, evaluate, predict and export all ask this."""
    return bool(cfg.model.pretrained)


def load_torchvision_resnet34(encoder: ResNet34Encoder, path: str | Path) -> None:
    """Copy a torchvision ``resnet34`` state dict from ``path`` into ``encoder``, in place.

    Every encoder parameter and buffer must come from the file with the same shape, and every
    key of the file must be used except ``fc.*``; anything else is a UserError naming the
    file. One leniency, as ``nn.BatchNorm2d`` has for old state dicts: files saved before
    PyTorch 0.4.1 have no ``*.num_batches_tracked``; those counters start at 0.
    """
    path = Path(path)
    if encoder.channels != RESNET34_CHANNELS or encoder.conv1.in_channels != 3:
        raise UserError(
            f"ImageNet weights ({path}) fit only a width-1.0 encoder on 3-channel images; this "
            f"one has channels {encoder.channels} and {encoder.conv1.in_channels} input "
            "channels: set model.width to 1.0"
        )
    source = _read_state_dict(path)
    target = encoder.state_dict()
    unused = [k for k in source if k not in target and not k.startswith(UNUSED_PREFIXES)]
    missing = [k for k in target if k not in source and not k.endswith(".num_batches_tracked")]
    wrong = [
        f"{k} {tuple(source[k].shape)} (expected {tuple(t.shape)})"
        for k, t in target.items()
        if k in source and source[k].shape != t.shape
    ]
    problems = [
        f"{label} {_first(items)}"
        for label, items in (("missing", missing), ("unexpected", unused), ("wrong shape", wrong))
        if items
    ]
    if problems:
        raise UserError(f"{path} is not a torchvision resnet34 state dict: {'; '.join(problems)}")
    weights = {k: source.get(k, torch.zeros_like(t)) for k, t in target.items()}
    encoder.load_state_dict(weights, strict=True)


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    from dist_seg.checkpoint import read_torch_file

    state = read_torch_file(path, "pretrained weights")
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()
    ):
        raise UserError(
            f"{path} is not a state dict (a dict of name -> tensor); save one with "
            "torch.save(torchvision.models.resnet34(weights='IMAGENET1K_V1').state_dict(), path)"
        )
    return state


def _first(items: list[str], n: int = 3) -> str:
    more = f" and {len(items) - n} more" if len(items) > n else ""
    return ", ".join(items[:n]) + more
