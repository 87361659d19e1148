"""One typed config: nested dataclasses, loaded from YAML, overridden by ``--set a.b=value``.

Every value is checked against its field's type and range; an unknown key or a bad value
is one clear UserError naming the key (and the file it came from).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from dist_seg.errors import UserError


@dataclass
class DataConfig:
    shards: str = "shards/pets-256"  # packed shards (a directory or URL holding manifest.json)
    root: str = ""  # raw Oxford-IIIT Pet layout; packed once into `shards` if it has no manifest
    # training size: a side (256) or "HxW", height first (192x320), multiples of 16;
    # 0 = the pack's own size. The run's config.yaml and checkpoints hold the size trained at.
    size: int | str = 256
    aspect: str = "auto"  # stretch | pad (letterbox) | auto: the pack's policy (data/sizes.py)
    border: str = "foreground"  # trimap border pixels: foreground | background | ignore
    flip: bool = True  # the seed's flips: horizontal and vertical, each p=0.5 per sample
    shuffle_buffer: int = 256
    num_workers: int = 2
    persistent_workers: bool = True  # keep loader workers across epochs (no restart per epoch)
    record_samples: bool = False  # keys each rank trained: RUN/samples/epoch-E/rank-R.txt
    pin_memory: bool = True  # CUDA only: page-locked batches, copied with non_blocking=True
    decode: str = "cpu"  # JPEG shards: cpu (in the workers) | gpu (per batch, nvJPEG; decode.py)
    train_split: str = "train"
    val_split: str = "val"


@dataclass
class ModelConfig:
    name: str = "unet"  # unet | resnet34_unet
    width: float = 1.0  # scales every channel count (1.0 = the seed's models)
    stem_pool: bool = False  # resnet34_unet: standard ResNet max-pool after the stem
    pretrained: str = ""  # resnet34_unet: a local torchvision resnet34 state_dict (ImageNet)


@dataclass
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 0.0
    loss: str = "bce"  # bce | bce_dice
    schedule: str = "constant"  # constant | cosine | poly
    warmup_steps: int = 0
    grad_clip: float = 0.0  # max global grad norm; 0 = off
    grad_accum: int = 1


@dataclass
class TrainConfig:
    epochs: int = 40
    batch_size: int = 20  # per process
    eval_batch_size: int = 0  # 0 = batch_size
    seed: int = 0
    precision: str = "auto"  # auto | no | bf16 | fp16 (auto: bf16 where it is fast, else no)
    channels_last: bool = True
    sync_bn: bool = False  # SyncBatchNorm across GPUs (tiny per-GPU batches); GPU only
    compile: bool = False
    cudnn_benchmark: bool = True
    tf32: bool = True  # TF32 matmuls and convolutions on CUDA (Ampere+); false: full fp32
    deterministic: bool = False  # deterministic kernels (GPU resume bit-identical); slower
    log_every: int = 20  # steps between plain log lines when stdout is not a terminal
    early_stop_patience: int = 0  # stop after N epochs without a better val Dice (0 = off)
    ema_decay: float = 0.0  # EMA of the weights, evaluated and saved beside them (0 = off)
    ema_warmup: bool = True  # decay ramps up as min(decay, (1 + n) / (10 + n)) over updates
    select: str = "raw"  # which weights pick best.pt: raw | ema
    nonfinite: str = "stop"  # a NaN/inf loss: stop (naming the step) | skip (and count) the batch


@dataclass
class RunConfig:
    name: str = ""  # runs/NAME; default: $SLURM_JOB_ID under SLURM, else the config's name
    out_dir: str = "runs"
    keep_last: int = 2  # numbered copies of last.pt kept in checkpoints/ (0 = none)
    checkpoint_every: int = 0  # also save last.pt every N steps (0 = at epoch ends only)


@dataclass
class WandbConfig:
    mode: str = "disabled"  # online | offline | disabled (WANDB_MODE overrides)
    project: str = "dist-seg"
    entity: str = ""
    group: str = ""
    tags: list[str] = field(default_factory=list)
    log_images: int = 8  # validation images shown per epoch
    log_checkpoint: bool = False  # upload best.pt as a W&B artifact at the end of the run


@dataclass
class Config:
    name: str = "default"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def to_dict(self) -> dict:
        return asdict(self)

    def run_name(self) -> str:
        """Stable across restarts: a requeued job finds its own directory."""
        return self.run.name or os.environ.get("SLURM_JOB_ID") or self.name

    def run_dir(self) -> Path:
        return Path(self.run.out_dir) / self.run_name()


CHOICES = {
    "data.border": ("foreground", "background", "ignore"),
    "data.aspect": ("auto", "stretch", "pad"),
    "data.decode": ("cpu", "gpu"),
    "model.name": ("unet", "resnet34_unet"),
    "optim.loss": ("bce", "bce_dice"),
    "optim.schedule": ("constant", "cosine", "poly"),
    "train.precision": ("auto", "no", "bf16", "fp16"),
    "train.nonfinite": ("stop", "skip"),
    "train.select": ("raw", "ema"),
    "wandb.mode": ("online", "offline", "disabled"),
}


def _check(cfg: Config) -> None:
    def bad(key, why):
        raise UserError(f"config {key}: {why}")

    for key, allowed in CHOICES.items():
        section, name = key.split(".")
        if getattr(getattr(cfg, section), name) not in allowed:
            bad(key, f"{getattr(getattr(cfg, section), name)!r} is not one of {', '.join(allowed)}")
    if cfg.optim.lr <= 0:
        bad("optim.lr", f"{cfg.optim.lr} must be > 0")
    if cfg.train.batch_size < 1:
        bad("train.batch_size", f"{cfg.train.batch_size} must be >= 1")
    if cfg.train.eval_batch_size < 0:
        bad("train.eval_batch_size", "must be >= 0")
    if cfg.train.epochs < 1:
        bad("train.epochs", f"{cfg.train.epochs} must be >= 1")
    from dist_seg.data.sizes import format_size, parse_size

    cfg.data.size = format_size(parse_size(cfg.data.size, "config data.size:"))  # 256 | "HxW"
    if cfg.model.width <= 0:
        bad("model.width", f"{cfg.model.width} must be > 0")
    if cfg.model.pretrained and cfg.model.name not in ("resnet34_unet", "resnet34"):
        bad("model.pretrained", "only resnet34_unet has an ImageNet encoder to load")
    if not 0 <= cfg.train.ema_decay < 1:
        bad("train.ema_decay", f"{cfg.train.ema_decay} must be in [0, 1)")
    if cfg.train.select == "ema" and cfg.train.ema_decay == 0:
        bad("train.select", "ema needs train.ema_decay > 0")
    if cfg.train.early_stop_patience < 0:
        bad("train.early_stop_patience", "must be >= 0")
    if cfg.run.keep_last < 0 or cfg.run.checkpoint_every < 0:
        bad("run", "keep_last and checkpoint_every must be >= 0")
    if cfg.optim.grad_accum < 1:
        bad("optim.grad_accum", "must be >= 1")
    if cfg.data.num_workers < 0 or cfg.data.shuffle_buffer < 1:
        bad("data", "num_workers must be >= 0 and shuffle_buffer >= 1")
    if cfg.model.name.lower() in ("resnet34",):
        cfg.model.name = "resnet34_unet"


def _coerce(key: str, value, typ, source: str):
    """Check (and for strings from --set, parse) one value against its field type."""
    origin = typing.get_origin(typ)
    if origin is list:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, list):
            raise UserError(f"{source}: {key} must be a list, got {value!r}")
        return [str(v) for v in value]
    if isinstance(value, str) and typ in (int, float):
        # Parsed here, not by YAML: YAML 1.1 reads "1e-4" (no dot) as a string.
        with contextlib.suppress(ValueError):
            value = typ(value)
    if typ is bool:
        if isinstance(value, str) and value.lower() in ("yes", "no", "true", "false"):
            value = value.lower() in ("yes", "true")
        ok = isinstance(value, bool)
    elif typ is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif typ is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    else:
        ok = isinstance(value, str)
        value = str(value) if isinstance(value, (int, float)) and not ok else value
        ok = isinstance(value, str)
    if not ok:
        raise UserError(f"{source}: {key} must be {typ.__name__}, got {value!r}")
    return value


def _apply(obj, data: dict, source: str, prefix: str = "") -> None:
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise UserError(
                f"{source}: unknown config key {full!r} (known: {', '.join(sorted(names))})"
            )
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise UserError(f"{source}: {full} must be a mapping")
            _apply(current, value, source, f"{full}.")
        else:
            typ = hints[key]
            if isinstance(typ, types.UnionType):  # int | str: the first type that fits
                *firsts, typ = typing.get_args(typ)
                for first in firsts:
                    with contextlib.suppress(UserError):
                        value, typ = _coerce(full, value, first, source), first
                        break
            setattr(obj, key, _coerce(full, value, typ, source))


def parse_set(items: list[str]) -> dict:
    """``["train.lr=1e-3", "model.name=unet"]`` -> nested dict of (still string) values."""
    out: dict = {}
    for item in items:
        if "=" not in item:
            raise UserError(f"--set {item!r}: expected section.key=value")
        key, value = item.split("=", 1)
        node = out
        *parents, leaf = key.strip().split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def load_config(path: str | Path | None = None, overrides: list[dict] | None = None) -> Config:
    """Defaults <- YAML file <- each override dict (from --set or legacy flags), checked."""
    cfg = Config()
    if path:
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except FileNotFoundError:
            raise UserError(f"config file {path} not found (see configs/ for examples)") from None
        except yaml.YAMLError as e:
            raise UserError(f"config file {path} is not valid YAML: {e}".splitlines()[0]) from None
        if not isinstance(data, dict):
            raise UserError(f"config file {path} must hold a mapping of sections")
        data.setdefault("name", path.stem)
        _apply(cfg, data, str(path))
    for over in overrides or []:
        _apply(cfg, over, "--set")
    _check(cfg)
    return cfg


def config_from_dict(data: dict) -> Config:
    """Rebuild a saved (resolved) config, e.g. from a checkpoint."""
    cfg = Config()
    _apply(cfg, data, "checkpoint config")
    return cfg


def dump_config(cfg: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
