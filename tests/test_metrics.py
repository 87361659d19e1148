"""Every metric in dist_seg.metrics against hand-computed answers, then once against an
independent numpy implementation on random masks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dist_seg import metrics

EPS = 1e-7
Z = 4.0  # logit magnitude: sigmoid(4) = 0.982 (float32 BCE of it is exact to 1e-6)
BCE_RIGHT = math.log1p(math.exp(-Z))  # BCE of a confident right pixel
BCE_WRONG = Z + BCE_RIGHT  # ... and of a confident wrong one


def _logits(pred: list[list[int]]) -> torch.Tensor:
    return (torch.tensor(pred, dtype=torch.float32) * 2 - 1).mul(Z)[None, None]


def _mask(truth: list[list[int]]) -> torch.Tensor:
    return torch.tensor(truth, dtype=torch.uint8)[None]


# (truth, prediction, intersection, predicted area, true area, valid pixels, wrong valid
# pixels), counted by hand; Dice = (2i + EPS) / (p + t + EPS), IoU = (i + EPS) / (p + t - i + EPS)
# (the seed's epsilon: an empty prediction of an empty truth scores 1).
CASES = {
    "overlap": ([[1, 1, 0], [0, 0, 0]], [[1, 0, 0], [0, 0, 1]], 1, 2, 2, 6, 2),
    "both_empty": ([[0, 0, 0], [0, 0, 0]], [[0, 0, 0], [0, 0, 0]], 0, 0, 0, 6, 0),
    "empty_truth": ([[0, 0, 0], [0, 0, 0]], [[1, 1, 0], [0, 0, 0]], 0, 2, 0, 6, 2),
    "empty_prediction": ([[1, 1, 1], [0, 0, 0]], [[0, 0, 0], [0, 0, 0]], 0, 0, 3, 6, 3),
    # 255 pixels count nowhere: valid (0,0) (0,2) (1,1) (1,2); pred {00, 02}, truth {00, 11}
    "ignore": ([[1, 255, 0], [255, 1, 0]], [[1, 1, 1], [0, 0, 0]], 1, 2, 2, 4, 2),
    "all_ignored": ([[255, 255, 255], [255, 255, 255]], [[1, 1, 0], [0, 0, 0]], 0, 0, 0, 0, 0),
    "perfect": ([[1, 0, 1], [0, 1, 0]], [[1, 0, 1], [0, 1, 0]], 3, 3, 3, 6, 0),
}


def _dice(i, p, t):
    return (2 * i + EPS) / (p + t + EPS)


def _iou(i, p, t):
    return (i + EPS) / (p + t - i + EPS)


def test_hand_counts_give_the_textbook_values():
    assert _dice(1, 2, 2) == pytest.approx(0.5) and _iou(1, 2, 2) == pytest.approx(1 / 3)
    assert _dice(0, 0, 0) == 1 and _iou(0, 0, 0) == 1  # both empty: perfect
    assert _dice(0, 2, 0) < 1e-7 and _dice(0, 0, 3) < 1e-7  # one empty: zero


@pytest.mark.parametrize("case", CASES)
def test_metric_known_answers(case):
    truth, pred, i, p, t, valid, wrong = CASES[case]
    dice, iou = _dice(i, p, t), _iou(i, p, t)
    logits, mask = _logits(pred), _mask(truth)
    assert metrics.per_image_dice(logits, mask).item() == pytest.approx(dice, abs=1e-12)
    s = metrics.summarize(metrics.batch_stats(logits, mask))
    assert s["num_images"] == 1
    assert s["dice_per_image"] == pytest.approx(dice, abs=1e-12)
    assert s["iou_per_image"] == pytest.approx(iou, abs=1e-12)
    assert s["dice_dataset"] == pytest.approx(dice, abs=1e-12)  # one image: the same
    assert s["iou_dataset"] == pytest.approx(iou, abs=1e-12)
    if valid:
        loss = (wrong * BCE_WRONG + (valid - wrong) * BCE_RIGHT) / valid
        assert s["loss"] == pytest.approx(loss, rel=1e-5)
    else:
        assert math.isnan(s["loss"])
    bce = metrics.masked_bce(logits, (mask == 1).float()[:, None], (mask != 255).float()[:, None])
    assert bce.item() == pytest.approx(wrong * BCE_WRONG + (valid - wrong) * BCE_RIGHT, rel=1e-5)


def test_dataset_level_sums_pixels_per_image_averages_images():
    cases = [CASES["overlap"], CASES["empty_truth"], CASES["ignore"]]
    logits = torch.cat([_logits(c[1]) for c in cases])
    mask = torch.cat([_mask(c[0]) for c in cases])
    s = metrics.summarize(metrics.batch_stats(logits, mask))
    # intersections 1 + 0 + 1; predicted 2 + 2 + 2; true 2 + 0 + 2
    assert s["dice_dataset"] == pytest.approx((2 * 2 + EPS) / (6 + 4 + EPS))
    assert s["iou_dataset"] == pytest.approx((2 + EPS) / (6 + 4 - 2 + EPS))
    assert s["dice_per_image"] == pytest.approx(np.mean([_dice(*c[2:5]) for c in cases]))
    assert s["iou_per_image"] == pytest.approx(np.mean([_iou(*c[2:5]) for c in cases]))
    # Summing two halves' statistics (two ranks) gives the same as one pass.
    halves = metrics.batch_stats(logits[:1], mask[:1]) + metrics.batch_stats(logits[1:], mask[1:])
    assert metrics.summarize(halves) == pytest.approx(s)


def _numpy_reference(logits: np.ndarray, mask: np.ndarray) -> dict:
    """Dice/IoU written independently: per image over valid pixels, then over the data set."""
    pred, valid = logits[:, 0] > 0, mask != 255
    p, t = pred & valid, (mask == 1) & valid
    inter = (p & t).sum((1, 2)).astype(float)
    ps, ts = p.sum((1, 2)).astype(float), t.sum((1, 2)).astype(float)
    prob = 1 / (1 + np.exp(-logits[:, 0].astype(float)))
    bce = -(t * np.log(prob) + (~t & valid) * np.log(1 - prob))
    return {
        "dice_per_image": np.mean((2 * inter + EPS) / (ps + ts + EPS)),
        "iou_per_image": np.mean((inter + EPS) / (ps + ts - inter + EPS)),
        "dice_dataset": (2 * inter.sum() + EPS) / (ps.sum() + ts.sum() + EPS),
        "iou_dataset": (inter.sum() + EPS) / (ps.sum() + ts.sum() - inter.sum() + EPS),
        "loss": bce[valid].sum() / valid.sum(),
    }


def test_metrics_match_an_independent_numpy_implementation():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2, (6, 1, 17, 23)).astype(np.float32)
    mask = rng.choice(np.array([0, 1, 255], np.uint8), (6, 17, 23), p=[0.5, 0.4, 0.1])
    mask[0] = 0  # an empty truth
    logits[1] = -5  # an empty prediction
    got = metrics.summarize(metrics.batch_stats(torch.from_numpy(logits), torch.from_numpy(mask)))
    want = _numpy_reference(logits, mask)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-5), key
