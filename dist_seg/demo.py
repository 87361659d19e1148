"""`dist-seg demo`, the embedded default: synthesize, pack, train a small UNet on CPU,
evaluate on test, and leave curves, masks and metrics.json in the run directory.

``--data pets`` (default): a synthetic Oxford-IIIT Pet twin, packed from ``data.root``.
``--data generic``: a synthetic folder of JPEG images and GIF / 0-255 PNG masks named
``<stem>_mask`` (Carvana's layout, with three broken pairs), packed as a user would:
``dist-seg pack --images .../images --masks .../masks --match '{stem}_mask' --skip-bad``."""

from __future__ import annotations

from pathlib import Path

from dist_seg.config import load_config
from dist_seg.console import Console
from dist_seg.data.synth import make_synthetic, make_synthetic_generic

DEMO = {
    "name": "demo",
    "data": {"size": 64, "num_workers": 1, "shuffle_buffer": 64},
    "model": {"name": "unet", "width": 0.25},
    "optim": {"lr": 3e-3, "schedule": "cosine", "warmup_steps": 10},
    "train": {"epochs": 25, "batch_size": 16, "eval_batch_size": 32, "log_every": 10},
}
NUM_IMAGES = 600
GENERIC_SIDES = (96, 161)  # the generic set's image sides: not square, not the packed size
DATA_KINDS = ("pets", "generic")


def demo(out: Path = Path("runs/demo"), epochs: int | None = None, data_kind: str = "pets") -> dict:
    from dist_seg.evaluate import run_evaluate
    from dist_seg.train import train

    console = Console()
    data = out / "data"
    if data_kind == "generic":
        shards = _generic_shards(data, out / "shards", console)
        source = {"shards": str(shards)}
    else:
        if not (data / "annotations" / "test.txt").exists():
            console.print(f"writing a synthetic Oxford-IIIT Pet twin ({NUM_IMAGES} images) to {data}")  # fmt: skip
            make_synthetic(data, num_images=NUM_IMAGES, seed=0, overwrite=True)  # redo a cut one
        source = {"root": str(data), "shards": str(out / "shards")}
    overrides = {
        **DEMO,
        "data": {**DEMO["data"], **source},
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


def _generic_shards(data: Path, shards: Path, console) -> Path:
    """The generic synthetic set under ``data``, packed into ``shards`` once."""
    import os

    from dist_seg.data.manifest import MANIFEST
    from dist_seg.data.pack import pack_generic

    if not (data / "done").exists():
        console.print(f"writing a synthetic images + masks folder ({NUM_IMAGES} pairs) to {data}")
        make_synthetic_generic(data, num_images=NUM_IMAGES, seed=0, overwrite=True,
                               sides=GENERIC_SIDES)  # fmt: skip
        (data / "done").write_text("")
    if not (shards / MANIFEST).exists():
        console.print(f"packing {data} into {shards} (three broken pairs: skipped and counted)")
        m = pack_generic(data / "images", data / "masks", shards, match="{stem}_mask",
                         size=DEMO["data"]["size"], skip_bad=True,
                         workers=max(1, (os.cpu_count() or 2) // 2))  # fmt: skip
        for line in m["source"]["skipped"]:
            console.print(f"  skipped {line}")
    return shards
