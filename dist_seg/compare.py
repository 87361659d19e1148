"""`dist-seg compare RUN_DIR... --out FIG.png`: several runs' curves overlaid, and their best
numbers side by side (read from each run's history.json, so finished, running or preempted
runs all compare)."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from rich.console import Console
from rich.table import Table

from dist_seg.errors import UserError
from dist_seg.viz import plot_compare


def add_parser(subparsers, help_text: str) -> None:
    p = subparsers.add_parser("compare", help=help_text)
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (runs/NAME)")
    p.add_argument("--out", default="compare.png", help="figure to write (default: compare.png)")
    p.set_defaults(func=run)


def load_history(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "history.json"
    if not path.is_file():
        raise UserError(f"{run_dir}: no history.json (not a run directory, or no epoch finished)")
    try:
        history = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(history, list) or not history:
        raise UserError(f"{path} holds no epochs")
    return history


def best_numbers(history: list[dict]) -> dict:
    """The epoch with the highest per-image validation Dice (earliest on a tie) and its
    dataset Dice, and the last epoch's validation loss."""
    scored = [r for r in history if _finite(r.get("val_dice_per_image"))]
    best = max(scored, key=lambda r: (r["val_dice_per_image"], -r["epoch"]), default=None)
    if best is None:  # every epoch diverged: nothing to call best
        best = {"epoch": None, "val_dice_per_image": math.nan, "val_dice_dataset": math.nan}
    return {
        "epochs": history[-1]["epoch"],
        "best_epoch": best["epoch"],
        "best_dice_per_image": best["val_dice_per_image"],
        "dice_dataset_at_best": best["val_dice_dataset"],
        "final_val_loss": history[-1]["val_loss"],
    }


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def run_names(run_dirs: list[Path]) -> list[str]:
    """Each run's directory name, or its path where two names would clash."""
    names = [Path(d).name for d in run_dirs]
    return [n if names.count(n) == 1 else str(d) for n, d in zip(names, run_dirs)]


def run(args: argparse.Namespace) -> int:
    dirs = [Path(d) for d in args.runs]
    histories = {name: load_history(d) for name, d in zip(run_names(dirs), dirs)}
    plot_compare(histories, Path(args.out))

    table = Table(title=f"{len(histories)} runs (best = highest per-image val Dice)")
    for column in ("run", "epochs", "best epoch", "best Dice (per image)",
                   "Dice (dataset) at best", "final val loss"):  # fmt: skip
        table.add_column(column, justify="left" if column == "run" else "right")
    for name, history in histories.items():
        b = best_numbers(history)
        table.add_row(name, str(b["epochs"]), str(b["best_epoch"] or "-"),
                      f"{b['best_dice_per_image']:.4f}", f"{b['dice_dataset_at_best']:.4f}",
                      f"{b['final_val_loss']:.4f}")  # fmt: skip
    console = Console(highlight=False)
    if not console.is_terminal:
        console.width = 200  # not rich's 80 columns: logs and pipes get the table unsquashed
    console.print(table)
    console.print(f"figure: {args.out}")
    return 0
