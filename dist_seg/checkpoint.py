"""Checkpoints: plain dicts of tensors and primitives, written atomically, read without pickle.

``last.pt`` holds everything needed to resume (model, optimizer, scheduler, scaler, epoch,
history, config); ``best.pt`` holds the model, its config and its metrics. Both load with
``torch.load(..., weights_only=True)``, so a checkpoint from elsewhere cannot run code.
"""

from __future__ import annotations

import io
import os
import pickle
import shutil
import zipfile
from dataclasses import dataclass, field, fields
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
    except (OSError, RuntimeError) as e:
        # A real full disk makes torch.save raise RuntimeError, not OSError (seen on a full
        # tmpfs: "[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"),
        # which names no cause: say how much space is left.
        why = e.strerror if isinstance(e, OSError) and e.strerror else _first_line(e)
        if isinstance(e, RuntimeError):
            free = shutil.disk_usage(path.parent).free
            full = free < (1 << 20)
            why = (
                f"No space left on device: {free} bytes free"
                if full
                else f"{why}; {free} bytes free"
            )
        raise UserError(
            f"cannot write checkpoint {path} ({why}); the previous one is intact. "
            "Free disk space or set run.out_dir"
        ) from None
    finally:
        tmp.unlink(missing_ok=True)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:160] if text else type(e).__name__


def read_torch_file(path: Path, what: str, map_location="cpu"):
    """torch.load without pickle (weights_only=True): tensors, containers and primitives only.
    A missing, truncated or foreign file is one UserError naming it."""
    if not path.is_file():
        raise UserError(f"{what} {path} not found")
    return read_torch_bytes(path.read_bytes(), path, what, map_location)


def read_torch_bytes(data: bytes, path: Path, what: str = "checkpoint", map_location="cpu"):
    """The bytes of a torch.save file (read here or broadcast from the main process)."""
    if not data.startswith((b"PK\x03\x04", b"\x80")):  # zip, or torch<1.6's pickle format
        # Neither: torch would run its legacy unpickler on it, and a text file then gives
        # a KeyError from deep inside torch (seen: KeyError(101) for a file starting "hello").
        raise UserError(
            f"{what} {path} cannot be read: it is not a file written by torch.save (not a "
            "zip archive); check the path"
        )
    try:
        return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError, KeyError,
            ValueError, TypeError, AttributeError, IndexError) as e:  # fmt: skip
        raise UserError(
            f"{what} {path} cannot be read ({_first_line(e)}); it is truncated, corrupt or "
            "not written by torch.save"
        ) from None


STATE_VERSION = 2  # 1: before TrainState (no fingerprint, rank 0's train sums)


@dataclass
class TrainState:
    """Everything last.pt holds: where training stands, and what to rebuild it from.

    Plain tensors, containers and primitives only (``to_dict``), so it loads with
    ``weights_only=True``. No RNG states: every random draw (shard order, shuffle, flips)
    derives from (seed, epoch, step, rank), so the position alone replays it exactly.
    """

    model: dict  # the raw model's state_dict
    config: dict  # the resolved Config as a dict
    epoch: int = 0  # epochs finished
    step: int = 0  # batches of `epoch` already trained (a mid-epoch resume continues there)
    optimizer: dict = field(default_factory=dict)  # {} under DeepSpeed (ZeRO shards it)
    scheduler: dict = field(default_factory=dict)
    scaler: dict | None = None
    ema: dict | None = None
    # Saves happen only at accumulation-window boundaries, so no gradients are kept:
    # pending_micro_steps is 0 in every file this version writes (checked at resume).
    accumulation: dict = field(default_factory=lambda: {"grad_accum": 1, "pending_micro_steps": 0})
    # The train loader's state (EpochLoader.state_dict: its data-plan fingerprint and what
    # of the epoch was trained), from which any world size or worker count can resume.
    data_plan: dict = field(default_factory=dict)
    global_step: int = -1  # micro-steps trained in the whole run (W&B's step); -1: unknown
    history: list = field(default_factory=list)
    best: dict = field(default_factory=lambda: {"dice_per_image": -1.0, "epoch": 0})
    skipped_batches: int = 0
    # float64 (ranks, 2): each rank's (BCE sum, valid pixels) of the epoch so far; the
    # epoch's train_loss is their global total, so every rank's share is kept.
    train_sums: torch.Tensor = field(default_factory=lambda: torch.zeros(1, 2, dtype=torch.float64))
    wandb_id: str | None = None
    version: int = STATE_VERSION

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}  # no deep copy

    @classmethod
    def from_dict(cls, state: dict, path: Path) -> TrainState:
        if "optimizer" not in state:
            raise UserError(f"checkpoint {path} holds weights only; resume from a last.pt")
        known = {f.name for f in fields(cls)}
        state = {k: v for k, v in state.items() if k in known}
        if state.get("version", 1) < STATE_VERSION:  # dist_seg before TrainState: same keys,
            sums = state.get("train_sums")  # rank 0's sums only, and no fingerprint
            if isinstance(sums, torch.Tensor):
                state["train_sums"] = sums.reshape(1, 2)
            state["version"] = STATE_VERSION
        return cls(**state)


def save_train_state(state: TrainState, path: Path) -> None:
    save_checkpoint(state.to_dict(), path)


def load_train_state(data: bytes, path: Path) -> TrainState:
    """A last.pt from its bytes (read here or broadcast by the main process)."""
    state = read_torch_bytes(data, path)
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise UserError(f"checkpoint {path} is not a dist_seg checkpoint (no model/config)")
    return TrainState.from_dict(state, path)


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
