"""W&B through accelerate's tracker, on the main process only; a no-op when disabled."""

from __future__ import annotations

from pathlib import Path

from dist_seg.config import Config
from dist_seg.console import wandb_mode


class Tracker:
    def __init__(self, accelerator, cfg: Config, run_dir: Path):
        self.accelerator, self.cfg = accelerator, cfg
        self.enabled = wandb_mode(cfg.wandb.mode) != "disabled"
        self.step = 0
        if self.enabled and accelerator.is_main_process:
            accelerator.init_trackers(
                cfg.wandb.project,
                config=cfg.to_dict(),
                init_kwargs={"wandb": wandb_kwargs(cfg, run_dir)},
            )

    def log(self, values: dict, step: int | None = None) -> None:
        """Log at the given global optimizer step (or one past the last logged)."""
        self.step = step if step is not None else self.step + 1
        if self.enabled:
            self.accelerator.log(values, step=self.step)

    def collector(self, panel: list):
        """An evaluate() on_batch hook keeping the first ``wandb.log_images`` samples as
        (name, image HxWx3 uint8, prediction HxW bool, truth HxW uint8); None when off."""
        limit = self.cfg.wandb.log_images
        if not (self.enabled and self.accelerator.is_main_process and limit > 0):
            return None

        def keep(batch, logits):
            for i in range(min(len(batch["name"]), limit - len(panel))):
                image = batch["image"][i].permute(1, 2, 0).numpy()
                pred = (logits[i, 0] > 0).cpu().numpy()
                panel.append((batch["name"][i], image, pred, batch["mask"][i].numpy()))

        return keep

    def log_images(self, panel: list, step: int) -> None:
        """Validation images with predicted and true masks as interactive W&B overlays."""
        if not (self.enabled and panel):
            return
        import wandb

        labels = {0: "background", 1: "pet"}
        images = [
            wandb.Image(image, caption=name, masks={
                "prediction": {"mask_data": pred.astype("uint8"), "class_labels": labels},
                "truth": {"mask_data": (truth == 1).astype("uint8"), "class_labels": labels},
            })
            for name, image, pred, truth in panel
        ]  # fmt: skip
        self.accelerator.log({"val/examples": images}, step=step)

    def finish(self) -> None:
        if self.enabled:
            self.accelerator.end_training()


def wandb_kwargs(cfg: Config, run_dir: Path) -> dict:
    kwargs = {
        "dir": str(run_dir),
        "name": cfg.run_name(),
        "mode": wandb_mode(cfg.wandb.mode),
        "id": stable_run_id(run_dir),
        "resume": "allow",
    }
    if cfg.wandb.entity:
        kwargs["entity"] = cfg.wandb.entity
    if cfg.wandb.group:
        kwargs["group"] = cfg.wandb.group
    if cfg.wandb.tags:
        kwargs["tags"] = cfg.wandb.tags
    return kwargs


def stable_run_id(run_dir: Path) -> str:
    """A resumed or requeued job continues the same W&B run: the id lives in the run dir."""
    path = run_dir / "wandb_id.txt"
    if path.exists():
        return path.read_text().strip()
    import wandb

    run_id = wandb.util.generate_id()
    path.write_text(run_id)
    return run_id
