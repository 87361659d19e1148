"""Elastic exact resume of the data plan, and the audit trail, at the loader level.

Every rank of a run is simulated in this process with its own loader (the sample order never
depends on a process group); loader workers are real processes where K > 0, since the
DataLoader's round-robin over workers is part of the plan. What a resume must give is
checked on the keys the loaders actually yielded, with plain Python sets and hashlib: not
with the plan arithmetic under test.
"""

from __future__ import annotations

import hashlib
import io
import json
import random

import pytest
import torch
from conftest import COUNTS

from dist_seg.data import pets
from dist_seg.data.manifest import load_manifest
from dist_seg.data.records import SampleRecorder, summarize
from dist_seg.data.stream import build_loader
from dist_seg.errors import UserError

EPOCH = 2


@pytest.fixture(scope="module")
def manifest(packed):
    return load_manifest(packed)


@pytest.fixture(scope="module")
def train_keys(synth_root) -> set[str]:
    return {r.name for r in pets.read_split(synth_root, "train")}


def run(manifest, world, workers, batch, buffer=256, seed=0):
    """One loader per rank of a run of ``world`` ranks."""
    return [
        build_loader(manifest, "train", batch_size=batch, train=True, rank=r, world_size=world,
                     num_workers=workers, seed=seed, shuffle_buffer=buffer)
        for r in range(world)
    ]  # fmt: skip


def batches(loader, limit=None) -> list[list[str]]:
    out = []
    for batch in loader:
        assert batch["key"] == batch["name"]  # packed by dist-seg: the tar key is the name
        out.append(list(batch["key"]))
        if limit is not None and len(out) == limit:
            break
    return out


def flat(per_rank) -> list[str]:
    return [k for rank in per_rank for batch in rank for k in batch]


def saved(state: dict) -> dict:
    """Through a checkpoint file and back, as the trainer will: weights_only, no pickle."""
    buf = io.BytesIO()
    torch.save({"data": state}, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)["data"]


def interrupt(manifest, old: dict, stop: int, epoch: int = EPOCH):
    """A run of ``old`` stopped after ``stop`` batches of ``epoch``: (batches per rank, state)."""
    loaders = run(manifest, **old)
    for loader in loaders:
        loader.set_epoch(epoch)
    trained = [batches(loader, stop) for loader in loaders]
    states = [loader.state_dict(epoch, stop) for loader in loaders]
    assert all(s == states[0] for s in states)  # any rank may write it: all agree
    return trained, saved(states[0])


def resume(manifest, new: dict, state: dict, grad_accum: int = 1):
    """A run of ``new`` resumed from ``state``: (loaders, notes, batches per rank)."""
    loaders = run(manifest, **new)
    notes = [loader.load_state_dict(state, grad_accum=grad_accum) for loader in loaders]
    assert len(set(notes)) == 1
    lengths = [len(loader) for loader in loaders]
    rest = [batches(loader) for loader in loaders]
    assert [len(r) for r in rest] == lengths and len(set(lengths)) == 1  # equal steps, true len
    assert all(len(b) == new["batch"] for r in rest for b in r)
    return loaders, notes[0], rest


def check_epoch(before, after, keys: set[str], new: dict, loaders) -> None:
    """At most once each, fewer left out than one new global batch, and the audit's view of
    what was trained before the resume is what the interrupted run did yield."""
    trained = flat(before) + flat(after)
    assert len(trained) == len(set(trained)), "a sample trained twice in one epoch"
    assert set(trained) <= keys
    assert len(keys) - len(trained) < new["world"] * new["batch"]
    for loader in loaders:
        assert sorted(loader.keys_trained_before(EPOCH)) == sorted(flat(before))
        assert loader.trained_before(EPOCH)[: len(before)] == [len(flat([b])) for b in before]
        assert loader.keys_trained_before(EPOCH + 1) == []


def check_next_epoch(manifest, loaders, new: dict) -> None:
    fresh = run(manifest, **new)
    for loader, reference in zip(loaders, fresh):
        loader.set_epoch(EPOCH + 1)
        reference.set_epoch(EPOCH + 1)
        assert batches(loader) == batches(reference)


def cfg(world, workers, batch, **kw) -> dict:
    return {"world": world, "workers": workers, "batch": batch, **kw}


