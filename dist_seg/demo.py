"""`dist-seg demo`, the embedded default: synthesize, pack, train a small UNet on CPU,
evaluate on test, and leave curves, masks and metrics.json in the run directory."""

from __future__ import annotations

from pathlib import Path

from dist_seg.config import load_config
from dist_seg.console import Console
from dist_seg.data.synth import make_synthetic

DEMO = {
    "name": "demo",
    "data": {"size": 64, "num_workers": 1, "shuffle_buffer": 64},
    "model": {"name": "unet", "width": 0.25},
    "optim": {"lr": 3e-3, "schedule": "cosine", "warmup_steps": 10},
    "train": {"epochs": 25, "batch_size": 16, "eval_batch_size": 32, "log_every": 10},
}
NUM_IMAGES = 600


def demo(out: Path = Path("runs/demo"), epochs: int | None = None) -> dict:
    from dist_seg.evaluate import run_evaluate
    from dist_seg.train import train

    console = Console()
    data = out / "data"
    if not (data / "annotations" / "test.txt").exists():
        console.print(f"writing a synthetic Oxford-IIIT Pet twin ({NUM_IMAGES} images) to {data}")
        make_synthetic(data, num_images=NUM_IMAGES, seed=0, overwrite=True)  # redo a cut-off one
    overrides = {
        **DEMO,
        "data": {**DEMO["data"], "root": str(data), "shards": str(out / "shards")},
        "run": {"out_dir": str(out.parent), "name": out.name},
    }
    if epochs:
        overrides["train"] = {**DEMO["train"], "epochs": epochs}
    cfg = load_config(None, [overrides])
    summary = train(cfg)
    run_dir = cfg.run_dir()
    result = run_evaluate(
        str(run_dir / "best.pt"),
        str(out / "shards"),
        "test",
        str(run_dir),
        save_masks=str(run_dir / "test"),
    )
    console.print(
        f"[bold]demo done[/]: test Dice {result['dice_per_image']:.4f} per image, "
        f"{result['dice_dataset']:.4f} dataset-level on {result['num_images']} images.\n"
        f"  curves   {run_dir / 'curves.png'}\n  metrics  {run_dir / 'metrics.json'}\n"
        f"  masks    {run_dir / 'test' / 'overlays'}\n  model    {run_dir / 'best.pt'}"
    )
    return {**summary, "test": result}
