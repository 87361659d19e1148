"""W&B through accelerate's tracker, on the main process only; a no-op when disabled."""

from __future__ import annotations

from pathlib import Path

from dist_seg.config import Config
from dist_seg.console import wandb_mode


class Tracker:
    def __init__(self, accelerator, cfg: Config, run_dir: Path):
        self.accelerator = accelerator
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
