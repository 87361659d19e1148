"""Checkpoints: plain dicts of tensors and primitives, written atomically, read without pickle.

``last.pt`` holds everything needed to resume (model, optimizer, scheduler, scaler, epoch,
history, config); ``best.pt`` holds the model, its config and its metrics. Both load with
``torch.load(..., weights_only=True)``, so a checkpoint from elsewhere cannot run code.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import torch

from dist_seg.config import Config, config_from_dict
from dist_seg.errors import UserError
from dist_seg.models import build_model


def save_checkpoint(state: dict, path: Path) -> None:
    """Write to a temporary file in the same directory, then rename: a kill at any instant
    leaves either the old or the new file, never half of one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except OSError as e:
        raise UserError(
            f"cannot write checkpoint {path} ({e.strerror or e}); the previous one is intact. "
            "Free disk space or set run.out_dir"
        ) from None
    finally:
        tmp.unlink(missing_ok=True)


def read_torch_file(path: Path, what: str, map_location="cpu"):
    """torch.load without pickle (weights_only=True): tensors, containers and primitives only.
    A missing, truncated or foreign file is one UserError naming it."""
    if not path.is_file():
        raise UserError(f"{what} {path} not found")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"{what} {path} cannot be read ({first[:160]}); it is truncated, corrupt or "
            "not written by torch.save"
        ) from None


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    path = Path(path)
    state = read_torch_file(path, "checkpoint", map_location)
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise UserError(f"checkpoint {path} is not a dist_seg checkpoint (no model/config)")
    return state


def model_from_checkpoint(
    path: str | Path, map_location="cpu"
) -> tuple[torch.nn.Module, Config, dict]:
    """(model with the checkpoint's weights, its config, the whole checkpoint dict)."""
    state = load_checkpoint(path, map_location)
    cfg = config_from_dict(state["config"])
    model = model_from_config(cfg)
    load_weights(model, state["model"], path)
    return model, cfg, state


def model_from_config(cfg: Config) -> torch.nn.Module:
    kwargs = {"width": cfg.model.width}
    if cfg.model.name == "resnet34_unet":
        kwargs["stem_pool"] = cfg.model.stem_pool
    return build_model(cfg.model.name, **kwargs)


def load_weights(model: torch.nn.Module, weights: dict, path) -> None:
    """load_state_dict with a one-line error when the architecture or width differs."""
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        detail = lines[1] if len(lines) > 1 else lines[0]
        raise UserError(
            f"checkpoint {path} does not fit this model ({detail[:160]}); check model.name "
            "and model.width"
        ) from None
