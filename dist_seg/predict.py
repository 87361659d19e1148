"""`dist-seg predict`: masks for any images at their original resolution, with overlays."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from dist_seg.checkpoint import model_from_checkpoint
from dist_seg.data.pets import decode_image
from dist_seg.data.sizes import fit_pair, parse_size, trained_aspect, unfit_logits
from dist_seg.errors import DataError, UserError, make_dir
from dist_seg.models.pretrained import normalize_imagenet, uses_imagenet_norm
from dist_seg.tta import flip_tta
from dist_seg.viz import save_mask_png, save_png, side_by_side

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff"}


@torch.no_grad()
def predict_mask(
    model, image: np.ndarray, size, device="cpu", *, normalize=False, tta=False, aspect="stretch"
) -> np.ndarray:
    """HxW bool mask for an HxWx3 uint8 image: fitted to the training ``size`` (a side,
    "HxW" or (h, w); 0: as it is) under the training ``aspect`` policy, the logits mapped
    back to the image's own size (for pad, the letterbox cropped off first; data.sizes).
    ``model`` is a module or an exported model (dist_seg.export.load_exported)."""
    h, w = image.shape[:2]
    hw = parse_size(size, "the checkpoint's data.size")
    small = image if hw == (0, 0) else fit_pair(image, None, hw, aspect)[0]
    x = torch.from_numpy(np.array(small)).permute(2, 0, 1)[None].float().div_(255)
    if normalize:
        x = normalize_imagenet(x)
    logits = flip_tta(model, x.to(device), enabled=tta)
    logits = unfit_logits(logits.float(), (h, w), aspect)
    return (logits[0, 0] > 0).cpu().numpy()


def predict(
    checkpoint: str | None, input_path: str, out: str, *, exported: str | None = None, tta=False
) -> int:
    """Writes OUT/<stem>_mask.png (0/255) and OUT/<stem>_overlay.png per image; returns the
    count. Runs a checkpoint, or an exported ONNX/TorchScript file (normalization inside)."""
    if exported:
        from dist_seg.export import load_exported

        model = load_exported(exported)
        size, aspect, device, normalize = model.size, model.aspect, "cpu", False
    else:
        model, cfg, _ = model_from_checkpoint(checkpoint)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        model = model.to(device).eval()
        size, normalize = cfg.data.size, uses_imagenet_norm(cfg)
        aspect = trained_aspect(cfg)
    src = Path(input_path)
    if src.is_dir():
        files = sorted(
            p
            for p in src.iterdir()
            if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("._")
        )
        if not files:
            raise UserError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {src}")
    elif src.is_file():
        files = [src]
    else:
        raise UserError(f"--input {src} does not exist")
    out_dir = make_dir(Path(out), f"--out {out}")
    done, skipped = 0, []
    for path in files:
        try:
            image = decode_image(path)
        except DataError as e:
            if len(files) == 1:
                raise
            skipped.append(f"{path.name}: {e}")
            continue
        mask = predict_mask(model, image, size, device, normalize=normalize, tta=tta, aspect=aspect)
        save_mask_png(mask, out_dir / f"{path.stem}_mask.png")
        save_png(side_by_side(image, mask), out_dir / f"{path.stem}_overlay.png")
        done += 1
    print(
        f"{done} masks and overlays in {out_dir}"
        + (f"; skipped {len(skipped)} unreadable: {skipped}" if skipped else "")
    )
    return done
