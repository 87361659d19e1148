"""The console: plain periodic lines when stdout is not a terminal (SLURM logs, CI), a live
bar in a terminal, and silence on every process but the main one."""

from __future__ import annotations

import io

import pytest
from rich.console import Console as RichConsole

from dist_seg.console import Console, wandb_mode


def steps(update, total: int, every: int) -> None:
    """What train_one_epoch does: fields on logging steps and on the last one."""
    for step in range(1, total + 1):
        if step % every and step != total:
            update()
        else:
            update(loss=1.0 / step, img_s=100.0)


def test_not_a_terminal_means_plain_lines(capsys):
    assert Console().live is False  # pytest's captured stdout is not a terminal


@pytest.mark.parametrize("total, expected", [(7, [3, 6, 7]), (6, [3, 6]), (2, [2])])
def test_plain_lines_every_log_every_steps_and_once_at_the_end(capsys, total, expected):
    console = Console(log_every=3, force_plain=True)
    with console.progress("epoch 1", total) as update:
        steps(update, total, every=3)
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[2] for line in lines] == [f"{n}/{total}" for n in expected]
    for line, n in zip(lines, expected):
        assert line.startswith(f"epoch 1 {n}/{total} loss={1.0 / n:.4g} img_s=100 eta=")
        assert line.endswith("s")


def test_plain_line_keeps_the_latest_values_between_updates(capsys):
    console = Console(log_every=2, force_plain=True)
    with console.progress("epoch 2", 4) as update:
        update(loss=0.5)  # a value given on a step that prints nothing...
        update()
        update()
        update()
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and all(" loss=0.5 " in line for line in lines)  # ...is shown


def test_plain_table_is_one_line_and_long_lines_do_not_wrap(capsys):
    console = Console(force_plain=True)
    console.table("epoch 3/40 (best)", {"epoch": 3, "val_loss": 0.123456, "val_images": 368})
    console.print("x" * 150 + " [bold]end[/]")
    out = capsys.readouterr().out.splitlines()
    assert out == ["epoch 3/40 (best): epoch=3 val_loss=0.1235 val_images=368", "x" * 150 + " end"]


def test_non_main_console_prints_nothing(capsys):
    console = Console(enabled=False, log_every=1, force_plain=True)
    console.print("hello")
    console.line("hello")
    console.table("epoch 1/1", {"val_loss": 0.5})
    with console.progress("epoch 1", 3) as update:
        steps(update, 3, every=1)
    assert capsys.readouterr() == ("", "")


def test_live_bar_in_a_terminal_shows_the_fields_and_goes_away():
    console = Console(log_every=1)
    buffer = io.StringIO()
    console.rich = RichConsole(file=buffer, force_terminal=True, width=120)
    console.live = True
    with console.progress("epoch 1", 5) as update:
        steps(update, 5, every=2)
    out = buffer.getvalue()
    assert "epoch 1" in out and "loss=" in out and "img_s=100" in out
    console.table("epoch 1/1", {"epoch": 1, "val_loss": 0.5})
    assert "val_loss" in buffer.getvalue()


@pytest.mark.parametrize("env, configured, mode", [
    (None, "offline", "offline"), ("disabled", "online", "disabled"), ("OFFLINE", "online", "offline"),
])  # fmt: skip
def test_wandb_mode_environment_beats_the_config(monkeypatch, env, configured, mode):
    if env is None:
        monkeypatch.delenv("WANDB_MODE", raising=False)
    else:
        monkeypatch.setenv("WANDB_MODE", env)
    assert wandb_mode(configured) == mode
