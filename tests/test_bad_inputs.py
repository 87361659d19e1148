"""Bad inputs, one table: each row damages a private copy of the inputs, runs the real
command line (`python -m dist_seg ...`) in a subprocess and checks what the user sees.

An error row expects exit 2, exactly one stderr line ``dist-seg: error: ...`` holding the
key fact (the file or the config key), no traceback anywhere, and every file written
earlier (an existing pack, an existing run) byte-identical and still loadable. A
"handled" row expects exit 0 and checks the handling (a counted skip, a full epoch, an
offline fallback). docs/bad_inputs.md is the same table with the messages as observed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from helpers import tiny_config
from PIL import Image

from dist_seg.checkpoint import load_checkpoint
from dist_seg.data.manifest import MANIFEST, load_manifest, verify_shards
from dist_seg.train import train

TRAIN = "Abyssinian_2"  # a plain JPEG of the train split (line 2 of trainval.txt)
TINY = ["--set", "data.size=32", "--set", "data.num_workers=0", "--set", "model.width=0.0625",
        "--set", "train.batch_size=4", "--set", "train.precision=no", "--set", "train.epochs=1",
        "--set", "run.out_dir=runs"]  # fmt: skip


# --- what a case can use ---------------------------------------------------------------------
@dataclass
class Ctx:
    """Private copies of the session fixtures under the case's tmp_path (the cwd)."""

    tmp: Path
    synth_root: Path
    packed: Path
    finished: Path  # a finished 1-epoch run: last.pt, best.pt, history, config.yaml
    env: dict = field(default_factory=dict)
    seconds: float = 0.0  # the command's wall time
    kept: list[tuple[Path, tuple[str, ...]]] = field(default_factory=list)

    def keep(self, path: Path, but: tuple[str, ...] = ()) -> Path:
        """Files under ``path`` (except those named in ``but``) must come out of the
        command byte-identical and still load."""
        self.kept.append((path, but))
        return path

    def root(self) -> Path:
        root = self.tmp / "pets"
        if not root.exists():
            shutil.copytree(self.synth_root, root)
        return root

    def shards(self, name: str = "shards") -> Path:
        out = self.tmp / name
        shutil.copytree(self.packed, out)
        return out

    def old_run(self, whole: bool = False) -> Path:
        """A copy of the finished run at runs/base (the run `--name base` writes to): its
        checkpoints, history and curves are kept; config.yaml too where ``whole``."""
        run = self.tmp / "runs" / "base"
        shutil.copytree(self.finished, run)
        return self.keep(run, but=() if whole else ("config.yaml",))

    def train(self, *extra: str, shards: Path | None = None, whole: bool = False) -> list[str]:
        """`train` of a tiny model into the existing run runs/base (kept)."""
        self.old_run(whole)
        shards = shards or self.shards()
        return ["train", *TINY, "--set", f"data.shards={shards}", "--name", "base", *extra]

    def pack(self, *extra: str, root: Path | None = None) -> list[str]:
        """`pack` over an existing pack at old-pack (kept: a failed pack must not touch it)."""
        out = self.keep(self.shards("old-pack"))
        return ["pack", "--root", str(root or self.root()), "--out", str(out), "--size", "32",
                "--shard-size", "6", "--workers", "1", *extra]  # fmt: skip

    def evaluate(self, *extra: str, shards: Path | None = None, split: str = "test") -> list[str]:
        run = self.old_run()
        shards = shards or self.shards()
        return ["evaluate", "--checkpoint", str(run / "best.pt"), "--shards", str(shards),
                "--split", split, "--workers", "0", *extra]  # fmt: skip


def flip_byte(path: Path, at: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * at)] ^= 0xFF
    path.write_bytes(bytes(data))