# --- the pairs, interrupted mid-epoch --------------------------------------------------
@pytest.mark.parametrize(
    "old, new, stop",
    [
        (cfg(2, 2, 3), cfg(1, 1, 3), 2),  # 4 steps of 2 x 3
        (cfg(1, 0, 3), cfg(3, 2, 3), 5),  # 9 steps of 1 x 3
        (cfg(3, 1, 2), cfg(2, 0, 2), 2),  # 4 steps of 3 x 2
        (cfg(2, 0, 3), cfg(1, 2, 2), 3),  # batch size 3 -> 2
        (cfg(1, 2, 2, buffer=4), cfg(2, 1, 5, buffer=3, seed=1), 7),  # batch, buffer and seed
    ],
)
def test_resume_at_another_world_size_trains_each_sample_at_most_once(
    manifest, train_keys, old, new, stop
):
    before, state = interrupt(manifest, old, stop)
    loaders, note, after = resume(manifest, new, state)
    assert f"world size {old['world']} -> {new['world']}" in note or old["world"] == new["world"]
    assert f"the rest of epoch {EPOCH + 1} is replanned" in note
    trained = len(flat(before))
    assert f"{trained} samples already trained are skipped" in note
    left = COUNTS["train"] - trained - len(flat(after))
    assert note.endswith(f"{left} left out")
    check_epoch(before, after, train_keys, new, loaders)
    check_next_epoch(manifest, loaders, new)


@pytest.mark.parametrize("workers, grad_accum", [(2, 2), (0, 1)])
def test_unchanged_plan_resumes_bit_identically(manifest, workers, grad_accum):
    config = cfg(2, workers, 3, buffer=5)
    whole = []
    for loader in run(manifest, **config):
        loader.set_epoch(EPOCH)
        whole.append(batches(loader))
    before, state = interrupt(manifest, config, 3)
    assert before == [w[:3] for w in whole]
    loaders, note, after = resume(manifest, config, state, grad_accum=grad_accum)
    assert after == [w[3:] for w in whole]  # the same batches in the same order
    assert "continues at batch 3 of 4, the same batches in the same order" in note
    assert ("grad accumulation 1 -> 2" in note) == (grad_accum == 2)
    check_next_epoch(manifest, loaders, config)


def test_workers_0_and_1_are_the_same_plan(manifest):
    before, state = interrupt(manifest, cfg(2, 0, 2), 4)
    whole = []
    for loader in run(manifest, **cfg(2, 1, 2)):
        loader.set_epoch(EPOCH)
        whole.append(batches(loader))
    _, note, after = resume(manifest, cfg(2, 1, 2), state)
    assert note.startswith("workers 0 -> 1: epoch 3 continues at batch 4 of 7")
    assert after == [w[4:] for w in whole]


def test_a_second_interruption_in_a_replanned_remainder(manifest, train_keys):
    first, state = interrupt(manifest, cfg(2, 2, 2, buffer=4), 3)  # 12 of 28 trained
    mid = run(manifest, **cfg(1, 2, 3, buffer=4))
    for loader in mid:
        assert "replanned: 12 samples already trained are skipped" in loader.load_state_dict(state)
    assert len(mid[0]) == 5  # 16 left: 5 batches of 3
    second = [batches(mid[0], 2)]
    state = saved(mid[0].state_dict(EPOCH, 2))
    loaders, note, after = resume(manifest, cfg(3, 1, 1), state)
    assert "18 samples already trained are skipped, 9 train in 3 batches per rank, 1 left out" in (
        note
    )
    trained = flat(first) + flat(second) + flat(after)
    assert len(trained) == len(set(trained)) == 27 and set(trained) <= train_keys
    assert loaders[0].trained_before(EPOCH) == [6 + 6, 6, 0]  # per rank index, all plans
    assert sorted(loaders[0].keys_trained_before(EPOCH)) == sorted(flat(first) + flat(second))
    check_next_epoch(manifest, loaders, cfg(3, 1, 1))


