"""What only a GPU can show: run by scripts/gpu_check.sh (stage `tests`) on a CUDA machine,
skipped with the reason elsewhere. Tiny models and images: each test takes seconds."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from helpers import tiny_config

from dist_seg.models import build_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (none on this machine)"),
]


@pytest.fixture
def cuda_state():
    """The trainer sets global cuDNN/TF32 switches and accelerate keeps one state per
    process: start each test clean and leave it clean."""
    from accelerate.state import AcceleratorState

    saved = (torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32,
             torch.backends.cuda.matmul.allow_tf32)  # fmt: skip
    AcceleratorState._reset_state()
    yield
    AcceleratorState._reset_state()
    (torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32,
     torch.backends.cuda.matmul.allow_tf32) = saved  # fmt: skip
    torch.cuda.empty_cache()


def trained(packed, tmp_path, name, **train):
    """A Trainer of the tiny config, fitted for its epochs on CUDA: (trainer, its model as
    built, the weights before training, the run directory)."""
    from dist_seg.train import Trainer

    cfg = tiny_config(packed, tmp_path, name, train={"epochs": 1, **train})
    trainer = Trainer(cfg)
    assert trainer.accelerator.device.type == "cuda"
    model = trainer.raw_model  # finish() lets go of the trainer's references
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    trainer.fit()
    return trainer, model, before, tmp_path / name


def changed(before: dict, model: torch.nn.Module) -> bool:
    after = model.state_dict()
    return any(
        not torch.equal(before[k], after[k]) for k in before if before[k].is_floating_point()
    )


def finite_history(run) -> list[dict]:
    history = json.loads((run / "history.json").read_text())
    for row in history:
        assert all(v == v and abs(v) != float("inf") for v in row.values()
                   if isinstance(v, float)), row  # fmt: skip
    return history


def test_sync_batchnorm_conversion_trains_on_cuda(packed, tmp_path, cuda_state):
    trainer, model, before, run = trained(packed, tmp_path, "syncbn", sync_bn=True)
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())
    assert not any(type(m) is torch.nn.BatchNorm2d for m in model.modules())
    assert changed(before, model) and len(finite_history(run)) == 1
    # SyncBatchNorm in one process computes what BatchNorm does (the reference).
    torch.manual_seed(0)
    plain = build_model("unet", width=0.0625).cuda().train()
    synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(plain)).train()
    x = torch.rand(4, 3, 32, 32, device="cuda")
    torch.testing.assert_close(synced(x), plain(x), rtol=1e-4, atol=1e-5)


def test_fp16_trains_with_a_grad_scaler(packed, tmp_path, cuda_state):
    """train.precision=fp16 through the config: accelerate's GradScaler scales the loss,
    the weights move (not every step skipped) and every figure stays finite."""
    trainer, model, before, run = trained(packed, tmp_path, "fp16", precision="fp16", epochs=2)
    scaler = trainer.accelerator.scaler
    assert trainer.accelerator.mixed_precision == "fp16"
    assert isinstance(scaler, torch.amp.GradScaler) and scaler.is_enabled()
    assert 0 < scaler.get_scale() < float("inf")
    assert changed(before, model) and len(finite_history(run)) == 2


@pytest.mark.parametrize("name", ["unet", "resnet34_unet"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_channels_last_gives_the_same_logits_on_cudnn(name, dtype, cuda_state):
    """Same weights, same input: cuDNN's channels-last kernels against its contiguous ones,
    in fp32 (TF32 off) and in bf16 autocast. Kernels sum in other orders: the largest
    difference is judged against the largest logit (on CPU: 4e-7 fp32, 4e-3 bf16)."""
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    contiguous = build_model(name, width=0.25).cuda().eval()
    last = copy.deepcopy(contiguous).to(memory_format=torch.channels_last)
    x = torch.rand(4, 3, 64, 64, device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
        want = contiguous(x).float()
        got = last(x.contiguous(memory_format=torch.channels_last)).float()
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    assert got.shape == want.shape == (4, 1, 64, 64)
    assert (got - want).abs().max() <= tol * want.abs().max()


def test_fused_adam_steps_like_the_foreach_one(cuda_state):
    """torch.optim.Adam(fused=True) is selectable for these models on CUDA and takes the
    same steps as the default (foreach) Adam."""
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    models = [build_model("unet", width=0.0625).cuda().train() for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [torch.optim.Adam(models[0].parameters(), lr=1e-3, foreach=True),
            torch.optim.Adam(models[1].parameters(), lr=1e-3, fused=True)]  # fmt: skip
    assert opts[1].defaults["fused"] is True
    x = torch.rand(4, 3, 32, 32, device="cuda")
    y = (torch.rand(4, 1, 32, 32, device="cuda") > 0.5).float()
    for _ in range(3):
        for model, opt in zip(models, opts):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def test_trainer_uses_fused_adam_on_cuda(packed, tmp_path, cuda_state):
    from dist_seg.train import Trainer

    trainer = Trainer(tiny_config(packed, tmp_path, "fused"))
    assert trainer.optimizer.optimizer.defaults.get("fused") is True
    trainer.finish({}, 0.0)


def test_training_step_does_not_sync_under_sync_debug_mode_error(packed, tmp_path, monkeypatch,
                                                                  cuda_state):  # fmt: skip
    """torch.cuda.set_sync_debug_mode("error") around the Trainer's steady-state steps,
    with flips, EMA, accumulation, clipping and the non-finite skip all on."""
    from dist_seg.train import Trainer

    real, calls = Trainer.train_step, []

    def strict(self, data, last):
        calls.append(1)
        if len(calls) <= 2:  # lazy set-up: Adam's state, the first step's empty flags
            return real(self, data, last)
        torch.cuda.set_sync_debug_mode("error")
        try:
            return real(self, data, last)
        finally:
            torch.cuda.set_sync_debug_mode(0)

    monkeypatch.setattr(Trainer, "train_step", strict)
    cfg = tiny_config(packed, tmp_path, "strict",
                      train={"epochs": 1, "log_every": 1000, "ema_decay": 0.99,
                             "nonfinite": "skip", "precision": "bf16"},
                      optim={"grad_accum": 2, "grad_clip": 1.0, "schedule": "cosine"},
                      data={"flip": True, "num_workers": 0, "pin_memory": True})  # fmt: skip
    Trainer(cfg).fit()
    assert len(calls) > 4


def test_fp16_scheduler_steps_only_with_the_optimizer(packed, tmp_path, cuda_state):
    """A grad scale far too high overflows fp16 gradients: the scaler skips those optimizer
    steps (Adam's step count stays), and the LR schedule must skip them too."""
    from dist_seg.train import Trainer

    cfg = tiny_config(packed, tmp_path, "fp16sched",
                      train={"epochs": 2, "precision": "fp16"},
                      optim={"schedule": "cosine"})  # fmt: skip
    trainer = Trainer(cfg)
    trainer.accelerator.scaler._init_scale = 2.0**40  # about 25 skipped steps before it fits
    optimizer, scheduler = trainer.optimizer.optimizer, trainer.scheduler
    trainer.fit()
    taken = int(optimizer.state[optimizer.param_groups[0]["params"][0]]["step"])
    assert taken < 2 * trainer.steps_per_epoch  # some steps were skipped
    assert scheduler.last_epoch == taken


def _decoded(manifest, split, **kw) -> dict:
    """name -> (image on the CPU, mask, where the image came from) of every batch."""
    from dist_seg.data.stream import build_loader

    out = {}
    for b in build_loader(manifest, split, batch_size=4, train=False, **kw):
        for name, image, mask in zip(b["name"], b["image"], b["mask"], strict=True):
            out[name] = (image.cpu(), mask, image.device.type)
    return out


def _largest_difference(cpu: dict, gpu: dict) -> tuple[int, float]:
    assert cpu.keys() == gpu.keys() and cpu
    diffs = []
    for name, (image, mask, _) in cpu.items():
        assert gpu[name][2] == "cuda", name  # decoded on the device
        assert torch.equal(gpu[name][1], mask), name  # masks: lossless, from the workers
        diffs.append((gpu[name][0].int() - image.int()).abs())
    return max(int(d.max()) for d in diffs), float(torch.cat([d.flatten() for d in diffs]).float().mean())  # fmt: skip


def test_gpu_jpeg_decode_matches_the_worker_decode_within_a_level_or_two(
    packed_jpeg, tmp_path_factory, record_property
):
    """nvJPEG (data.decode=gpu) against libjpeg-turbo in the workers (data.decode=cpu): on
    packed jpeg shards at their size, and on foreign shards of many sizes fitted on the
    device (+1 level: F.interpolate against PIL's resize). The largest difference goes to
    tests.xml (gpu_check.json) and the log."""
    from test_decode import _foreign  # images 20-90 px, PNG/CMYK under .jpg among them

    from dist_seg.data import decode
    from dist_seg.data.index import index
    from dist_seg.data.manifest import load_manifest

    backend, why = decode.choose_backend(torch.device("cuda"))
    if backend != "nvjpeg":
        pytest.skip(f"no nvJPEG decode here: {why}")
    manifest = load_manifest(packed_jpeg)
    for workers in (0, 2):
        largest, mean = _largest_difference(
            _decoded(manifest, "test", num_workers=workers),
            _decoded(manifest, "test", num_workers=workers, decode="gpu", device="cuda"),
        )
        print(f"nvJPEG vs PIL, packed jpeg, {workers} workers: largest difference {largest} "
              f"levels, mean {mean:.4f}")  # fmt: skip
        record_property(f"packed_largest_difference_w{workers}", largest)
        record_property(f"packed_mean_difference_w{workers}", round(mean, 4))
        assert largest <= 4 and mean < 0.5
    folder = tmp_path_factory.mktemp("foreign-gpu") / "shards"
    _foreign(folder)
    index(folder, image_key="jpg", mask_key="png", split_by_prefix=True)
    foreign = load_manifest(folder)
    for aspect in ("stretch", "pad"):
        kw = {"size": "32x48", "aspect": aspect}
        largest, mean = _largest_difference(
            _decoded(foreign, "train", **kw),
            _decoded(foreign, "train", decode="gpu", device="cuda", **kw),
        )
        print(f"nvJPEG + resize on the device vs PIL, foreign shards, {aspect}: largest "
              f"difference {largest} levels, mean {mean:.4f}")  # fmt: skip
        record_property(f"foreign_{aspect}_largest_difference", largest)
        assert largest <= 5 and mean < 1.0


def test_training_with_gpu_decode_runs_on_cuda(packed_jpeg, tmp_path, cuda_state):
    """data.decode=gpu through the Trainer: pinned batches of JPEG bytes, 2 workers."""
    from dist_seg.train import Trainer

    cfg = tiny_config(packed_jpeg, tmp_path, "nvjpeg", data={"decode": "gpu", "num_workers": 2},
                      train={"epochs": 1})  # fmt: skip
    trainer = Trainer(cfg)
    assert trainer.train_loader.decoder.backend == "nvjpeg"
    trainer.fit()
    assert len(finite_history(tmp_path / "nvjpeg")) == 1


def test_bench_train_reports_mfu_and_peak_memory(tmp_path, cuda_state):
    """On a GPU the train bench fills the MFU (with --peak-tflops for any GPU) and
    peak-memory columns the CPU leaves empty, and --max-batch runs its search."""
    import argparse

    from dist_seg import bench
    from dist_seg.cli import add_plugin

    def run(argv):
        parser = argparse.ArgumentParser(prog="dist-seg")
        add_plugin(parser.add_subparsers(dest="command", required=True), "bench")
        out = tmp_path / "r.json"
        assert bench.run(parser.parse_args(["bench", "train", *argv, "--json", str(out)])) == 0
        return json.loads(out.read_text())

    tiny = ["--work", str(tmp_path), "--num-images", "20", "--size", "32", "--width", "0.0625"]
    r = run([*tiny, "--batch", "2", "--warmup", "1", "--steps", "2", "--repeats", "1",
             "--workers", "0", "--peak-tflops", "100"])  # fmt: skip
    for v in r["variants"].values():
        assert 0 < v["mfu"] < 1 and v["peak_mem_gib"] > 0
        assert v["mfu"] == pytest.approx(v["tflops"] / 100)
    r = run([*tiny, "--max-batch", "--max-batch-limit", "64"])
    assert r["max_batch"] == 64 and r["capped"] is True  # a tiny model: the cap fits
    assert [t["batch"] for t in r["tried"]] == [32, 64] and all(t["fits"] for t in r["tried"])
