"""Pictures a person looks at: learning curves, run comparisons, masks and overlays.

Plots use matplotlib's object API (`Figure` + `FigureCanvasAgg`), never pyplot, so drawing
touches no global backend or figure registry and is safe from any thread or process.
Every file is written atomically: a temporary file in the same folder, then `os.replace`,
so a reader (an image viewer refreshing the curve each epoch) never sees half a PNG.

Masks are HxW arrays: bool, or integers where 1 is foreground and 0 background; the
ignore value 255 counts as not-foreground for drawing.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image

IGNORE = 255  # mask value excluded from loss and metrics; drawn as background
GAP = 4  # white pixels between side-by-side panels
RED = (255, 0, 0)
GREEN = (0, 200, 0)
YELLOW = (255, 230, 0)
_MARKERS_UP_TO = 40  # draw point markers while a curve has at most this many epochs


# ---------------------------------------------------------------- files


def _write_atomic(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Call `write(fh)` on a temporary file next to `path`, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp makes the file 0600; give it the mode open() would (0666 less the umask,
        # 0644 usually) like every other file of a run. The umask is read by setting it.
        umask = os.umask(0o022)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as fh:
            write(fh)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _save_figure(fig: Figure, path: Path) -> None:
    FigureCanvasAgg(fig)  # attaches itself to the figure
    fmt = Path(path).suffix.lstrip(".").lower() or "png"
    _write_atomic(path, lambda fh: fig.savefig(fh, format=fmt))


def save_png(array: np.ndarray, path: Path) -> None:
    """Write an HxW or HxWx3 uint8 array as a PNG, creating parent folders."""
    image = Image.fromarray(np.ascontiguousarray(array))
    _write_atomic(path, lambda fh: image.save(fh, format="PNG"))


def save_mask_png(mask: np.ndarray, path: Path) -> None:
    """Write an HxW {0,1} mask (bool or integer) as a single-channel PNG with values 0/255."""
    if mask.ndim != 2:
        raise ValueError(f"mask must be HxW, got shape {mask.shape}")
    save_png(_foreground(mask).astype(np.uint8) * 255, path)


# ---------------------------------------------------------------- curves


def _series(history: Sequence[dict], key: str) -> np.ndarray:
    """One column of the history as floats; missing or None entries become NaN."""
    values = []
    for row in history:
        v = row.get(key)
        values.append(math.nan if v is None else float(v))
    return np.asarray(values, dtype=np.float64)


def _best(epochs: np.ndarray, dice: np.ndarray) -> tuple[int, float] | None:
    """(epoch, value) of the highest finite Dice; the earliest wins a tie."""
    if not np.isfinite(dice).any():
        return None
    i = int(np.nanargmax(np.where(np.isfinite(dice), dice, np.nan)))
    return int(epochs[i]), float(dice[i])


def _line(ax: Axes, x: np.ndarray, y: np.ndarray, **kw) -> None:
    marker = "o" if len(x) <= _MARKERS_UP_TO else None
    ax.plot(x, y, marker=marker, markersize=3, linewidth=1.5, **kw)


def _style(ax: Axes, title: str, ylabel: str, last_epoch: int, ys: list[np.ndarray]) -> None:
    """Titles, integer epoch ticks, and limits with a margin: loss from 0, Dice up to 1."""
    ax.set_title(title)
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlim(0.5, max(last_epoch, 2) + 0.5)
    finite = np.concatenate([y[np.isfinite(y)] for y in ys]) if ys else np.empty(0)
    if ylabel == "loss" and finite.size and finite.max() > 0:
        ax.set_ylim(0, 1.08 * float(finite.max()))
    elif ylabel == "Dice" and finite.size:
        ax.set_ylim(max(0.0, float(finite.min()) - 0.05), 1.0)
    ax.grid(True, alpha=0.3)


def plot_history(history: list[dict], path: Path, title: str | None = None) -> None:
    """Draw losses and Dice per epoch side by side and mark the best per-image Dice."""
    epochs = np.asarray([int(row["epoch"]) for row in history], dtype=np.int64)
    last = int(epochs.max()) if len(epochs) else 1

    fig = Figure(figsize=(12, 4.5), dpi=100, layout="constrained")
    ax_loss, ax_dice = fig.subplots(1, 2)

    losses = [_series(history, "train_loss"), _series(history, "val_loss")]
    _line(ax_loss, epochs, losses[0], label="train loss", color="C0")
    _line(ax_loss, epochs, losses[1], label="val loss", color="C1")
    _style(ax_loss, "loss", "loss", last, losses)

    dices = [_series(history, "val_dice_per_image"), _series(history, "val_dice_dataset")]
    _line(ax_dice, epochs, dices[0], label="per-image", color="C2")
    _line(ax_dice, epochs, dices[1], label="dataset-level", color="C3")
    _style(ax_dice, "validation Dice", "Dice", last, dices)

    best = _best(epochs, dices[0])
    if best is not None:
        epoch, value = best
        for ax in (ax_loss, ax_dice):
            ax.axvline(epoch, color="0.4", linestyle="--", linewidth=1)
        ax_dice.plot(
            [epoch],
            [value],
            marker="*",
            markersize=13,
            color="C2",
            markeredgecolor="black",
            linestyle="none",
            label=f"best per-image {value:.4f} (epoch {epoch})",
        )
    if len(epochs) == 0:
        for ax in (ax_loss, ax_dice):
            ax.text(0.5, 0.5, "no epochs yet", ha="center", va="center", transform=ax.transAxes)
    else:
        ax_loss.legend(loc="best")
        ax_dice.legend(loc="best")
    if title:
        fig.suptitle(title)
    _save_figure(fig, path)


def plot_compare(runs: dict[str, list[dict]], path: Path) -> None:
    """Overlay several runs (name -> history): train loss, val loss, val per-image Dice."""
    fig = Figure(figsize=(16, 4.8), dpi=100, layout="constrained")
    axes = fig.subplots(1, 3)
    panels = [
        ("train_loss", "train loss", "loss"),
        ("val_loss", "validation loss", "loss"),
        ("val_dice_per_image", "validation Dice (per-image)", "Dice"),
    ]
    last = 1
    plotted: list[list[np.ndarray]] = [[] for _ in panels]
    for i, (name, history) in enumerate(runs.items()):
        color = f"C{i % 10}"
        epochs = np.asarray([int(row["epoch"]) for row in history], dtype=np.int64)
        last = max(last, int(epochs.max()) if len(epochs) else 1)
        ys = [_series(history, key) for key, _, _ in panels]
        best = _best(epochs, ys[2])
        best_label = f"{name}: best {best[1]:.4f} (epoch {best[0]})" if best else name
        labels = [name, name, best_label]
        for ax, y, label, seen in zip(axes, ys, labels, plotted, strict=True):
            _line(ax, epochs, y, color=color, label=label)
            seen.append(y)
        if best is not None:
            axes[2].plot(
                [best[0]],
                [best[1]],
                marker="*",
                markersize=12,
                color=color,
                markeredgecolor="black",
                linestyle="none",
            )
    for ax, (_, title, ylabel), seen in zip(axes, panels, plotted, strict=True):
        _style(ax, title, ylabel, last, seen)
    if runs:
        axes[0].legend(loc="best")
        axes[2].legend(loc="best", fontsize="small")
    _save_figure(fig, path)


# ---------------------------------------------------------------- masks on images


def _foreground(mask: np.ndarray) -> np.ndarray:
    """HxW bool: True where the mask is foreground (nonzero and not IGNORE)."""
    mask = np.asarray(mask)
    if mask.dtype == np.bool_:
        return mask
    return (mask != 0) & (mask != IGNORE)


def _contour(fg: np.ndarray) -> np.ndarray:
    """Foreground pixels with at least one background 4-neighbour (outside the image counts)."""
    padded = np.pad(fg, 1, constant_values=False)
    interior = (
        padded[:-2, 1:-1]  # up
        & padded[2:, 1:-1]  # down
        & padded[1:-1, :-2]  # left
        & padded[1:-1, 2:]  # right
    )
    return fg & ~interior


def _rgb(image: np.ndarray) -> np.ndarray:
    """HxW or HxWx3 uint8 -> HxWx3 uint8 (a copy)."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"image must be uint8, got {image.dtype}")
    if image.ndim == 2:
        return np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim == 3 and image.shape[2] == 3:
        return image.copy()
    raise ValueError(f"image must be HxW or HxWx3, got shape {image.shape}")


