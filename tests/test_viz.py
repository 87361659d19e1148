import math
import os

import numpy as np
import pytest
from PIL import Image

from dist_seg import viz


def _history(n: int, start_loss: float = 0.7) -> list[dict]:
    return [
        {
            "epoch": e,
            "train_loss": start_loss / e,
            "val_loss": start_loss / e + 0.05,
            "val_dice_per_image": 0.9 - 0.4 / e,
            "val_dice_dataset": 0.92 - 0.4 / e,
        }
        for e in range(1, n + 1)
    ]


def _assert_png(path, min_width=600):
    with Image.open(path) as im:
        assert im.format == "PNG"
        im.load()
        width, height = im.size
    assert min_width <= width <= 3000
    assert 200 <= height < width


def _only(folder, name):
    assert sorted(p.name for p in folder.iterdir()) == [name]


@pytest.mark.parametrize("n", [1, 5])
def test_plot_history_writes_png_atomically(tmp_path, n):
    out = tmp_path / "curves.png"
    viz.plot_history(_history(n), out, title="unet")
    _assert_png(out)
    _only(tmp_path, "curves.png")  # no temporary file left behind


def test_plot_history_redraw_and_empty(tmp_path):
    out = tmp_path / "sub" / "curves.png"
    viz.plot_history([], out)
    _assert_png(out)
    viz.plot_history(_history(3), out)  # redrawn every epoch over the same file
    _assert_png(out)
    _only(out.parent, "curves.png")


def test_plot_history_tolerates_missing_values(tmp_path):
    history = _history(4)
    history[0]["val_loss"] = None
    history[1]["val_dice_per_image"] = math.nan
    history[2]["val_dice_dataset"] = None
    del history[3]["train_loss"]
    out = tmp_path / "curves.png"
    viz.plot_history(history, out)
    _assert_png(out)
    viz.plot_history([{"epoch": 1, "train_loss": 0.5}], out)  # no validation yet: no best
    _assert_png(out)


def test_best_epoch_ignores_nan():
    epochs = np.array([1, 2, 3])
    assert viz._best(epochs, np.array([0.5, math.nan, 0.7])) == (3, 0.7)
    assert viz._best(epochs, np.array([math.nan] * 3)) is None


def test_plot_compare_runs_of_different_lengths(tmp_path):
    runs = {"unet": _history(6), "resnet34_unet": _history(3, 0.5), "no-flip": _history(1)}
    out = tmp_path / "compare.png"
    viz.plot_compare(runs, out)
    _assert_png(out, min_width=900)
    _only(tmp_path, "compare.png")


def test_save_mask_png_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    mask = rng.integers(0, 2, size=(9, 13)).astype(np.uint8)
    for m in (mask, mask.astype(bool)):
        out = tmp_path / "m.png"
        viz.save_mask_png(m, out)
        with Image.open(out) as im:
            assert im.mode == "L"
            values = np.asarray(im)
        assert set(np.unique(values).tolist()) == {0, 255}
        np.testing.assert_array_equal(values // 255, mask)


def test_save_png_creates_parents(tmp_path):
    image = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    out = tmp_path / "a" / "b" / "x.png"
    viz.save_png(image, out)
    np.testing.assert_array_equal(np.asarray(Image.open(out)), image)


def _image(h=12, w=10):
    rng = np.random.default_rng(1)
    return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _square(h=12, w=10):
    mask = np.zeros((h, w), dtype=np.uint8)
    mask[3:9, 2:7] = 1
    return mask


def test_overlay_changes_only_the_mask():
    image, mask = _image(), _square()
    out = viz.overlay(image, mask)
    assert out.shape == image.shape and out.dtype == np.uint8
    outside = mask == 0
    np.testing.assert_array_equal(out[outside], image[outside])
    contour = viz._contour(mask.astype(bool))
    assert contour.sum() == 2 * (6 + 5) - 4  # the square's ring
    assert (out[contour] == (255, 0, 0)).all()
    inner = (mask == 1) & ~contour
    assert (out[inner] != image[inner]).any(axis=1).all()
    np.testing.assert_array_equal(image, _image())  # input untouched


def test_overlay_ignore_is_not_foreground():
    image, mask = _image(), _square()
    with_ignore = mask.copy()
    with_ignore[0, :] = viz.IGNORE
    np.testing.assert_array_equal(viz.overlay(image, with_ignore), viz.overlay(image, mask))


def test_side_by_side_shapes_and_panels():
    h, w, gap = 12, 10, viz.GAP
    image, truth = _image(h, w), _square(h, w)
    pred = np.zeros_like(truth)
    pred[3:9, 2:6] = 1  # misses one column of the truth

    two = viz.side_by_side(image, pred)
    assert two.shape == (h, 2 * w + gap, 3) and two.dtype == np.uint8
    np.testing.assert_array_equal(two[:, :w], image)
    assert (two[:, w : w + gap] == 255).all()
    np.testing.assert_array_equal(two[:, w + gap :], viz.overlay(image, pred))

    three = viz.side_by_side(image, pred, truth)
    assert three.shape == (h, 3 * w + 2 * gap, 3)
    np.testing.assert_array_equal(three[:, :w], image)
    assert (three[:, w : w + gap] == 255).all()
    assert (three[:, 2 * w + gap : 2 * w + 2 * gap] == 255).all()
    np.testing.assert_array_equal(
        three[:, w + gap : 2 * w + gap], viz.overlay(image, truth, viz.GREEN)
    )
    pred_panel = three[:, 2 * w + 2 * gap :]
    assert (pred_panel[3:9, 6] == viz.YELLOW).all()  # the missed column is outlined
    assert (pred_panel[0] == image[0]).all()  # agreement away from masks stays untouched


def test_side_by_side_rejects_mismatched_mask():
    with pytest.raises(ValueError, match="does not match"):
        viz.side_by_side(_image(12, 10), np.zeros((12, 11), dtype=np.uint8))


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_written_files_get_the_mode_open_gives(tmp_path, umask):
    """curves.png and every PNG: the mode of a file made by open() (0644 under umask 022),
    not mkstemp's 0600."""
    old = os.umask(umask)
    try:
        (tmp_path / "plain.txt").write_text("x")
        viz.plot_history(_history(3), tmp_path / "curves.png")
        viz.save_png(np.zeros((4, 4), np.uint8), tmp_path / "masks" / "a.png")
    finally:
        os.umask(old)
    expected = 0o666 & ~umask
    assert (tmp_path / "plain.txt").stat().st_mode & 0o777 == expected
    for name in ("curves.png", "masks/a.png"):
        assert (tmp_path / name).stat().st_mode & 0o777 == expected, name