# --- exhaustive, in-process (K = 0) and with workers (slow) ------------------------------------
def _sweep_cases(workers: tuple[int, ...], count: int, seed: int):
    rng = random.Random(seed)
    configs = [cfg(w, k, b, buffer=rng.choice([1, 3, 256]))
               for w in (1, 2, 3) for k in workers for b in (1, 2, 3)]  # fmt: skip
    cases = []
    for old in configs:
        for new in configs:
            steps = COUNTS["train"] // (old["world"] * old["batch"])
            cases.append((old, new, rng.randint(1, steps - 1)))
    rng.shuffle(cases)
    return cases[:count]


@pytest.mark.parametrize("old, new, stop", _sweep_cases((0,), 60, seed=0))
def test_sweep_without_workers(manifest, train_keys, old, new, stop):
    before, state = interrupt(manifest, old, stop)
    loaders, _, after = resume(manifest, new, state)
    check_epoch(before, after, train_keys, new, loaders)
    if old == new:
        whole = []
        for loader in run(manifest, **old):
            loader.set_epoch(EPOCH)
            whole.append(batches(loader)[stop:])
        assert after == whole


@pytest.mark.slow
@pytest.mark.parametrize("old, new, stop", _sweep_cases((0, 1, 2, 3), 80, seed=1))
def test_sweep_with_workers(manifest, train_keys, old, new, stop):
    before, state = interrupt(manifest, old, stop)
    loaders, _, after = resume(manifest, new, state)
    check_epoch(before, after, train_keys, new, loaders)
    check_next_epoch(manifest, loaders, new)


# --- boundaries and refusals -------------------------------------------------------------------
def test_state_at_an_epoch_boundary_starts_the_next_epoch_whole(manifest):
    loaders = run(manifest, **cfg(2, 0, 3))
    loaders[0].set_epoch(EPOCH)
    batches(loaders[0])
    state = saved(loaders[0].state_dict(EPOCH + 1, 0))  # saved after the epoch's last batch
    resumed = run(manifest, **cfg(3, 0, 2))
    note = resumed[0].load_state_dict(state)
    assert note == "world size 2 -> 3, batch size 3 -> 2: epoch 4 starts from its beginning"
    fresh = run(manifest, **cfg(3, 0, 2))[0]
    fresh.set_epoch(EPOCH + 1)
    assert batches(resumed[0]) == batches(fresh)


def test_a_changed_split_mid_epoch_is_refused_in_one_line(manifest, tmp_path):
    _, state = interrupt(manifest, cfg(1, 0, 2), 3)
    state = {**state, "fingerprint": {**state["fingerprint"], "num_samples": 30}}
    with pytest.raises(UserError, match="training split changed .* start a new run"):
        run(manifest, **cfg(1, 0, 2))[0].load_state_dict(state)
    with pytest.raises(UserError, match="data-plan state is unreadable"):
        run(manifest, **cfg(1, 0, 2))[0].load_state_dict({"epoch": 1})


# --- the audit trail ---------------------------------------------------------------------------
def test_recorder_files_and_digest_after_an_elastic_resume(manifest, train_keys, tmp_path):
    """Rank files as two runs write them (one killed after its checkpoint), the digest from
    the files with hashlib, and the digest the trainer computes from gathered key lists."""
    old, new = cfg(2, 1, 2), cfg(1, 0, 3)
    loaders = run(manifest, **old)
    recorders = [SampleRecorder(tmp_path, r, 2, enabled=True) for r in range(2)]
    for loader, recorder in zip(loaders, recorders):
        loader.set_epoch(EPOCH)
        recorder.start_epoch(EPOCH)
        for keys in batches(loader, 4):
            recorder.add(keys)  # on disk now: a killed run leaves it
    state = saved(loaders[0].state_dict(EPOCH, 3))  # checkpoint at 3: batch 4 trains again
    folder = tmp_path / "samples" / f"epoch-{EPOCH + 1}"
    assert [len((folder / f"rank-{r}.txt").read_text().split()) for r in range(2)] == [8, 8]

    resumed = run(manifest, **new)[0]
    resumed.load_state_dict(state)
    recorder = SampleRecorder(tmp_path, 0, 1, enabled=True)
    recorder.start_epoch(EPOCH, resumed.trained_before(EPOCH))
    for keys in batches(resumed):
        recorder.add(keys)
    mine = recorder.end_epoch()
    lines = [ln for r in range(2) for ln in (folder / f"rank-{r}.txt").read_text().splitlines()]
    assert len(lines) == len(set(lines)) and set(lines) <= train_keys
    assert len(train_keys) - len(lines) < 1 * 3
    want = hashlib.sha256("\n".join(sorted(lines)).encode()).hexdigest()
    prior = resumed.keys_trained_before(EPOCH)
    assert summarize(mine + prior) == (len(lines), want)  # == history's train_samples(_digest)
    assert summarize([]) == (0, hashlib.sha256(b"").hexdigest())