def _check_mask(mask: np.ndarray, image: np.ndarray) -> np.ndarray:
    fg = _foreground(mask)
    if fg.shape != image.shape[:2]:
        raise ValueError(f"mask shape {fg.shape} does not match image {image.shape[:2]}")
    return fg


def overlay(
    image: np.ndarray,
    mask: np.ndarray,
    color: tuple[int, int, int] = RED,
    alpha: float = 0.45,
) -> np.ndarray:
    """Tint the mask region of an HxWx3 uint8 image and draw its contour; returns HxWx3 uint8."""
    out = _rgb(image)
    fg = _check_mask(mask, out)
    tint = np.asarray(color, dtype=np.float32)
    out[fg] = np.round((1 - alpha) * out[fg].astype(np.float32) + alpha * tint).astype(np.uint8)
    out[_contour(fg)] = color
    return out


def side_by_side(
    image: np.ndarray, pred: np.ndarray, truth: np.ndarray | None = None
) -> np.ndarray:
    """[image | truth (green) | prediction (red, errors outlined yellow)] with white gaps.

    Without `truth`: [image | prediction]. Errors are pixels where prediction and truth
    disagree, leaving out the ignore region of the truth.
    """
    image = _rgb(image)
    pred_fg = _check_mask(pred, image)
    pred_panel = overlay(image, pred_fg, RED)
    panels = [image]
    if truth is not None:
        truth = np.asarray(truth)
        truth_fg = _check_mask(truth, image)
        errors = (pred_fg != truth_fg) & (truth != IGNORE)
        pred_panel[_contour(errors)] = YELLOW
        panels.append(overlay(image, truth_fg, GREEN))
    panels.append(pred_panel)

    gap = np.full((image.shape[0], GAP, 3), 255, dtype=np.uint8)
    row = [panels[0]]
    for panel in panels[1:]:
        row += [gap, panel]
    return np.concatenate(row, axis=1)  # H x (n*W + (n-1)*GAP) x 3