def cut_half(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def edit_manifest(shards: Path, edit: Callable[[dict], None]) -> None:
    raw = json.loads((shards / MANIFEST).read_text())
    edit(raw)
    (shards / MANIFEST).write_text(json.dumps(raw))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- setups: each damages a copy and returns the command line after `python -m dist_seg` ----
def missing_root(c: Ctx) -> list[str]:
    return c.pack(root=c.tmp / "nowhere")


def missing_split_file(c: Ctx) -> list[str]:
    (c.root() / "annotations" / "test.txt").unlink()
    return c.pack()


def malformed_split_line(c: Ctx) -> list[str]:
    with (c.root() / "annotations" / "trainval.txt").open("a") as f:
        f.write("Abyssinian_77 one 1\n")
    return c.pack()


def no_trimap(c: Ctx) -> list[str]:
    (c.root() / "annotations" / "trimaps" / f"{TRAIN}.png").unlink()
    return c.pack()


def trimap_other_size(c: Ctx) -> list[str]:
    path = c.root() / "annotations" / "trimaps" / f"{TRAIN}.png"
    with Image.open(path) as img:
        img.load()
    img.resize((img.width // 2, img.height // 2), Image.NEAREST).save(path)
    return c.pack()


def truncated_jpeg(c: Ctx) -> list[str]:
    # Cut in half, PIL opens the header but load() raises "image file is truncated".
    cut_half(c.root() / "images" / f"{TRAIN}.jpg")
    return c.pack()


def garbage_image(c: Ctx) -> list[str]:
    (c.root() / "images" / f"{TRAIN}.jpg").write_bytes(b"not an image at all\n" * 50)
    cmd = c.pack()
    cmd[cmd.index("--workers") + 1] = "2"  # the error crosses a process pool
    return cmd


def skip_bad(damage: Callable[[Ctx], list[str]]) -> Callable[[Ctx], list[str]]:
    def setup(c: Ctx) -> list[str]:
        cmd = damage(c)
        c.kept.clear()  # a successful pack replaces --out, as it should
        return [*cmd, "--skip-bad"]

    return setup


def counted_skip(c: Ctx, proc) -> None:
    out = Path(proc.args[proc.args.index("--out") + 1])
    raw = json.loads((out / MANIFEST).read_text())
    (skipped,) = raw["source"]["skipped"]
    assert skipped.startswith(f"{TRAIN}: ")
    assert raw["splits"]["train"]["num_samples"] == 27  # 28 minus the bad one
    assert "1 skipped" in proc.stdout
    for split in raw["splits"]:
        verify_shards(load_manifest(out).shards(split))


def pack_size_not_16(c: Ctx) -> list[str]:
    cmd = c.pack()
    cmd[cmd.index("--size") + 1] = "100"
    return cmd


def pack_out_not_writable(c: Ctx) -> list[str]:
    (c.tmp / "a-file").write_text("a regular file, not a directory\n")
    return ["pack", "--root", str(c.root()), "--out", "a-file/shards", "--size", "32",
            "--workers", "1"]  # fmt: skip


def train_missing_data_path(c: Ctx) -> list[str]:
    return c.train("--data_path", str(c.tmp / "nowhere" / "oxford-iiit-pet"))


def manifest_missing(c: Ctx) -> list[str]:
    shards = c.shards()
    (shards / MANIFEST).unlink()
    return c.train(shards=shards)


def manifest_newer(c: Ctx) -> list[str]:
    shards = c.shards()
    edit_manifest(shards, lambda m: m.update(format_version=99))
    return c.train(shards=shards)


def manifest_bad_json(c: Ctx) -> list[str]:
    shards = c.shards()
    path = shards / MANIFEST
    path.write_text(path.read_text()[:-40])
    return c.train(shards=shards)


def shard_truncated(c: Ctx) -> list[str]:
    shards = c.shards()
    cut_half(shards / "train-000001.tar")
    return c.train(shards=shards)


def shard_altered(c: Ctx) -> list[str]:
    shards = c.shards()
    flip_byte(shards / "train-000001.tar")
    return c.train(shards=shards)


def shard_missing(c: Ctx) -> list[str]:
    shards = c.shards()
    (shards / "val-000000.tar").unlink()
    return c.train(shards=shards)


def one_train_shard(c: Ctx) -> list[str]:
    from dist_seg.data.pack import pack

    shards = c.tmp / "one-shard"
    pack(c.synth_root, shards, size=32, shard_size=64, workers=1)  # train [28], val [4]
    return ["train", *TINY, "--set", f"data.shards={shards}", "--set", "data.num_workers=2",
            "--set", "train.log_every=1", "--name", "one"]  # fmt: skip


def trained_every_sample(c: Ctx, proc) -> None:
    assert "28 train / 4 val images" in proc.stdout
    assert "7 steps/epoch per rank" in proc.stdout
    assert "epoch 1 7/7" in proc.stdout  # 7 full batches of 4 = all 28 train samples
    (row,) = json.loads((c.tmp / "runs" / "one" / "history.json").read_text())
    assert row["val_images"] == 4
    load_checkpoint(c.tmp / "runs" / "one" / "last.pt")


def train_batch_too_big(c: Ctx) -> list[str]:
    return c.train("--set", "train.batch_size=64")


def config_set(*items: str) -> Callable[[Ctx], list[str]]:
    def setup(c: Ctx) -> list[str]:
        sets = [x for item in items for x in ("--set", item)]
        return c.train(*sets)

    return setup


def config_file(text: str | None) -> Callable[[Ctx], list[str]]:
    def setup(c: Ctx) -> list[str]:
        path = c.tmp / "run.yaml"
        if text is not None:
            path.write_text(text)
        return c.train("--config", str(path))

    return setup


def out_dir_not_writable(c: Ctx) -> list[str]:
    (c.tmp / "a-file").write_text("a regular file, not a directory\n")
    return c.train("--set", "run.out_dir=a-file/runs")


def checkpoint_truncated(c: Ctx) -> list[str]:
    cmd = c.evaluate()
    bad = c.tmp / "cut.pt"
    shutil.copyfile(c.finished / "best.pt", bad)
    cut_half(bad)
    cmd[cmd.index("--checkpoint") + 1] = str(bad)
    return cmd


def checkpoint_is_text(c: Ctx) -> list[str]:
    cmd = c.evaluate()
    (c.tmp / "notes.pt").write_text("hello, these are my notes, not a checkpoint\n")
    cmd[cmd.index("--checkpoint") + 1] = str(c.tmp / "notes.pt")
    return cmd


def resume_from_text(c: Ctx) -> list[str]:
    (c.tmp / "notes.pt").write_text("hello, these are my notes, not a checkpoint\n")
    return c.train("--resume", str(c.tmp / "notes.pt"))


def resume_other_width(c: Ctx, whole: bool = False) -> list[str]:
    return c.train("--set", "model.width=0.125", "--resume", "auto", whole=whole)


def failed_start_keeps_config(c: Ctx) -> list[str]:
    return resume_other_width(c, whole=True)  # the run's config.yaml must survive too


def predict_input_missing(c: Ctx) -> list[str]:
    c.old_run()
    return ["predict", "--checkpoint", "runs/base/best.pt", "--input", "photos/cat.jpg",
            "--out", "predictions"]  # fmt: skip


def evaluate_missing_split(c: Ctx) -> list[str]:
    shards = c.shards()
    edit_manifest(shards, lambda m: m["splits"].pop("test"))
    return c.evaluate(shards=shards)


def evaluate_one_shard_two_workers(c: Ctx) -> list[str]:
    # val is one shard of 4 samples: two loader workers, every sample counted once
    return c.evaluate("--out", "eval", "--batch-size", "3", "--workers", "2", split="val")


def evaluated_every_sample(c: Ctx, proc) -> None:
    metrics = json.loads((c.tmp / "eval" / "metrics.json").read_text())
    assert metrics["num_images"] == 4 and metrics["split"] == "val"


def evaluate_out_not_writable(c: Ctx) -> list[str]:
    (c.tmp / "a-file").write_text("a regular file, not a directory\n")
    return c.evaluate("--out", "a-file/eval")


def predict_out_not_writable(c: Ctx) -> list[str]:
    c.old_run()
    (c.tmp / "a-file").write_text("a regular file, not a directory\n")
    image = c.synth_root / "images" / f"{TRAIN}.jpg"
    return ["predict", "--checkpoint", "runs/base/best.pt", "--input", str(image),
            "--out", "a-file/predictions"]  # fmt: skip


def wandb_unreachable(c: Ctx) -> list[str]:
    home = c.tmp / "wandb-home"
    c.env.update(
        WANDB_API_KEY="0" * 40,
        WANDB_BASE_URL=f"http://127.0.0.1:{free_port()}",  # closed: nothing listens there
        WANDB_INIT_TIMEOUT="1",  # dist_seg.tracking reads it (default 30 s)
        WANDB_CONFIG_DIR=str(home), WANDB_CACHE_DIR=str(home), WANDB_DATA_DIR=str(home),
        NETRC=str(home / "netrc"),
    )  # fmt: skip
    return ["train", *TINY, "--set", f"data.shards={c.packed}", "--set", "wandb.mode=online",
            "--name", "wb"]  # fmt: skip


def fell_back_offline(c: Ctx, proc) -> None:
    warnings = [ln for ln in proc.stderr.splitlines() if "W&B online start failed" in ln]
    assert len(warnings) == 1 and "offline" in warnings[0], proc.stderr[-2000:]
    run_dir = c.tmp / "runs" / "wb"
    assert list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert (run_dir / "wandb_id.txt").exists() and (run_dir / "last.pt").exists()
    # bounded: 1 s init timeout + W&B's own ~10 s resume-status deadline + the tiny run
    assert c.seconds < 45, c.seconds


# --- the table -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    setup: Callable[[Ctx], list[str]]
    expect: tuple[str, ...] = ()  # fragments of the one error line
    check: Callable | None = None  # a handled case: exit 0, then this
    slow: bool = False
    limit_s: float = 120


SKIP_HINT = "--skip-bad skips such samples"
S = {"slow": True}  # same code path as a fast row, or trains / starts W&B

CASES: dict[str, Case] = {
    # raw data set -> pack (over an existing pack, which must survive)
    "pack-missing-data-root": Case(missing_root, ("nowhere does not exist", "dist-seg synth")),
    "pack-missing-split-file": Case(missing_split_file, ("annotations/test.txt does not exist",)),
    "pack-malformed-split-line": Case(malformed_split_line, ("trainval.txt:33", "'Abyssinian_77 one 1'")),
    "pack-image-without-trimap": Case(no_trimap, (f"trimaps/{TRAIN}.png does not exist", SKIP_HINT)),
    "pack-trimap-other-size": Case(trimap_other_size, (f"trimaps/{TRAIN}.png: trimap is", "but its image is", SKIP_HINT)),
    "pack-truncated-jpeg": Case(truncated_jpeg, (f"images/{TRAIN}.jpg cannot be decoded", "truncated", SKIP_HINT)),
    "pack-garbage-image": Case(garbage_image, (f"images/{TRAIN}.jpg is not a readable image", SKIP_HINT)),
    "pack-skip-bad-image-without-trimap": Case(skip_bad(no_trimap), check=counted_skip),
    "pack-skip-bad-trimap-other-size": Case(skip_bad(trimap_other_size), check=counted_skip, **S),
    "pack-skip-bad-truncated-jpeg": Case(skip_bad(truncated_jpeg), check=counted_skip, **S),
    "pack-skip-bad-garbage-image": Case(skip_bad(garbage_image), check=counted_skip, **S),
    "pack-size-not-multiple-of-16": Case(pack_size_not_16, ("--size 100", "multiple of 16"), **S),
    "pack-out-not-writable": Case(pack_out_not_writable, ("a-file/shards",)),
    # packed shards and manifest -> train (into an existing run, which must survive)
    "train-missing-data-path": Case(train_missing_data_path, ("nowhere/oxford-iiit-pet does not exist",)),
    "train-manifest-missing": Case(manifest_missing, ("no manifest.json in", "dist-seg pack --root")),
    "train-manifest-newer-version": Case(manifest_newer, ("format_version 99", "upgrade dist_seg or repack")),
    "train-manifest-malformed-json": Case(manifest_bad_json, ("cannot read", "manifest.json", "repack")),
    "train-shard-truncated": Case(shard_truncated, ("train-000001.tar does not match its manifest sha256",), **S),
    "train-shard-altered": Case(shard_altered, ("train-000001.tar does not match its manifest sha256",)),
    "train-shard-missing": Case(shard_missing, ("val-000000.tar listed in the manifest is missing",)),
    "train-one-shard-two-workers": Case(one_train_shard, check=trained_every_sample),
    "train-batch-larger-than-split": Case(train_batch_too_big, ("split 'train' has 28 samples", "(1 x 64)")),
    "train-out-dir-not-writable": Case(out_dir_not_writable, ("a-file/runs/base: Not a directory", "run.out_dir")),
    "train-failed-start-keeps-run-config": Case(failed_start_keeps_config, ("width 0.0625",), **S),
    # config
    "config-unknown-key-set": Case(config_set("train.nope=1"), ("--set: unknown config key 'train.nope'",)),
    "config-unknown-key-yaml": Case(config_file("optim:\n  lr: 0.001\n  momentum: 0.9\n"),
                                    ("run.yaml: unknown config key 'optim.momentum'",)),
    "config-wrong-type": Case(config_set("train.batch_size=four"), ("train.batch_size must be int, got 'four'",)),
    "config-lr-zero": Case(config_set("optim.lr=0"), ("optim.lr: 0.0 must be > 0",)),
    "config-lr-negative-yaml": Case(config_file("optim:\n  lr: -1e-3\n"), ("optim.lr: -0.001 must be > 0",), **S),
    "config-batch-zero": Case(config_set("train.batch_size=0"), ("train.batch_size: 0 must be >= 1",)),
    "config-size-not-multiple-of-16": Case(config_set("data.size=100"), ("data.size: 100 must be a multiple of 16",)),
    "config-unknown-model": Case(config_set("model.name=vgg16"), ("model.name: 'vgg16' is not one of",)),
    "config-unknown-border": Case(config_set("data.border=maybe"), ("data.border: 'maybe' is not one of",)),
    "config-unknown-decode": Case(config_set("data.decode=nvjpeg"), ("data.decode: 'nvjpeg' is not one of cpu, gpu",)),
    "config-file-missing": Case(config_file(None), ("run.yaml not found",)),
    "config-invalid-yaml": Case(config_file("optim: [lr: 1\n"), ("run.yaml is not valid YAML",)),
    "config-fp16-on-cpu": Case(config_set("train.precision=fp16"), ("train.precision=fp16 needs a GPU",)),
    "config-sync-bn-on-cpu": Case(config_set("train.sync_bn=true"), ("train.sync_bn=true needs GPUs",)),
    # checkpoints, evaluate, predict
    "evaluate-checkpoint-truncated": Case(checkpoint_truncated, ("checkpoint", "cut.pt cannot be read", "truncated")),
    "evaluate-checkpoint-is-text": Case(checkpoint_is_text, ("notes.pt cannot be read: it is not a file written by torch.save", "not a zip archive")),
    "resume-checkpoint-is-text": Case(resume_from_text, ("notes.pt cannot be read: it is not a file written by torch.save",)),
    "resume-checkpoint-other-width": Case(resume_other_width, ("runs/base/last.pt is a unet width 0.0625", "width 0.125")),
    "evaluate-split-not-in-manifest": Case(evaluate_missing_split, ("has no split 'test'",)),
    "evaluate-one-shard-two-workers": Case(evaluate_one_shard_two_workers, check=evaluated_every_sample),
    "evaluate-out-not-writable": Case(evaluate_out_not_writable, ("a-file/eval",)),
    "predict-input-missing": Case(predict_input_missing, ("--input photos/cat.jpg does not exist",)),
    "predict-out-not-writable": Case(predict_out_not_writable, ("a-file/predictions",)),
    # tracking
    "wandb-unreachable-falls-back-offline": Case(wandb_unreachable, check=fell_back_offline, limit_s=60, **S),
}  # fmt: skip


def _params():
    for name, case in CASES.items():
        marks = [pytest.mark.slow] if case.slow else []
        yield pytest.param(case, id=name, marks=marks)


# --- the one test ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def finished(packed, tmp_path_factory) -> Path:
    """A finished tiny run (1 epoch): what a bad input must not damage. Read-only."""
    out = tmp_path_factory.mktemp("bad-inputs-runs")
    train(tiny_config(packed, out, "base", train={"epochs": 1}))
    return out / "base"


def snapshot(kept: list[tuple[Path, tuple[str, ...]]]) -> dict[str, str]:
    files = [(f, but) for p, but in kept for f in ([p] if p.is_file() else sorted(p.rglob("*")))]
    return {
        str(f): hashlib.sha256(f.read_bytes()).hexdigest()
        for f, but in files
        if f.is_file() and f.name not in but
    }


def still_usable(kept: list[tuple[Path, tuple[str, ...]]]) -> None:
    for path, _ in kept:
        if (path / MANIFEST).exists():
            manifest = load_manifest(path)
            for split in manifest.splits:
                verify_shards(manifest.shards(split))
        for pt in path.rglob("*.pt"):
            load_checkpoint(pt)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", list(_params()))
def test_bad_input(case: Case, synth_root, packed, finished, tmp_path):
    ctx = Ctx(tmp_path, synth_root, packed, finished)
    argv = case.setup(ctx)
    before = snapshot(ctx.kept)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "ACCELERATE_"))}
    env["OMP_NUM_THREADS"] = "1"
    env |= ctx.env
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "dist_seg", *argv], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=case.limit_s)  # fmt: skip
    ctx.seconds = time.perf_counter() - t0
    both = proc.stdout + proc.stderr
    assert "Traceback" not in both, both[-3000:]
    if case.check is not None:
        assert proc.returncode == 0, both[-3000:]
        case.check(ctx, proc)
    else:
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1, proc.stderr[-3000:]
        assert lines[0].startswith("dist-seg: error: "), lines[0]
        for fact in case.expect:
            assert fact in lines[0], lines[0]
        assert proc.returncode == 2
    after = snapshot(ctx.kept)
    assert {f: after.get(f) for f in before} == before  # nothing written earlier was touched
    still_usable(ctx.kept)