def test_recorder_fresh_epoch_empties_files_and_off_writes_nothing(tmp_path):
    folder = tmp_path / "samples" / "epoch-1"
    folder.mkdir(parents=True)
    (folder / "rank-0.txt").write_text("a\nb\n")  # left by a run killed in epoch 1
    (folder / "rank-3.txt").write_text("c\n")  # ... at world size 4
    recorder = SampleRecorder(tmp_path, 0, 2, enabled=True)
    recorder.start_epoch(0)
    recorder.add(["x", "y"])
    assert (folder / "rank-0.txt").read_text() == "x\ny\n"  # flushed with the batch
    assert (folder / "rank-3.txt").read_text() == ""
    assert recorder.end_epoch() == ["x", "y"]
    off = SampleRecorder(tmp_path / "off", 0, 1, enabled=False)
    off.start_epoch(0)
    off.add(["z"])
    assert off.end_epoch() == ["z"] and not (tmp_path / "off").exists()


# --- end to end: the trainer (prepared; runs once train.py makes the calls) -------------------
@pytest.mark.slow
@pytest.mark.distributed
def test_killed_two_process_run_resumed_on_one_process_with_audit_files(packed, tmp_path):
    """2 processes x 2 workers, W&B offline, killed mid epoch 1 after a checkpoint; resumed
    on 1 process x 1 worker: each sample of epoch 1 at most once, per the rank files, and
    the history's count and digest recomputed from them."""
    import os
    import subprocess
    import sys

    from helpers import TINY, free_port, kill_tree, run_cli, wandb_env

    base = ["train", *TINY, "--set", f"data.shards={packed}", "--set", "train.epochs=2",
            "--set", "train.batch_size=2", "--set", "data.num_workers=2",
            "--set", "data.record_samples=true", "--set", "run.checkpoint_every=2",
            "--set", "train.log_every=1", "--set", "wandb.mode=offline",
            "--set", f"run.out_dir={tmp_path}", "--name", "cut"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    env = wandb_env(env, tmp_path / "wandb-home") | {"OMP_NUM_THREADS": "1",
                                                     "PYTHONUNBUFFERED": "1"}  # fmt: skip
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
           "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--main_process_port", str(free_port()),
           "-m", "dist_seg", *base]  # fmt: skip
    cut = subprocess.Popen(cmd, cwd=tmp_path, env=env, start_new_session=True,
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)  # fmt: skip
    for line in cut.stdout:  # 7 steps per epoch: past the checkpoint at step 2
        if line.startswith("epoch 1 3/7"):
            break
    kill_tree(cut.pid)  # the launcher, both ranks and their loader workers, no warning
    cut.wait(timeout=60)
    saved = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
    assert (saved["epoch"], saved["step"]) == (0, 2)  # mid epoch 1: the test is not vacuous
    done = run_cli([*base, "--set", "data.num_workers=1", "--resume", "auto"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout.splitlines()
    at = next(i for i, ln in enumerate(out) if ln.startswith("resumed from"))
    assert "world size 2 -> 1, workers 2 -> 1: the rest of epoch 1 is replanned" in out[at + 1]
    history = json.loads((tmp_path / "cut" / "history.json").read_text())
    for row in history:
        folder = tmp_path / "cut" / "samples" / f"epoch-{row['epoch']}"
        lines = [k for f in sorted(folder.glob("rank-*.txt")) for k in f.read_text().split()]
        assert len(lines) == len(set(lines)) == row["train_samples"]
        assert COUNTS["train"] - len(lines) < 2 * 2  # fewer left out than a global batch
        want = hashlib.sha256("\n".join(sorted(lines)).encode()).hexdigest()
        assert row["train_samples_digest"] == want
