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
    # Under DeepSpeed ZeRO-1/2 {"zero": ...}: every rank's slices joined (gather_zero_state);
    # {} from DeepSpeed's other optimizers and from dist_seg before it was kept.
    optimizer: dict = field(default_factory=dict)
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


# --- DeepSpeed ZeRO stage 1/2: the optimizer state of every rank, in one world-size-free form
# ZeRO flattens each parameter group into one buffer, pads it to a multiple of the world size
# and gives every rank one equal slice: its fp32 master weights and Adam's moments exist only
# there (deepspeed/runtime/zero/stage_1_and_2.py). last.pt keeps each group's buffer whole and
# without that padding; at resume every rank cuts its own slice for the current world size
# and hands it to the ZeRO optimizer's own load_state_dict (its same-layout path).
ZERO_FORMAT = 1


def zero_optimizer(optimizer):
    """The DeepSpeed ZeRO stage-1/2 optimizer behind accelerate's wrapper, else None (no
    DeepSpeed, ZeRO-3, DeepSpeed's BF16_Optimizer)."""
    try:
        from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
    except ImportError:
        return None
    inner = getattr(optimizer, "optimizer", optimizer)
    return inner if isinstance(inner, DeepSpeedZeroOptimizer) else None


def _zero_group_numel(zero, i: int) -> int:
    """Elements of group ``i``'s flat buffer before the world-size padding: its parameters
    and their alignment padding, the same at any world size."""
    paddings = getattr(zero, "round_robin_bit16_padding", None)
    pad = sum(paddings[i]) if paddings else 0
    return sum(p.numel() for p in zero.round_robin_bit16_groups[i]) + pad


def _plain(obj) -> dict:
    """An object's bool/int/float/str/None attributes (a loss scaler: not loadable with
    weights_only=True as it is)."""
    plain = (bool, int, float, str, type(None))
    return {k: v for k, v in vars(obj).items() if isinstance(v, plain)}


def gather_zero_state(optimizer, main: bool) -> dict:
    """Collective: every rank's ZeRO slices, joined on the main process into
    ``{"zero": ...}`` for TrainState.optimizer ({} on the other ranks, and where the
    optimizer is not ZeRO stage 1/2)."""
    zero = zero_optimizer(optimizer)
    if zero is None:
        return {}
    groups = []
    for i, group in enumerate(zero.optimizer.param_groups):
        state = zero.optimizer.state[group["params"][0]]
        groups.append({
            "numel": _zero_group_numel(zero, i),
            "fp32": zero.single_partition_of_fp32_groups[i].detach().cpu().clone(),
            "state": {k: v.detach().cpu().clone() if torch.is_tensor(v) else v
                      for k, v in state.items()},
        })  # fmt: skip
    mine = {"groups": groups, "param_groups": zero.optimizer.state_dict()["param_groups"]}
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        ranks = [None] * dist.get_world_size() if main else None
        dist.gather_object(mine, ranks, dst=0)  # the main process is rank 0
    else:
        ranks = [mine]
    if not main:
        return {}
    merged = []
    for i, first in enumerate(ranks[0]["groups"]):
        parts, n = [r["groups"][i] for r in ranks], first["numel"]
        state = {}
        for key, value in first["state"].items():  # moments: one slice per rank; step: one
            sliced = torch.is_tensor(value) and value.shape == first["fp32"].shape
            state[key] = torch.cat([p["state"][key] for p in parts])[:n] if sliced else value
        merged.append({"numel": n, "fp32": torch.cat([p["fp32"] for p in parts])[:n],
                       "state": state})  # fmt: skip
    return {"zero": {
        "format": ZERO_FORMAT, "world_size": len(ranks), "groups": merged,
        "param_groups": ranks[0]["param_groups"],
        "round_robin": bool(getattr(zero, "round_robin_gradients", False)),
        "loss_scaler": _plain(zero.loss_scaler), "overflow": bool(zero.overflow),
    }}  # fmt: skip


def load_zero_state(optimizer, saved: dict, path: Path) -> str | None:
    """After accelerator.prepare, on every rank: this rank's slice of the saved ZeRO state
    for the current world size. None when restored, else the line saying what was not."""
    zero = zero_optimizer(optimizer)
    held = saved.get("zero") if saved else None
    world = torch.distributed.get_world_size(group=zero.dp_process_group) if zero else 1
    why = None
    if zero is None:
        name = type(getattr(optimizer, "optimizer", optimizer)).__name__
        why = f"DeepSpeed's {name} is not the ZeRO stage-1/2 optimizer"
    elif held is None:
        how = "saved without DeepSpeed" if saved else "an older dist_seg or another optimizer"
        why = f"checkpoint {path} holds no ZeRO optimizer state ({how})"
    elif held["round_robin"] and held["world_size"] != world:
        why = (
            "zero_optimization.round_robin_gradients orders the parameters by world size "
            f"({held['world_size']} saved, {world} now)"
        )
    if why:
        return f"[yellow]warning[/]: optimizer state not restored: {why}; Adam restarts its moments"
    from deepspeed import __version__ as ds_version
    from deepspeed.checkpoint import constants as C

    rank = torch.distributed.get_rank(group=zero.dp_process_group)
    state, fp32 = {}, []
    for i, group in enumerate(held["groups"]):
        if group["numel"] != _zero_group_numel(zero, i):
            raise UserError(
                f"checkpoint {path}: ZeRO parameter group {i} holds {group['numel']} elements, "
                f"this model {_zero_group_numel(zero, i)}; resume with the same model"
            )
        padded, size = zero.bit16_groups_flat[i].numel(), zero.partition_size[i]
        fp32.append(_slice(group["fp32"], padded, size, rank))
        state[i] = {k: _slice(v, padded, size, rank) if torch.is_tensor(v) and v.dim() == 1
                    else v for k, v in group["state"].items()}  # fmt: skip
    param_groups = [dict(g, params=[i]) for i, g in enumerate(held["param_groups"])]
    for key, value in held["loss_scaler"].items():
        if hasattr(zero.loss_scaler, key):
            setattr(zero.loss_scaler, key, value)
    current = {
        C.LOSS_SCALER: zero.loss_scaler, "dynamic_loss_scale": zero.dynamic_loss_scale,
        "overflow": held["overflow"], C.CLIP_GRAD: zero.clip_grad,
        C.BASE_OPTIMIZER_STATE: {"state": state, "param_groups": param_groups},
        C.SINGLE_PARTITION_OF_FP32_GROUPS: fp32, C.GROUP_PADDINGS: zero.groups_padding,
        C.PARTITION_COUNT: zero.partition_count, C.DS_VERSION: ds_version,
    }  # fmt: skip
    if hasattr(zero, "round_robin_bit16_padding"):  # this world size's layout, checked above
        current[C.PARAM_ALIGNMENT_PADDINGS] = zero.round_robin_bit16_padding
    # The same-layout path: the slice is this world size's; the fp32 masters come from it,
    # not from the (possibly bf16) model weights.
    zero.load_state_dict([current] * world, load_optimizer_states=True, load_from_fp32_weights=True)
    return None


def _slice(whole: torch.Tensor, padded: int, size: int, rank: int) -> torch.Tensor:
    """Rank ``rank``'s slice of a flat group zero-padded to ``padded`` elements (DeepSpeed's
    padding is zeros, and stays zero: no gradient reaches it)."""
    flat = whole.new_zeros(padded)
    flat[: whole.numel()] = whole
    return flat[rank * size : (rank + 1) * size].clone()
