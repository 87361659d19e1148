"""Evaluation: the loop the trainer validates with, and the `dist-seg evaluate` command."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from dist_seg import metrics
from dist_seg.checkpoint import model_from_checkpoint
from dist_seg.console import Console
from dist_seg.data.manifest import check_shards, load_manifest
from dist_seg.data.sizes import unfit_logits
from dist_seg.data.stream import build_loader
from dist_seg.data.transforms import to_device
from dist_seg.errors import DataError, make_dir
from dist_seg.models.pretrained import normalize_imagenet, uses_imagenet_norm
from dist_seg.runtime import make_accelerator, raise_on_any_rank, release
from dist_seg.tta import flip_tta
from dist_seg.viz import save_mask_png, save_png, side_by_side


@torch.no_grad()
def evaluate(
    model, loader, accelerator, *, channels_last=True, console=None, on_batch=None,
    normalize=False, tta=False, original_size=False, aspect="stretch",
) -> dict:  # fmt: skip
    """Metrics of ``model`` (a plain module, not the DDP wrapper: an eval forward must not
    start collectives, since ranks may hold different batch counts) over this rank's part
    of ``loader``, reduced across ranks once at the end. With ``tta`` the logits are the
    mean over flips, and the plain model's metrics come back too, under "no_tta". With
    ``original_size`` (a loader built with full_masks) the logits are also upsampled to each
    image's original size and scored against its original mask, under "original_size";
    ``aspect`` is how the loader fitted the images (pad: the letterbox is cropped off first)."""
    was_training = model.training
    model.eval()
    stats = metrics.zeros(accelerator.device)
    plain = metrics.zeros(accelerator.device)
    full = metrics.zeros(accelerator.device)
    dtype = next(model.parameters()).dtype
    console = console or Console(enabled=False)
    with console.progress("eval", len(loader)) as update:
        for batch in loader:
            images, masks = to_device(batch, accelerator.device, channels_last, dtype)
            if normalize:
                images = normalize_imagenet(images)
            with accelerator.autocast():
                logits = model(images)
                if tta:
                    plain += metrics.batch_stats(logits, masks)
                    logits = flip_tta(model, images, identity=logits)  # 4 passes, not 5
            stats += metrics.batch_stats(logits, masks)
            if original_size:
                full += original_size_stats(logits, batch["full_mask"], aspect)
            if on_batch is not None:
                on_batch(batch, logits)
            update()
    model.train(was_training)
    result = metrics.summarize(accelerator.reduce(stats, reduction="sum"))
    if tta:
        result["no_tta"] = metrics.summarize(accelerator.reduce(plain, reduction="sum"))
    if original_size:
        result["original_size"] = metrics.summarize(accelerator.reduce(full, reduction="sum"))
    return result


def original_size_stats(
    logits: torch.Tensor, full_masks: list[np.ndarray], aspect: str = "stretch"
) -> torch.Tensor:
    """metrics.FIELDS of a batch scored at each image's original size: its logits upsampled
    (bilinear, as the images were resized; a letterbox cropped off first) to its original
    mask's size (data.sizes.unfit_logits)."""
    stats = metrics.zeros(logits.device)
    for i, full in enumerate(full_masks):
        mask = torch.from_numpy(np.ascontiguousarray(full)).to(logits.device)
        up = unfit_logits(logits[i : i + 1].float(), tuple(mask.shape), aspect)
        stats += metrics.batch_stats(up, mask[None])
    return stats


def run_evaluate(
    checkpoint: str,
    shards: str,
    split: str = "test",
    out: str | None = None,
    save_masks: str | None = None,
    batch_size: int = 8,
    num_workers: int = 2,
    tta: bool = False,
    original_size: bool = False,
) -> dict:
    """`dist-seg evaluate`: metrics.json (+ masks and overlays) for one split; any world size."""
    out_dir = Path(out) if out else Path(checkpoint).resolve().parent
    mask_dir = Path(save_masks) if save_masks else None
    for folder in (out_dir, mask_dir):  # fail before evaluating, not after
        if folder is not None:
            make_dir(folder)
    model, cfg, _ = model_from_checkpoint(checkpoint)
    accelerator = make_accelerator(cfg.train.precision)
    console = Console(enabled=accelerator.is_main_process)
    manifest = load_manifest(shards)
    rank, world = accelerator.process_index, accelerator.num_processes
    raise_on_any_rank(accelerator, check_shards(manifest, [split], rank, world))
    loader = build_loader(
        manifest,
        split,
        batch_size=batch_size,
        train=False,
        rank=rank,
        world_size=world,
        num_workers=num_workers,
        border=cfg.data.border,
        size=cfg.data.size,
        aspect=cfg.data.aspect,
        pin_memory=cfg.data.pin_memory and accelerator.device.type == "cuda",
        persistent_workers=False,  # one pass
        full_masks=original_size,
        decode=cfg.data.decode,  # gpu: JPEG batches decoded on the device (data/decode.py)
        device=accelerator.device,
        say=console.line,
    )
    memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    model = model.to(accelerator.device, memory_format=memory_format)
    on_batch = (lambda b, logits: _save_masks(b, logits, mask_dir)) if mask_dir else None
    result = evaluate(model, loader, accelerator, channels_last=cfg.train.channels_last,
                      console=console, on_batch=on_batch, normalize=uses_imagenet_norm(cfg),
                      tta=tta, original_size=original_size,
                      aspect=manifest.fit_aspect(cfg.data.aspect))  # fmt: skip
    expected = manifest.num_samples(split)
    if result["num_images"] != expected:
        raise DataError(
            f"evaluated {result['num_images']} images of split {split!r} but "
            f"{manifest.location} lists {expected}; the shards are damaged, repack them"
        )
    result.update(split=split, checkpoint=str(checkpoint), shards=str(shards), tta=tta,
                  size=list(loader.stream.reader.size or ()))  # fmt: skip
    if accelerator.is_main_process:
        tmp = out_dir / ".metrics.json.tmp"
        tmp.write_text(json.dumps(result, indent=2))
        os.replace(tmp, out_dir / "metrics.json")
        side = "x".join(map(str, result["size"])) or "packed size"
        console.table(f"{split} ({result['num_images']} images, at {side})", _headline(result))
        if original_size:
            console.table(f"{split} at each image's original size", _headline(result["original_size"]))  # fmt: skip
        console.print(
            f"metrics: {out_dir / 'metrics.json'}" + (f"  masks: {mask_dir}" if mask_dir else "")
        )
    release(accelerator, model, loader)
    return result


def _headline(result: dict) -> dict:
    keys = ("dice_per_image", "dice_dataset", "iou_per_image", "iou_dataset", "loss", "num_images")
    return {k: result[k] for k in keys}


def _save_masks(batch: dict, logits: torch.Tensor, out: Path) -> None:
    """Predicted mask (0/255 PNG) and an image | truth | prediction overlay per sample."""
    preds = (logits[:, 0] > 0).cpu().numpy()
    images = batch["image"].permute(0, 2, 3, 1).cpu().numpy()  # on the GPU: data.decode gpu
    truths = batch["mask"].numpy()
    for name, image, pred, truth in zip(batch["name"], images, preds, truths):
        save_mask_png(pred, out / "masks" / f"{name}.png")
        save_png(
            side_by_side(np.ascontiguousarray(image), pred, truth), out / "overlays" / f"{name}.png"
        )
