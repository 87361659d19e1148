"""The trainer: one readable loop on Accelerate (`Trainer.fit` -> `train_one_epoch` -> `validate`).

Every decision (best epoch, preemption stop) is taken from all-reduced values, so all ranks
take it at the same step; only the main process writes files.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from accelerate.utils import gather_object

from dist_seg import metrics
from dist_seg.checkpoint import (
    TrainState,
    gather_zero_state,
    load_train_state,
    load_weights,
    load_zero_state,
    model_from_config,
    save_checkpoint,
    save_train_state,
)
from dist_seg.config import Config, config_from_dict, dump_config
from dist_seg.console import Console, wandb_mode
from dist_seg.data.manifest import FORMAT_VERSION, check_shards, load_manifest
from dist_seg.data.records import SampleRecorder, summarize
from dist_seg.data.sizes import resolve as resolve_size
from dist_seg.data.stream import build_loader
from dist_seg.data.transforms import random_flips, to_device
from dist_seg.ema import EMA
from dist_seg.errors import UserError
from dist_seg.evaluate import evaluate
from dist_seg.models.pretrained import (
    load_torchvision_resnet34,
    normalize_imagenet,
    uses_imagenet_norm,
)
from dist_seg.runtime import (
    LateFlags,
    Preemption,
    apply_speed_switches,
    make_accelerator,
    raise_on_any_rank,
    read_on_every_rank,
    release,
    sync_buffers,
)
from dist_seg.tracking import Tracker
from dist_seg.viz import plot_history

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: checkpoint saved, requeue me (launch/slurm/*.sbatch)


def loss_fn(
    logits: torch.Tensor, masks: torch.Tensor, kind: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean loss over valid pixels, BCE sum) of one batch; masks uint8 0/1/255."""
    masks = masks.unsqueeze(1)
    valid = (masks != metrics.IGNORE_INDEX).float()
    target = (masks == 1).float()
    bce_sum = metrics.masked_bce(logits, target, valid)
    loss = bce_sum / valid.sum().clamp_min(1)
    if kind == "bce_dice":
        prob = torch.sigmoid(logits.float()) * valid
        inter = (prob * target).sum(dim=(1, 2, 3))
        soft = (2 * inter + 1) / (prob.sum(dim=(1, 2, 3)) + target.sum(dim=(1, 2, 3)) + 1)
        loss = loss + (1 - soft).mean()
    return loss, bce_sum.detach()


