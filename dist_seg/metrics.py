"""Segmentation metrics from sufficient statistics, reduced once across ranks, then computed.

Never averages per-rank means: each rank sums per-image Dice/IoU, intersections, areas,
loss sums and counts in float64; one all-reduce of that vector gives exact global values
at any world size (a rank with no samples contributes zeros).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

EPS = 1e-7  # the seed's epsilon: an empty prediction of an empty truth scores Dice 1
IGNORE_INDEX = 255
FIELDS = (
    "dice_sum",  # sum over images of per-image Dice
    "iou_sum",  # sum over images of per-image IoU
    "images",
    "intersection",  # dataset-level sums over every valid pixel
    "pred_area",
    "true_area",
    "loss_sum",  # BCE summed over valid pixels
    "pixels",  # valid pixels (not ignored)
)


def masked_bce(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Per-pixel BCE-with-logits summed over valid pixels (float32 for stable sums)."""
    loss = F.binary_cross_entropy_with_logits(logits.float(), target, reduction="none")
    return (loss * valid).sum()


def _areas(logits: torch.Tensor, mask: torch.Tensor):
    """Per-image intersection, predicted and true areas [B] (float64), target and valid maps."""
    mask = mask.unsqueeze(1)
    valid = (mask != IGNORE_INDEX).float()
    target = (mask == 1).float()
    pred = (logits > 0).float() * valid  # sigmoid(x) > 0.5  <=>  x > 0
    dims = (1, 2, 3)
    inter = (pred * target).sum(dim=dims, dtype=torch.float64)
    p = pred.sum(dim=dims, dtype=torch.float64)
    t = target.sum(dim=dims, dtype=torch.float64)
    return inter, p, t, target, valid


def per_image_dice(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B] per-image Dice. logits [B,1,H,W]; mask [B,H,W] uint8 0/1/255."""
    inter, p, t, _, _ = _areas(logits, mask)
    return (2 * inter + EPS) / (p + t + EPS)


def batch_stats(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The FIELDS vector (float64) of one batch. logits [B,1,H,W]; mask [B,H,W] uint8 0/1/255."""
    inter, p, t, target, valid = _areas(logits, mask)
    dice = (2 * inter + EPS) / (p + t + EPS)
    iou = (inter + EPS) / (p + t - inter + EPS)
    return torch.stack(
        [
            dice.sum(),
            iou.sum(),
            torch.full((), len(inter), dtype=torch.float64, device=logits.device),  # no copy
            inter.sum(),
            p.sum(),
            t.sum(),
            masked_bce(logits, target, valid).double(),
            valid.sum(dtype=torch.float64),
        ]
    )


def zeros(device) -> torch.Tensor:
    return torch.zeros(len(FIELDS), dtype=torch.float64, device=device)


def summarize(stats: torch.Tensor) -> dict[str, float]:
    """Named metrics from a reduced FIELDS vector."""
    s = dict(zip(FIELDS, stats.tolist()))
    n = s["images"]
    return {
        "dice_per_image": s["dice_sum"] / n if n else float("nan"),
        "dice_dataset": (2 * s["intersection"] + EPS) / (s["pred_area"] + s["true_area"] + EPS),
        "iou_per_image": s["iou_sum"] / n if n else float("nan"),
        "iou_dataset": (s["intersection"] + EPS)
        / (s["pred_area"] + s["true_area"] - s["intersection"] + EPS),
        "loss": s["loss_sum"] / s["pixels"] if s["pixels"] else float("nan"),
        "num_images": int(n),
    }
