"""Flip test-time augmentation: the mean of the logits over the seed's four flip views.

Training flips images horizontally and vertically (``data.flip``), so at test time the model
sees each image as-is, flipped left-right, flipped up-down and both; each output is flipped
back before the four are averaged. Four forward passes per batch, one at a time (no 4x
batch in memory).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

FLIPS: tuple[tuple[int, ...], ...] = ((), (-1,), (-2,), (-2, -1))
"""The dims each view flips: identity, horizontal (W), vertical (H), both."""


def flip_tta(
    model: Callable[[Tensor], Tensor],
    images: Tensor,
    enabled: bool = True,
    identity: Tensor | None = None,
) -> Tensor:
    """Logits [B, 1, H, W] for images [B, C, H, W]: ``model(images)`` when not ``enabled``,
    else the float32 mean over ``FLIPS`` of ``flip(model(flip(images)))``.

    ``model`` is any callable from images to logits of the same height and width: a module
    (put it in eval mode first) or an exported model from ``export.load_exported``.
    ``identity``: ``model(images)`` when the caller already has it (saves one pass).
    """
    if not enabled:
        return model(images)
    total = None
    for dims in FLIPS:
        view = images.flip(dims) if dims else images
        logits = (identity if identity is not None and not dims else model(view)).float()
        logits = logits.flip(dims) if dims else logits  # back to the original orientation
        total = logits if total is None else total + logits
    return total / len(FLIPS)