def make_scheduler(optimizer, cfg: Config, total_steps: int):
    """Linear warmup, then constant, cosine or poly(0.9) decay, per optimizer step."""
    warmup, kind = cfg.optim.warmup_steps, cfg.optim.schedule

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        if kind == "cosine":
            return 0.5 * (1 + math.cos(math.pi * progress))
        if kind == "poly":
            return (1 - progress) ** 0.9
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def prepare_shards(cfg: Config, accelerator, console) -> str:
    """The shard location to train on: packs ``data.root`` into ``data.shards`` once, on the
    main process, and reuses that pack when it already matches (same source and size)."""
    from dist_seg.data.pack import pack

    shards = Path(cfg.data.shards)
    if not cfg.data.root:
        return cfg.data.shards
    manifest = shards / "manifest.json"
    current = json.loads(manifest.read_text()) if manifest.exists() else {}
    root = str(Path(cfg.data.root).resolve())
    size = cfg.data.size or 256  # a side or "HxW", as the manifest writes it
    aspect = "stretch" if cfg.data.aspect == "auto" else cfg.data.aspect
    fresh = (
        current.get("source", {}).get("root") == root
        and current.get("image_size") == size
        and current.get("aspect", "stretch") == aspect
        and current.get("format_version", 1) == FORMAT_VERSION  # older packs: repacked once
    )
    error = None
    if not fresh and accelerator.is_main_process:
        console.print(f"packing {root} into {shards} (once; later runs reuse it)")
        try:
            pack(Path(root), shards, size=size, workers=max(1, (os.cpu_count() or 2) // 2),
                 aspect=aspect)  # fmt: skip
        except UserError as e:
            error = e
    raise_on_any_rank(accelerator, error)
    return str(shards)


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 of every parameter and buffer: equal on all ranks after a correct DDP run."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class Trainer:
    def __init__(self, cfg: Config, resume: str | None = None, train_loader=None):
        """``train_loader``: train on this loader instead of building one from ``cfg`` (the
        benchmarks pass one). It does what stream.EpochLoader does: ``set_epoch``,
        ``len()`` (batches left in the epoch), ``skip_batches``, ``trained_before``,
        ``keys_trained_before``, ``state_dict``, ``load_state_dict``, and batches
        ``{"name", "key", "image" uint8 NCHW, "mask" uint8 NHW}``."""
        self.cfg = cfg
        log_with = "wandb" if wandb_mode(cfg.wandb.mode) != "disabled" else None
        self.accelerator = acc = make_accelerator(
            cfg.train.precision, cfg.optim.grad_accum, log_with
        )
        apply_speed_switches(cfg.train.cudnn_benchmark, cfg.train.tf32, cfg.train.deterministic)
        if cfg.train.sync_bn and acc.device.type != "cuda":
            raise UserError(
                "train.sync_bn=true needs GPUs: torch's SyncBatchNorm does not run on CPU; "
                "set train.sync_bn=false"
            )
        if acc.gradient_accumulation_steps != cfg.optim.grad_accum:
            raise UserError(
                f"the accelerate config asks for {acc.gradient_accumulation_steps} gradient "
                f"accumulation steps, the run config for {cfg.optim.grad_accum}: make them agree "
                "(optim.grad_accum and the launch config's gradient_accumulation_steps)"
            )
        self.main, self.rank, self.world = acc.is_main_process, acc.process_index, acc.num_processes
        self.console = Console(enabled=self.main, log_every=cfg.train.log_every)
        self.run_dir = cfg.run_dir()
        error = None
        if self.main:
            try:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                tempfile.TemporaryFile(dir=self.run_dir).close()  # writable? config.yaml comes
                # only once every check has passed: a failed start leaves a run as it was
            except OSError as e:
                error = UserError(
                    f"cannot write the run directory {self.run_dir}: {e.strerror}; set run.out_dir"
                )
        raise_on_any_rank(acc, error)  # not only on the main process: others would wait

        self.manifest = load_manifest(prepare_shards(cfg, acc, self.console))
        # The size and aspect policy trained at (0 / auto: the pack's), as config.yaml and the
        # checkpoints record them for evaluate, predict and export.
        cfg.data.size, cfg.data.aspect = resolve_size(cfg.data.size, cfg.data.aspect, self.manifest)
        splits = (cfg.data.train_split, cfg.data.val_split)
        raise_on_any_rank(acc, check_shards(self.manifest, splits, self.rank, self.world))
        common = dict(rank=self.rank, world_size=self.world, num_workers=cfg.data.num_workers,
                      border=cfg.data.border, size=cfg.data.size, aspect=cfg.data.aspect,
                      pin_memory=cfg.data.pin_memory and acc.device.type == "cuda",
                      persistent_workers=cfg.data.persistent_workers, decode=cfg.data.decode,
                      device=acc.device, say=self.console.line)  # fmt: skip
        self.train_loader = train_loader if train_loader is not None else build_loader(
            self.manifest, cfg.data.train_split, batch_size=cfg.train.batch_size, train=True,
            seed=cfg.train.seed, shuffle_buffer=cfg.data.shuffle_buffer, **common,
        )  # fmt: skip
        self.val_loader = build_loader(
            self.manifest, cfg.data.val_split, train=False,
            batch_size=cfg.train.eval_batch_size or cfg.train.batch_size, **common,
        )  # fmt: skip

        torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
        model = model_from_config(cfg)
        if cfg.model.pretrained:  # before resume: a resume overwrites these weights
            load_torchvision_resnet34(model.encoder, cfg.model.pretrained)
        self.normalize = uses_imagenet_norm(cfg)
        if cfg.train.sync_bn:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        # Not under DeepSpeed: ZeRO makes every weight a contiguous view of its flat buffer
        # anyway, and its first broadcast fails on channels-last weights ("self.stride(-1)
        # must be 1 to view Float as Byte"); the inputs stay channels-last.
        if cfg.train.channels_last and acc.state.deepspeed_plugin is None:
            model = model.to(memory_format=torch.channels_last)
        optimizer, self.fused = make_adam(
            model, cfg, acc.state.deepspeed_plugin is not None, acc.device
        )
        self.steps_per_epoch = len(self.train_loader)
        total = cfg.train.epochs * self.steps_per_epoch // cfg.optim.grad_accum
        self.scheduler = make_scheduler(optimizer, cfg, total)
        self.deepspeed = acc.state.deepspeed_plugin is not None
        # Where training stands; all of it goes into last.pt (checkpoint.TrainState).
        self.epoch, self.step, self.history = 0, 0, []
        self.best = {"dice_per_image": -1.0, "epoch": 0}
        self.train_sums = torch.zeros(2, dtype=torch.float64)
        self.stop_requested, self.skipped_batches = False, 0
        self.bn: list[torch.Tensor] = []  # BatchNorm buffers restored after a skipped batch
        self.epoch_base = 0  # global step at which the current epoch's plan began
        # The audit trail: every rank's trained keys (history digest; files if asked).
        self.recorder = SampleRecorder(self.run_dir, self.rank, self.world, cfg.data.record_samples)
        self.loader_positioned = False  # True once a resume has placed the train loader
        # Resume before prepare: DDP broadcasts rank 0's weights once, in prepare, and
        # DeepSpeed builds its fp32 master partitions there; both must start from these.
        self.resumed_from: Path | None = None
        state = self.load_state(resume) if resume else None
        if state is not None:
            self.restore(state, model, optimizer)
        if self.deepspeed:
            # DeepSpeed wants the micro batch; accelerate takes it from a prepared loader,
            # which a WebDataset loader must not be (DESIGN.md section 2).
            ds = acc.state.deepspeed_plugin.deepspeed_config
            ds["train_micro_batch_size_per_gpu"] = cfg.train.batch_size
        self.model, self.optimizer = acc.prepare(model, optimizer)
        if state is not None and self.deepspeed:  # ZeRO's slices exist only from prepare on
            note = load_zero_state(self.optimizer, state.optimizer, self.resumed_from)
            if note:
                self.console.print(note)
        self.train_sums = self.train_sums.to(acc.device)
        self.dtype = next(self.model.parameters()).dtype  # bf16 under DeepSpeed bf16
        self.ema = make_ema(self.raw_model, cfg) if cfg.train.ema_decay else None
        if self.ema is not None and state is not None:
            if state.ema is None:
                raise UserError(
                    f"checkpoint {self.resumed_from} has no EMA weights; resume with "
                    "train.ema_decay=0"
                )
            self.ema.load_state_dict(state.ema)
        if cfg.train.compile:
            self.model = torch.compile(self.model)
        self.on_main(lambda: dump_config(cfg, self.run_dir / "config.yaml"))
        # summary.json describes the latest attempt only ("preempted" is what a job reads)
        self.on_main(lambda: (self.run_dir / "summary.json").unlink(missing_ok=True))
        self.preemption = Preemption()
        # The step's decisions, taken on the device and read by the host a step late.
        self.flags = LateFlags(acc, self.preemption)
        self.window_bad = torch.zeros(1, device=acc.device)  # non-finite losses in the window
        self.coins = torch.Generator(device=acc.device)  # the flips' coins, reseeded each step
        self.tracker = Tracker(acc, cfg, self.run_dir)

    @property
    def raw_model(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.model)

    # --- the loop ------------------------------------------------------------------------
    def fit(self) -> dict:
        cfg, acc = self.cfg, self.accelerator
        self.console.print(
            f"[bold]{cfg.model.name}[/] width {cfg.model.width} on {self.world} x "
            f"{acc.device.type} ({acc.mixed_precision} precision) | "
            f"{self.manifest.num_samples(cfg.data.train_split)} train / "
            f"{self.manifest.num_samples(cfg.data.val_split)} val images | global batch "
            f"{self.world} proc x {cfg.train.batch_size} x {cfg.optim.grad_accum} accum = "
            f"{self.world * cfg.train.batch_size * cfg.optim.grad_accum} | "
            f"{self.steps_per_epoch} steps/epoch per rank | lr {cfg.optim.lr:g} | {self.run_dir}"
        )
        t_start = time.perf_counter()
        try:
            while self.epoch < cfg.train.epochs:
                t0 = time.perf_counter()
                if not self.train_one_epoch():
                    self.save("last.pt")
                    return self.preempted(t_start)
                self.validate(time.perf_counter() - t0)
                if self.stop_requested and self.epoch < cfg.train.epochs:  # last.pt is fresh
                    return self.preempted(t_start)
                patience = cfg.train.early_stop_patience  # decided from all-reduced Dice
                if patience and self.epoch - self.best["epoch"] >= patience:
                    self.console.print(f"early stop: no better val Dice for {patience} epochs")
                    return self.finish({"preempted": False, "early_stopped": self.epoch}, t_start)
        except BaseException:
            stop_workers(self.train_loader, self.val_loader)
            raise
        return self.finish({"preempted": False}, t_start)

    def preempted(self, t_start: float) -> dict:
        self.console.print(f"preempted: saved {self.run_dir / 'last.pt'} at epoch "
                           f"{self.epoch + 1} step {self.step}; exiting {EXIT_PREEMPTED}")  # fmt: skip
        return self.finish({"preempted": True}, t_start)

    def train_one_epoch(self) -> bool:
        """Trains from ``self.step`` to the end of ``self.epoch``; False if preempted."""
        cfg, acc = self.cfg, self.accelerator
        loader = self.train_loader
        if not self.loader_positioned:  # a resume has placed it already (load_state_dict)
            loader.set_epoch(self.epoch, skip_batches=self.step)
        self.loader_positioned = False
        # A resumed epoch replanned for another world size is shorter than a full one.
        epoch_steps = loader.skip_batches + len(loader)
        self.recorder.start_epoch(self.epoch, loader.trained_before(self.epoch))
        self.model.train()
        global_batch = cfg.train.batch_size * self.world
        # train.nonfinite=skip: the forward of a skipped batch has already moved BatchNorm's
        # running statistics; they are put back from a copy (a few KB, every step).
        self.bn = batchnorm_buffers(self.raw_model) if cfg.train.nonfinite == "skip" else []
        save_due = False
        t0, start = time.perf_counter(), self.step
        with self.console.progress(f"epoch {self.epoch + 1}", len(loader)) as update:
            for data in loader:
                boundary = self.train_step(data, last=epoch_steps - 1)
                self.step += 1
                self.recorder.add(data["key"])  # trained (or skipped as non-finite): consumed
                every = cfg.run.checkpoint_every
                save_due |= bool(every) and self.global_step() % every == 0
                if self.step % cfg.train.log_every == 0 or self.step == epoch_steps:
                    self.settle()  # logging syncs anyway: this step's flags, now
                    # global, not rank 0's
                    window = acc.reduce(self.train_sums.clone(), reduction="sum")
                    loss_now = (window[0] / window[1]).item()
                    throughput = (self.step - start) * global_batch / (time.perf_counter() - t0)
                    self.tracker.log({"train/loss": loss_now, "train/lr": self.scheduler.get_last_lr()[0],
                                      "train/images_per_s": throughput}, step=self.global_step())  # fmt: skip
                    update(loss=loss_now, img_s=throughput)
                else:
                    update()
                # Stops and periodic saves only between windows: a checkpoint never needs
                # gradients accumulated so far (a few more batches at most).
                if not boundary or self.step == epoch_steps:
                    continue
                if self.stop_requested:
                    return False
                if save_due:
                    self.save("last.pt")
                    save_due = False
        self.settle()  # the epoch's last step
        return True

    def train_step(self, data: dict, last: int) -> bool:
        """One batch: forward, backward and, when it closes an accumulation window, the
        optimizer step. It only queues device work and never waits for the device (no host
        sync: tests/test_no_sync.py); the flags it all-reduces are acted on a step later
        (``settle``). Returns whether the batch closed a window."""
        cfg, acc = self.cfg, self.accelerator
        images, masks = to_device(data, acc.device, cfg.train.channels_last, self.dtype)
        if cfg.data.flip:  # coins from (seed, epoch, step, rank): resumes flip alike
            key = hash((cfg.train.seed, self.epoch, self.step, self.rank)) % (2**62)
            images, masks = random_flips(images, masks, self.coins.manual_seed(key))
        if self.normalize:
            images = normalize_imagenet(images)
        # Accumulation windows of grad_accum batches start afresh every epoch and the last
        # one closes at the epoch's end: accelerate would see the end only of a loader it
        # prepared, which a WebDataset loader must not be (DESIGN.md 2). Set from the
        # position alone, so a resumed run's windows are the same.
        accum = cfg.optim.grad_accum
        acc.step = accum - 1 if self.step == last else self.step % accum
        before = [b.clone() for b in self.bn]
        with acc.accumulate(self.model):
            boundary = acc.sync_gradients  # this batch ends a window: optimizer step
            logits = self.model(images)
            loss, bce_sum = loss_fn(logits, masks, cfg.optim.loss)
            bad = ~torch.isfinite(loss)  # this rank's batch
            # One all-reduce of two flags per step, queued on the device: any rank's loss
            # non-finite, any rank asked to stop (the signal comes 90 s before the kill: a
            # check every N steps could miss it on slow steps).
            flags = self.flags.reduce(bad)
            skip = flags[0] > 0  # any rank's: every rank skips alike
            first = self.step % accum == 0
            self.window_bad = flags[:1] if first else self.window_bad + flags[:1]
            if acc.scaler is not None:  # an overflowed logit gives an inf loss with finite
                loss = loss * torch.where(skip, torch.nan, 1.0)  # grads: make the scaler skip
            if self.deepspeed:  # its optimizer steps inside backward: skipped from the host
                self.settle()
                if flags[0].item() == 0:  # the one host sync left, DeepSpeed only
                    acc.backward(loss)
            else:  # every rank runs backward, a non-finite loss too (DDP would hang otherwise)
                acc.backward(loss)
                self.settle()  # the last step's flags, read while this step's work runs
            for buf, old in zip(self.bn, before, strict=True):  # after backward, which reads
                buf.copy_(torch.where(skip, old, buf))  # them: a skipped batch's BN moves undone
            if boundary and cfg.optim.grad_clip > 0:
                acc.clip_grad_norm_(self.model.parameters(), cfg.optim.grad_clip)
            skipped = self.optimizer_step(boundary)
            self.optimizer.zero_grad(set_to_none=True)
        counts = torch.stack([bce_sum.double(), (masks != metrics.IGNORE_INDEX).sum().double()])
        self.train_sums += torch.where(skip, 0.0, counts)
        self.flags.push(torch.cat([flags, skipped]),
                        (self.epoch, self.step, self.global_step(), boundary))  # fmt: skip
        return boundary

    def optimizer_step(self, boundary: bool) -> torch.Tensor:
        """The optimizer step (accelerate takes it at window boundaries only), skipped on the
        device when a loss in the window was non-finite: fused Adam takes that as its
        ``found_inf`` (as the grad scaler hands it), the EMA as a zero weight. Returns the
        device flag [1] of a skipped step (fp16: the grad scaler's skip too)."""
        acc, inner = self.accelerator, self.optimizer.optimizer
        skipped = (self.window_bad > 0).float() if boundary else torch.zeros_like(self.window_bad)
        scaler = acc.scaler  # fp16: the scaler passes its own found_inf (non-finite grads)
        scale = scaler._scale.clone() if boundary and scaler is not None else None
        if boundary and scaler is None and self.fused:
            inner.found_inf = skipped.reshape(())
        if not boundary or self.fused or self.deepspeed or skipped.item() == 0:  # .item():
            self.optimizer.step()  # only without a fused kernel for this device
        inner.__dict__.pop("found_inf", None)
        if scale is not None:  # the scaler backs off its scale exactly when it skipped
            skipped = torch.maximum(skipped, (scaler._scale < scale).float())
        if boundary and self.deepspeed and self.optimizer.step_was_skipped:  # fp16 overflow
            skipped = torch.ones_like(skipped)  # (DeepSpeed's step already synced the host)
        if boundary and self.ema is not None:  # every rank: the weights are the same
            self.ema.update_parameters(self.raw_model, skip=skipped)
        return skipped

    def settle(self) -> None:
        """Acts on the last step's flags, all-reduced on the device then, the same on every
        rank: counts a non-finite batch (or stops on it: train.nonfinite=stop; its optimizer
        step was skipped on the device), steps the LR scheduler after an optimizer step that
        was taken (read before the next one, which is the first to use the new rate), and
        notes a stop request (acted on at the next window boundary)."""
        values, about = self.flags.read()
        if values is None:
            return
        (bad, stop, skipped), (epoch, step, global_step, boundary) = values, about
        if bad > 0:
            if self.cfg.train.nonfinite == "stop":
                raise UserError(
                    f"non-finite loss at epoch {epoch + 1} step {step + 1} (global step "
                    f"{global_step + 1}); the last good checkpoint is {self.run_dir / 'last.pt'}. "
                    "Lower optim.lr, set optim.grad_clip, or set train.nonfinite=skip"
                )
            self.skipped_batches += 1
        if boundary and skipped == 0:
            self.scheduler.step()
        self.stop_requested |= stop > 0

    def validate(self, train_seconds: float) -> None:
        cfg, acc = self.cfg, self.accelerator
        totals = acc.reduce(self.train_sums, reduction="sum")
        sync_buffers(self.model, acc)
        panel = []  # the first validation images of the main process: the same every epoch
        val = evaluate(self.raw_model, self.val_loader, acc, channels_last=cfg.train.channels_last,
                       console=self.console, on_batch=self.tracker.collector(panel),
                       normalize=self.normalize)  # fmt: skip
        if self.ema is not None:
            sync_buffers(self.ema, acc)
            ema = evaluate(self.ema.module, self.val_loader, acc, normalize=self.normalize,
                           channels_last=cfg.train.channels_last)  # fmt: skip
            val |= {f"ema_{k}": v for k, v in ema.items() if k != "num_images"}
        keys = self.recorder.end_epoch()  # this rank's, then every rank's
        everyone = gather_object(keys) if self.world > 1 else keys
        samples, digest = summarize(everyone + self.train_loader.keys_trained_before(self.epoch))
        row = {
            "epoch": self.epoch + 1,
            "train_loss": (totals[0] / totals[1]).item(),
            "val_loss": val["loss"],
            "val_dice_per_image": val["dice_per_image"],
            "val_dice_dataset": val["dice_dataset"],
            "val_iou_per_image": val["iou_per_image"],
            "val_iou_dataset": val["iou_dataset"],
            "val_images": val["num_images"],
            **{f"val_{k}": v for k, v in val.items() if k.startswith("ema_")},
            "skipped_batches": self.skipped_batches,
            "train_samples": samples,  # trained this epoch, all ranks
            "train_samples_digest": digest,  # sha256 of the sorted keys (records.py)
            "lr": self.scheduler.get_last_lr()[0],
            "epoch_seconds": round(train_seconds, 2),
        }
        self.history.append(row)
        key = "val_ema_dice_per_image" if cfg.train.select == "ema" else "val_dice_per_image"
        improved = row[key] > self.best["dice_per_image"]  # all-reduced: same on all ranks
        if improved:
            self.best = {"dice_per_image": row[key], "epoch": self.epoch + 1}
        self.epoch_base += self.step
        self.epoch, self.step = self.epoch + 1, 0
        self.train_sums.zero_()
        self.tracker.log({f"val/{k[4:]}": v for k, v in row.items() if k.startswith("val_")}
                         | {"epoch": row["epoch"], "epoch_seconds": row["epoch_seconds"]},
                         step=self.global_step())  # fmt: skip
        self.tracker.log_images(panel, step=self.global_step())
        self.console.table(
            f"epoch {row['epoch']}/{cfg.train.epochs}" + (" (best)" if improved else ""), row
        )
        self.save("last.pt")
        if improved:
            self.save("best.pt")
        self.on_main(lambda: write_history(self.history, self.run_dir))
        self.tracker.log_curves(self.run_dir / "curves.png", step=self.global_step())

    def global_step(self) -> int:
        return self.epoch_base + self.step

    # --- checkpoints ---------------------------------------------------------------------
    def on_main(self, write) -> None:
        """Run ``write()`` on the main process; a failure there (a full disk) is one error
        on every rank: the others would otherwise wait in the next collective."""
        error = None
        if self.main:
            try:
                write()
            except UserError as e:
                error = e
            except OSError as e:
                error = UserError(
                    f"cannot write in {self.run_dir} ({e.strerror or e}: {e.filename}); the last "
                    "checkpoint is intact. Free disk space or set run.out_dir"
                )
        raise_on_any_rank(self.accelerator, error)

    def save(self, name: str) -> None:
        """Collective (buffers are broadcast, train sums gathered); only the main process writes."""
        acc = self.accelerator
        self.settle()  # the scheduler and counters up to date with the last step
        sync_buffers(self.model, acc)
        weights = acc.get_state_dict(self.model)
        if self.ema is not None:
            sync_buffers(self.ema, acc)
        sums = self.train_sums.unsqueeze(0)  # (ranks, 2): every rank's share of the epoch
        sums = acc.gather(sums).cpu() if self.world > 1 else sums.cpu()
        # ZeRO shards Adam's state over the ranks: last.pt gets it whole from every rank.
        zero = {}
        if self.deepspeed and name != "best.pt":
            zero = gather_zero_state(self.optimizer, self.main)

        def write():
            if name == "best.pt":  # best.pt holds the weights that were chosen
                ema = self.cfg.train.select == "ema"
                state = {"model": self.ema.module.state_dict() if ema else weights,
                         "config": self.cfg.to_dict(), "epoch": self.epoch, "best": self.best,
                         "metrics": self.history[-1]}  # fmt: skip
                save_checkpoint(state, self.run_dir / name)
                return
            state = TrainState(
                model=weights, config=self.cfg.to_dict(), epoch=self.epoch, step=self.step,
                optimizer=zero if self.deepspeed else self.optimizer.state_dict(),
                scheduler=self.scheduler.state_dict(),
                scaler=acc.scaler.state_dict() if acc.scaler is not None else None,
                ema=self.ema.state_dict() if self.ema is not None else None,
                accumulation={"grad_accum": self.cfg.optim.grad_accum,
                              "pending_micro_steps": 0},  # saves happen between windows only
                data_plan=self.train_loader.state_dict(
                    self.epoch, self.step, grad_accum=self.cfg.optim.grad_accum
                ),
                global_step=self.global_step(), history=self.history, best=self.best,
                skipped_batches=self.skipped_batches, train_sums=sums,
                wandb_id=self.tracker.run_id,
            )  # fmt: skip
            save_train_state(state, self.run_dir / name)
            if self.cfg.run.keep_last:
                keep_numbered(self.run_dir, self.global_step(), self.cfg.run.keep_last)

        self.on_main(write)

    def load_state(self, resume: str) -> TrainState | None:
        """The checkpoint to resume from, decided once by the main process and read the same
        on every rank (broadcast where a rank cannot see the main process's file)."""
        path = self.run_dir / "last.pt" if resume == "auto" else Path(resume)
        if resume == "auto" and not (self.main and path.exists()):
            path = None  # only the main process's view counts
        data = read_on_every_rank(self.accelerator, path)
        if data is None:
            self.console.print(f"no checkpoint in {self.run_dir}: starting fresh")
            return None
        self.resumed_from = path = self.run_dir / "last.pt" if resume == "auto" else Path(resume)
        return load_train_state(data, path)

    def restore(self, state: TrainState, model, optimizer) -> None:
        """Checks ``state`` against this run, then loads it (before accelerator.prepare)."""
        path, cfg = self.resumed_from, self.cfg
        saved = config_from_dict(state.config)
        if (saved.model.name, saved.model.width) != (cfg.model.name, cfg.model.width):
            raise UserError(
                f"checkpoint {path} is a {saved.model.name} width {saved.model.width}, this run a "
                f"{cfg.model.name} width {cfg.model.width}; resume with the same model"
            )
        if state.accumulation.get("pending_micro_steps", 0):
            raise UserError(
                f"checkpoint {path} was saved inside a gradient-accumulation window, without "
                "its gradients; resume from an end-of-epoch checkpoint (checkpoints/)"
            )
        load_weights(model, state.model, path)
        if self.deepspeed:  # ZeRO's optimizer state: after prepare (load_zero_state)
            pass
        elif state.optimizer and "zero" not in state.optimizer:
            optimizer.load_state_dict(state.optimizer)
            for group in optimizer.param_groups:  # the saved groups' kind (older files: foreach)
                group["fused"], group["foreach"] = (True, None) if self.fused else (None, True)
        else:
            why = "saved under DeepSpeed ZeRO" if state.optimizer else "none in the checkpoint"
            self.console.print(
                f"[yellow]warning[/]: optimizer state not restored ({why}); Adam restarts its moments"
            )
        self.scheduler.load_state_dict(state.scheduler)
        if state.scaler is not None and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(state.scaler)
        self.epoch, self.step = state.epoch, state.step
        self.history, self.best = state.history, state.best
        self.skipped_batches = state.skipped_batches
        sums = state.train_sums.to(torch.float64).reshape(-1, 2)
        if len(sums) == self.world:  # each rank its own share, as before the stop
            self.train_sums = sums[self.rank].clone()
        else:  # the epoch's total on one rank: the all-reduced train_loss stays right
            self.train_sums = sums.sum(0) if self.main else torch.zeros(2, dtype=torch.float64)
        # scripts parse this line; S counts batches of the interrupted run
        self.console.print(f"resumed from {path} at epoch {self.epoch + 1} step {self.step}")
        total = state.global_step if state.global_step >= 0 else (
            state.epoch * self.steps_per_epoch + state.step  # older files: same plan assumed
        )  # fmt: skip
        if state.data_plan.get("version") is None:  # before the data plan was saved
            note = (
                "checkpoint without a data-plan state (an older dist_seg): assuming it is unchanged"
            )
        else:  # the same batches, or the rest of the epoch replanned (data/plan.py)
            note = self.train_loader.load_state_dict(
                state.data_plan, grad_accum=cfg.optim.grad_accum
            )
            self.step, self.loader_positioned = self.train_loader.skip_batches, True
        self.epoch_base = total - self.step
        self.console.print(note)

    def finish(self, extra: dict, t_start: float) -> dict:
        digest = weights_digest(self.raw_model)
        digests = gather_object([digest]) if self.world > 1 else [digest]
        summary = {
            **extra,
            "ranks_agree": len(set(digests)) == 1,
            "weights_sha256_all_ranks": digests,
            "best_epoch": self.best["epoch"],
            "best_val_dice_per_image": self.best["dice_per_image"],
            "epochs_done": self.epoch,
            "wall_seconds": round(time.perf_counter() - t_start, 1),
            "run_dir": str(self.run_dir),
        }
        if self.main:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
            if not summary["ranks_agree"]:
                self.console.print(
                    f"[bold red]warning[/]: ranks ended with different weights: {digests}"
                )
            if not extra.get("preempted"):
                self.console.print(
                    f"[bold green]done[/] best epoch {summary['best_epoch']}: val Dice (per image) "
                    f"{summary['best_val_dice_per_image']:.4f}, {summary['wall_seconds']} s | "
                    f"{self.run_dir}/ best.pt last.pt history.csv curves.png"
                )
        self.tracker.finish()
        self.recorder.close()
        self.preemption.restore()
        self.model = self.optimizer = self.train_loader = self.val_loader = None
        release(self.accelerator)
        return summary


def stop_workers(*loaders) -> None:
    """End persistent loader workers now. After an error the traceback keeps their
    iterators alive until exit, where multiprocessing's exit handler terminates and joins
    them; they ignore SIGTERM (stream.init_worker), so a run that failed on a full disk hung
    there instead of exiting 2 (tests/test_fault_tolerance.py)."""
    for loader in loaders:
        iterator = getattr(getattr(loader, "loader", None), "_iterator", None)
        if iterator is not None:
            iterator._shutdown_workers()


def batchnorm_buffers(model: torch.nn.Module) -> list[torch.Tensor]:
    """Running mean, variance and batch count of every BatchNorm layer."""
    norms = (torch.nn.modules.batchnorm._BatchNorm, torch.nn.SyncBatchNorm)
    return [b for m in model.modules() if isinstance(m, norms) for b in m.buffers()]


def make_adam(model: torch.nn.Module, cfg: Config, deepspeed: bool, device: torch.device):
    """(Adam, fused?). Fused wherever torch has the kernel (CUDA, CPU): one kernel for all
    parameters, and it takes the skip of a step as a device flag (``found_inf``), so the
    step never reads it on the host. On CPU it is also 5x faster than foreach (UNet: 17 vs
    94 ms per step, AMD EPYC AVX512-BF16). Under DeepSpeed, whose ZeRO optimizer wraps this
    one's flattened groups, foreach."""
    kw = dict(lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    if not deepspeed and device.type in fused_devices():
        return torch.optim.Adam(model.parameters(), fused=True, **kw), True
    return torch.optim.Adam(model.parameters(), foreach=True, **kw), False


def fused_devices() -> list[str]:
    """Device types with fused Adam kernels (torch checks only at the first step, after the
    model has moved there: asked here by name, before)."""
    try:
        from torch.optim.optimizer import _get_fused_kernels_supported_devices
    except ImportError:  # a torch that moved it
        return ["cuda"]
    return _get_fused_kernels_supported_devices()


def make_ema(model: torch.nn.Module, cfg: Config) -> EMA:
    """EMA of parameters and buffers; with warmup the decay is min(decay, (1+n)/(10+n))."""
    return EMA(model, cfg.train.ema_decay, cfg.train.ema_warmup)


def keep_numbered(run_dir: Path, step: int, keep: int) -> None:
    """checkpoints/step-N.pt as a hard link to last.pt (no extra disk), the newest ``keep``."""
    folder = run_dir / "checkpoints"
    folder.mkdir(exist_ok=True)
    target = folder / f"step-{step:09d}.pt"
    target.unlink(missing_ok=True)
    try:
        os.link(run_dir / "last.pt", target)
    except OSError:  # file systems without hard links
        shutil.copyfile(run_dir / "last.pt", target)
    for old in sorted(folder.glob("step-*.pt"))[:-keep]:
        old.unlink()


def write_history(history: list[dict], run_dir: Path) -> None:
    """history.csv, history.json and curves.png, each replaced atomically."""
    keys = list(history[0])
    csv = "\n".join([",".join(keys)] + [",".join(str(r[k]) for k in keys) for r in history]) + "\n"
    for name, text in (("history.csv", csv), ("history.json", json.dumps(history, indent=1))):
        tmp = run_dir / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, run_dir / name)
    plot_history(history, run_dir / "curves.png", title=run_dir.name)


def train(cfg: Config, resume: str | None = None) -> dict:
    """Train ``cfg`` (optionally resuming); returns the summary also written to summary.json."""
    return Trainer(cfg, resume=resume).fit()
