"""W&B through accelerate's tracker, on the main process only; a no-op when disabled.

Online, offline or disabled comes from ``wandb.mode`` or WANDB_MODE. An online start that
fails (no API key, server unreachable: bounded by WANDB_INIT_TIMEOUT, default
``INIT_TIMEOUT_S``) warns and logs offline instead: ``wandb sync runs/NAME/wandb/offline-run-*``
uploads it later. The run id lives in ``runs/NAME/wandb_id.txt``, so a resumed or requeued
job continues the same W&B run.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import string
import struct
import sys
from pathlib import Path

from dist_seg.config import Config
from dist_seg.console import wandb_mode

INIT_TIMEOUT_S = 30.0  # wandb's own default is 90 s; W&B adds ~10 s to it for the resume check


class Tracker:
    def __init__(self, accelerator, cfg: Config, run_dir: Path):
        self.accelerator, self.cfg, self.run_dir = accelerator, cfg, run_dir
        self.enabled = wandb_mode(cfg.wandb.mode) != "disabled"
        self.step = 0
        # What this W&B run already holds (from a run that was killed after its last
        # checkpoint): the highest step, and the keys logged at it. Nothing at or below it
        # is logged again, so a requeued run shows every step once (issue 12 item 9).
        self.seen_step, self.seen_keys = -1, set()
        if self.enabled and accelerator.is_main_process:
            run_id = self.run_id
            if run_id is not None:
                self.seen_step, self.seen_keys = logged_steps(self.run_dir, run_id)
            self._start(wandb_mode(cfg.wandb.mode))

    @property
    def run_id(self) -> str | None:
        """The W&B run id this run logs to (kept in the run dir, also saved in last.pt)."""
        path = self.run_dir / "wandb_id.txt"
        return path.read_text().strip() if self.enabled and path.exists() else None

    def _start(self, mode: str) -> None:
        import wandb

        acc, cfg = self.accelerator, self.cfg
        kwargs = wandb_kwargs(cfg, self.run_dir) | {"mode": mode}
        try:
            acc.init_trackers(
                cfg.wandb.project, config=cfg.to_dict(), init_kwargs={"wandb": kwargs}
            )
        except Exception as e:  # CommError, UsageError (no API key), ServerResponseError...
            if mode != "online":
                raise
            why = (str(e).splitlines() or [type(e).__name__])[0]
            print(f"warning: W&B online start failed ({why}); logging "
                  f"offline to {self.run_dir / 'wandb'} (upload later with wandb sync)",
                  file=sys.stderr, flush=True)  # fmt: skip
            acc.trackers.clear()
            wandb.teardown()  # the service still holds the failed run's id
            return self._start("offline")
        run = acc.get_tracker("wandb", unwrap=True)  # the run table shows the best epoch's
        run.define_metric("val/dice_per_image", summary="max")
        run.define_metric("val/loss", summary="min")

    def log(self, values: dict, step: int | None = None) -> None:
        """Log at the given global optimizer step (or one past the last logged)."""
        self.step = step if step is not None else self.step + 1
        if self.step < self.seen_step:
            return
        if self.step == self.seen_step:
            values = {k: v for k, v in values.items() if k not in self.seen_keys}
        if self.enabled and values:
            self._guarded(self.accelerator.log, values, step=self.step)

    def _guarded(self, call, *args, **kwargs) -> None:
        """W&B must never cost a checkpoint. When Slurm signals every process of a job,
        SIGTERM also ends the W&B service process, and the next log raised
        ConnectionResetError before the workers could save (launch/README.md): warn once
        and go on without W&B."""
        try:
            call(*args, **kwargs)
        except Exception as e:
            why = (str(e).splitlines() or [type(e).__name__])[0]
            print(f"warning: W&B stopped working ({type(e).__name__}: {why[:120]}); training "
                  f"goes on without it (the run's files are in {self.run_dir})",
                  file=sys.stderr, flush=True)  # fmt: skip
            self.enabled = False
            with contextlib.suppress(Exception):  # drop the dead service: no traceback at exit
                import wandb

                wandb.teardown()

    def collector(self, panel: list):
        """An evaluate() on_batch hook keeping the first ``wandb.log_images`` samples as
        (name, image 3xHxW uint8 tensor, prediction HxW bool tensor, truth HxW uint8); None
        when off."""
        limit = self.cfg.wandb.log_images
        if not (self.enabled and self.accelerator.is_main_process and limit > 0):
            return None

        def keep(batch, logits):
            for i in range(min(len(batch["name"]), limit - len(panel))):
                # Kept where they are (on the device with data.decode=gpu): read once, in
                # log_images, not per batch (a read from the device is a host sync).
                image, pred = batch["image"][i], logits[i, 0] > 0
                panel.append((batch["name"][i], image, pred, batch["mask"][i].numpy()))

        return keep

    def log_images(self, panel: list, step: int) -> None:
        """Validation images with predicted and true masks as interactive W&B overlays."""
        if not (self.enabled and panel):
            return
        import wandb

        labels = {0: "background", 1: "pet"}
        images = [
            wandb.Image(image.permute(1, 2, 0).cpu().numpy(), caption=name, masks={
                "prediction": {"mask_data": pred.cpu().numpy().astype("uint8"),
                               "class_labels": labels},
                "truth": {"mask_data": (truth == 1).astype("uint8"), "class_labels": labels},
            })
            for name, image, pred, truth in panel
        ]  # fmt: skip
        self.log({"val/examples": images}, step=step)

    def log_curves(self, path: Path, step: int) -> None:
        """The learning-curve PNG (written by the main process just before)."""
        if self.enabled and self.accelerator.is_main_process and Path(path).exists():
            import wandb

            self.log({"curves": wandb.Image(str(path))}, step=step)

    def finish(self) -> None:
        if not self.enabled:
            return
        best = self.run_dir / "best.pt"
        wanted = self.cfg.wandb.log_checkpoint
        if wanted and self.accelerator.is_main_process and best.exists():
            import wandb

            run = self.accelerator.get_tracker("wandb", unwrap=True)
            artifact = wandb.Artifact(f"{self.cfg.run_name()}-best", type="model")
            artifact.add_file(str(best))
            self._guarded(run.log_artifact, artifact, aliases=["best"])
        # Not accelerator.end_training(): it also destroys the process group on every rank,
        # and runtime.release still needs it (a 2-process W&B run then exited 1, DESIGN 3).
        for tracker in self.accelerator.trackers:  # the main process's only
            self._guarded(tracker.finish)


def logged_steps(run_dir: Path, run_id: str) -> tuple[int, set[str]]:
    """(highest step, the keys logged at it) over this run's local W&B files, online and
    offline ones alike (each start of a requeued job writes its own `*run-*/run-ID.wandb`);
    (-1, set()) when there are none. Read here because wandb 0.31 ships no Python reader
    for its transaction log (its reader is in the Go service): the file is a LevelDB-style
    log of wandb_internal_pb2.Record protobufs, 32 KiB blocks of chunks with a 7-byte
    header (crc32c, length, type), after a 7-byte file header. A tail cut by a kill ends the
    scan; what was written before it counts."""
    from wandb.proto import wandb_internal_pb2

    best, keys = -1, set()
    for path in sorted(run_dir.glob(f"wandb/*run-*/run-{run_id}.wandb")):
        for record in _log_records(path.read_bytes(), wandb_internal_pb2.Record):
            if record.WhichOneof("record_type") != "history":
                continue
            step = record.history.step.num
            names = {i.key or i.nested_key[0] for i in record.history.item}
            if step > best:
                best, keys = step, set()
            if step == best:
                keys |= {n for n in names if not n.startswith("_")}
    return best, keys


def _log_records(data: bytes, record_type):
    block, pos, chunks = 32768, 7, []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = struct.unpack_from("<HB", data, pos + 4)
        body = data[pos + 7 : pos + 7 + length]
        if kind == 0 or len(body) < length:
            return
        pos += 7 + length
        chunks.append(body)
        if kind in (1, 4):  # FULL, or the LAST chunk of a record
            record = record_type()
            try:
                record.ParseFromString(b"".join(chunks))
            except Exception:  # a damaged record: the rest cannot be trusted
                return
            chunks = []
            yield record


def wandb_kwargs(cfg: Config, run_dir: Path) -> dict:
    import wandb

    timeout = float(os.environ.get("WANDB_INIT_TIMEOUT", INIT_TIMEOUT_S))
    kwargs = {
        "dir": str(run_dir),
        "name": cfg.run_name(),
        "mode": wandb_mode(cfg.wandb.mode),
        "id": stable_run_id(run_dir),
        "resume": "allow",
        "settings": wandb.Settings(init_timeout=timeout),
    }
    if cfg.wandb.entity:
        kwargs["entity"] = cfg.wandb.entity
    if cfg.wandb.group:
        kwargs["group"] = cfg.wandb.group
    if cfg.wandb.tags:
        kwargs["tags"] = cfg.wandb.tags
    return kwargs


def stable_run_id(run_dir: Path) -> str:
    """A resumed or requeued job continues the same W&B run: the id lives in the run dir.
    A new run takes WANDB_RUN_ID where it is set (a sweep agent sets it for each trial)."""
    path = run_dir / "wandb_id.txt"
    if path.exists():
        return path.read_text().strip()
    alphabet = string.ascii_lowercase + string.digits  # what W&B's own ids use
    run_id = os.environ.get("WANDB_RUN_ID") or "".join(secrets.choice(alphabet) for _ in range(8))
    path.write_text(run_id + "\n")
    return run_id
