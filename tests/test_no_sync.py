"""The training step never waits on the device (issue 15 item 1).

On a GPU a host sync (``.item()``, ``.tolist()``, ``.cpu()``, a tensor built from Python
numbers, a blocking copy) leaves the GPU idle until the host catches up. On CPU nothing
idles, so these tests count the calls that would sync, through torch's own hooks (a
function mode and a dispatch mode see every tensor call of the step, accelerate's and
torch's included), and fail naming where one comes back. tests/test_gpu.py runs the same
step under ``torch.cuda.set_sync_debug_mode("error")`` where CUDA exists.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import launch, tiny_config
from sync_counter import SyncCounter, counting_steps

import dist_seg.train
from dist_seg.train import Trainer


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """accelerate keeps one state per process: these tests train in bf16, the rest of the
    suite in-process in fp32, so each starts and ends with none."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    yield
    AcceleratorState._reset_state()


def count_step_syncs(monkeypatch, cfg, skip_first: int = 2) -> tuple[list[str], int]:
    """Trains ``cfg`` counting syncs inside ``Trainer.train_step`` after its first
    ``skip_first`` calls: (where each was, steps counted)."""
    found: list[str] = []
    counted = counting_steps(Trainer, found, skip_first)
    monkeypatch.setattr(Trainer, "train_step", counted)
    Trainer(cfg).fit()
    return found, len(counted.calls) - skip_first


def everything_on(packed, tmp_path, name):
    """The step's every branch: flips, EMA with warmup, accumulation, clipping, BatchNorm
    restore of skipped batches; logging only at the epoch's end (logging may sync)."""
    return tiny_config(packed, tmp_path, name,
                       train={"epochs": 1, "log_every": 1000, "ema_decay": 0.99,
                              "ema_warmup": True, "nonfinite": "skip", "precision": "bf16"},
                       optim={"grad_accum": 2, "grad_clip": 1.0, "schedule": "cosine",
                              "warmup_steps": 2},
                       data={"flip": True, "num_workers": 0})  # fmt: skip


def test_the_training_step_never_syncs_the_host(packed, tmp_path, monkeypatch):
    found, steps = count_step_syncs(monkeypatch, everything_on(packed, tmp_path, "nosync"))
    assert steps >= 4
    assert found == [], "host syncs in the training step:\n" + "\n".join(found)


@pytest.mark.slow
@pytest.mark.distributed
def test_no_rank_syncs_in_a_two_process_run_with_workers(packed, tmp_path):
    """As users run it: 2 processes under `accelerate launch` (DDP's hooks and the flags'
    all-reduce in the step), 2 persistent loader workers, everything on."""
    cfg = everything_on(packed, tmp_path, "ddp").to_dict()
    cfg["data"]["num_workers"], cfg["train"]["epochs"] = 2, 2  # 3 steps an epoch per rank
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    worker = str(Path(__file__).with_name("no_sync_worker.py"))
    proc = launch(2, [str(tmp_path / "cfg.json"), str(tmp_path)], tmp_path, program=[worker])
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        seen = json.loads((tmp_path / f"rank-{rank}.json").read_text())
        assert seen["steps"] >= 4
        assert seen["found"] == [], f"rank {rank}: host syncs in the step:\n" + "\n".join(
            seen["found"]
        )


def test_the_count_sees_a_sync_put_back_into_the_step(packed, tmp_path, monkeypatch):
    """The counter is real: a ``float(loss)`` in the step (what `.item()` checks were) is
    found on every counted step, with the place it came from."""
    real = dist_seg.train.loss_fn

    def reading(logits, masks, kind):
        loss, bce = real(logits, masks, kind)
        if float(loss.detach()) < 0:  # never true; the read is the point
            raise AssertionError
        return loss, bce

    monkeypatch.setattr(dist_seg.train, "loss_fn", reading)
    found, steps = count_step_syncs(monkeypatch, everything_on(packed, tmp_path, "sync"))
    assert len(found) == steps and all("a tensor read as a Python number" in w for w in found)
    assert all("test_no_sync.py" in w for w in found)  # the reading line is named


@pytest.mark.parametrize(
    "call",
    [
        lambda t: t.sum().item(),
        lambda t: t.tolist(),
        lambda t: t.cpu(),
        lambda t: bool(t.sum() > 0),
        lambda t: torch.tensor([0.5, 0.25], device=t.device),
        lambda t: t[t > 0],
        lambda t: t.nonzero(),
    ],
    ids=["item", "tolist", "cpu", "bool", "tensor-from-python", "bool-mask", "nonzero"],
)
def test_the_counter_knows_each_kind_of_sync(call):
    with SyncCounter() as counter:
        call(torch.ones(3))
    assert len(counter.where) >= 1


def test_evaluation_syncs_once_whatever_the_number_of_batches(packed, tmp_path):
    """Per batch, evaluation only queues work; the reads come once, at the end."""
    from dist_seg.evaluate import evaluate

    cfg = tiny_config(packed, tmp_path, "eval", train={"epochs": 1, "eval_batch_size": 1})
    trainer = Trainer(cfg)
    model, loader, acc = trainer.raw_model, trainer.val_loader, trainer.accelerator
    batches = list(loader)
    assert len(batches) >= 2

    def syncs(n: int) -> int:
        with SyncCounter() as counter:
            evaluate(model, batches[:n], acc)
        return len(counter.where)

    assert syncs(1) == syncs(len(batches))
    trainer.finish({}, 0.0)
