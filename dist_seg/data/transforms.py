"""Batch transforms on the device: uint8 -> float, and the seed's paired flips.

The loader ships uint8 (4x less to copy than float32); normalizing and flipping on the
device costs next to nothing there and keeps decode workers on decoding.
"""

from __future__ import annotations

import torch


def to_device(
    batch: dict, device, channels_last: bool = True, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """(images [B,3,H,W] in [0,1] as ``dtype``, masks uint8 [B,H,W]) on ``device``. ``dtype``
    is the model's (bf16 weights under DeepSpeed bf16; autocast handles the rest)."""
    # Per tensor: with data.decode=gpu the images are on the device already, the masks
    # pinned; a copy from pinned memory does not wait, one from pageable memory does.
    images = batch["image"].to(device, non_blocking=batch["image"].is_pinned())
    masks = batch["mask"].to(device, non_blocking=batch["mask"].is_pinned())
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    images = images.to(dtype=dtype, memory_format=memory_format).div_(255.0)
    return images, masks


def random_flips(
    images: torch.Tensor, masks: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Horizontal and vertical flips, each with p=0.5 per sample, the same for image and mask.

    The coin flips come from a generator on the images' device that the caller seeds from
    (seed, epoch, step, rank), so a resumed run flips exactly as an uninterrupted one would,
    and no coin is copied from the host (a blocking copy every step).
    """
    h, v = torch.rand(2, images.shape[0], generator=generator, device=images.device) < 0.5
    images = torch.where(h[:, None, None, None], images.flip(3), images)
    masks = torch.where(h[:, None, None], masks.flip(2), masks)
    images = torch.where(v[:, None, None, None], images.flip(2), images)
    masks = torch.where(v[:, None, None], masks.flip(1), masks)
    return images, masks
