"""`dist-seg bench train`: images/s of one training step of ``--model`` on a preloaded batch,
the configured "bare" step (precision, channels-last, compile; dist_seg's loss; with
``--switches`` also the same step with each fast-path switch flipped in turn) against a
seed-style step (fp32, contiguous, ``BCEWithLogitsLoss``, ``loss.backward();
optimizer.step()``) of the same model; FLOPs of one forward + backward from
``FlopCounterMode``, MFU and peak memory on a GPU. Then the real trainer
(``Trainer.train_one_epoch`` fed the streaming loader over packed shards, its epoch made as
long as the real set's) against the bare step: the overhead of to_device, flips,
accumulate, loss, metric sums and waits for data, per step after ``--warmup`` steps.

``--max-batch``: the largest batch of ``--model`` at ``--size`` that trains on this GPU
(doubling, then bisecting on CUDA out-of-memory); CUDA only.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

from dist_seg.bench import REAL_TRAIN_SAMPLES
from dist_seg.bench.data import packed, repeat_train, synthetic_root
from dist_seg.errors import UserError

GOAL_TRAINER_OVERHEAD_PCT = 5.0  # real trainer step vs bare step
BENCHMARK_OFF = "bare, cudnn.benchmark and TF32 matmul off"  # a GPU-only --switches variant
MAX_BATCH_START = 32  # the first batch --max-batch tries (then doubles)

# Dense peak TFLOP/s of one GPU from the vendors' data sheets: (name part, bf16, tf32); the
# first match wins. precision "no" is rated against TF32: cuDNN runs fp32 convs in TF32 by
# default (torch.backends.cudnn.allow_tf32), and the trainer also enables it for matmuls.
PEAK_TFLOPS = (
    ("H100 PCIe", 756.0, 378.0),
    ("H100 NVL", 835.0, 418.0),
    ("H100", 989.4, 494.7),  # SXM
    ("H200", 989.4, 494.7),
    ("A100", 312.0, 156.0),
    ("L40S", 362.0, 183.0),
    ("L40", 181.0, 90.5),
    ("L4", 121.0, 60.0),
)


# --- the step ---------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def speed_switches(on: bool) -> None:
    """The trainer's GPU switches (runtime.apply_speed_switches) for the configured steps;
    torch's defaults for the seed's (cuDNN benchmark off, no TF32 matmuls; convs use TF32
    either way)."""
    if torch.cuda.is_available():
        torch.backends.cudnn.benchmark = on
        torch.backends.cuda.matmul.allow_tf32 = on


@contextlib.contextmanager
def peak_memory(device: torch.device):
    """Yields a function giving the peak GPU memory (GiB) allocated inside the block above
    what was allocated at its start; None off the GPU."""
    if device.type != "cuda":
        yield lambda: None
        return
    held = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    yield lambda: (torch.cuda.max_memory_allocated(device) - held) / 2**30


def resident_gib(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> float:
    """Parameters, buffers and optimizer state: what a model holds between steps."""
    tensors = [*model.parameters(), *model.buffers()]
    tensors += [
        t for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t)
    ]
    return sum(t.nbytes for t in tensors) / 2**30


def time_steps(step, count: int, device: torch.device) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds) per call of ``step`` over ``count`` calls."""
    _sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(count):
        step()
    _sync(device)
    return (time.perf_counter() - t0) / count, (time.process_time() - c0) / count


def count_flops(model: torch.nn.Module, images: torch.Tensor, target: torch.Tensor) -> int:
    """FLOPs of one forward + backward, counted by torch's ``FlopCounterMode``.

    The method: 2 FLOPs per multiply-add of every convolution, transposed convolution and
    matmul (the models have no matmul); nothing for BatchNorm, ReLU, pooling, upsampling,
    concatenation or the loss. The backward of a convolution is counted twice its forward
    (the gradients of its input and of its weights), except for the first convolution,
    whose input (the images) needs no gradient. So fwd + bwd = 3 x forward - the first
    convolution's forward. Checked by hand (forward hooks summing 2 * Cin/groups * Cout *
    kh * kw * Hout * Wout per conv; Hin * Win for the transposed ones): UNet at 256 px is
    96.33 GFLOP forward, 288.78 GFLOP fwd + bwd per image; ResNet34-UNet 48.36 and 144.77
    (tests/test_bench.py checks the identity at a tiny size)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        torch.nn.functional.binary_cross_entropy_with_logits(model(images), target).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def peak_tflops(device: torch.device, precision: str, override: float | None) -> float | None:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for part, bf16, tf32 in PEAK_TFLOPS:
        if part in name:
            return bf16 if precision == "bf16" else tf32
    return None


class TimedLoader:
    """A loader cut to ``count`` batches (chaining epochs if one is too short).
    ``ends[k]`` is (wall, CPU time of this process) when the trainer asked for the batch
    after batch k, so ``ends[k] - ends[k - 1]`` is one whole trainer step including any wait
    for data; ``ends[-1]`` of a run is its start."""

    def __init__(self, loader, count: int, device: torch.device, sync_at: tuple[int, ...]):
        self.loader, self.count, self.device, self.sync_at = loader, count, device, sync_at
        self.epoch, self.ends = 0, {}

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.epoch = epoch

    skip_batches = 0  # the rest of the trainer's loader contract: never resumed here

    def trained_before(self, epoch: int) -> list[int]:
        return []

    def keys_trained_before(self, epoch: int) -> list[str]:
        return []

    def state_dict(self, epoch: int, batches_done: int, grad_accum: int = 1) -> dict:
        return self.loader.state_dict(epoch, 0, grad_accum)

    def __len__(self) -> int:  # the trainer sees a real epoch's length (its logging cadence)
        return max(len(self.loader), self.count)

    def _stamp(self, k: int) -> None:
        if k in self.sync_at:
            _sync(self.device)
        self.ends[k] = (time.perf_counter(), time.process_time())

    def __iter__(self):
        self.ends, given, epoch = {}, 0, self.epoch
        self._stamp(-1)
        while True:
            self.loader.set_epoch(epoch)
            batches = iter(self.loader)
            try:
                for batch in batches:
                    yield batch
                    self._stamp(given)
                    given += 1
                    if given == self.count:
                        return
            finally:
                batches.close()  # ends the epoch's workers
            epoch += 1_000_000  # a short epoch ran out: go on with another order


def trainer_with_loader(cfg, loader):
    """A Trainer of ``cfg`` that trains on ``loader``, its console silenced (no progress
    bars in the tables)."""
    from dist_seg.console import Console
    from dist_seg.train import Trainer

    trainer = Trainer(cfg, train_loader=loader)
    trainer.console = Console(enabled=False)
    return trainer


@contextlib.contextmanager
def real_trainer(args, shards: Path, work: Path, precision: str, device):
    """Yields ``(run_round, trainer)``: ``run_round(r)`` runs epoch ``r`` of the real
    ``Trainer.train_one_epoch`` for ``--warmup`` + ``--steps`` batches and returns the
    seconds per step after the warmup (worker start and pipeline fill are in the warmup)."""
    from accelerate.state import AcceleratorState

    from dist_seg.config import load_config
    from dist_seg.data.manifest import load_manifest
    from dist_seg.data.stream import build_loader
    from dist_seg.runtime import release

    cfg = load_config(None, [{
        "name": "bench-train",
        "data": {"shards": str(shards), "size": args.size, "num_workers": args.workers},
        "model": {"name": args.model, "width": args.width, "stem_pool": args.stem_pool},
        "train": {"batch_size": args.batch, "precision": precision, "epochs": 1,
                  "channels_last": args.channels_last, "compile": args.compile},
        "run": {"out_dir": str(work / "runs"), "name": "bench-train"},
        "wandb": {"mode": "disabled"},
    }])  # fmt: skip
    n = args.warmup + args.steps
    # The loader the Trainer would build, on the train split listed `copies` times: epochs
    # as long as the real set's, so a short synthetic split does not restart workers mid-run.
    manifest = load_manifest(shards)
    copies = math.ceil(REAL_TRAIN_SAMPLES / manifest.num_samples(cfg.data.train_split))
    loader = build_loader(
        repeat_train(manifest, copies), cfg.data.train_split, batch_size=args.batch,
        train=True, num_workers=args.workers, seed=cfg.train.seed, border=cfg.data.border,
        size=args.size, shuffle_buffer=cfg.data.shuffle_buffer,
        pin_memory=cfg.data.pin_memory and device.type == "cuda",
        persistent_workers=cfg.data.persistent_workers,
    )  # fmt: skip
    timed = TimedLoader(loader, n, device, sync_at=(args.warmup - 1, n - 1))
    # accelerate keeps one precision per process: start from a clean state, leave one too.
    AcceleratorState._reset_state()
    with _wandb_disabled():
        trainer = trainer_with_loader(cfg, timed)
    try:

        def run_round(r: int) -> float:
            trainer.epoch, trainer.step = r, 0
            trainer.train_one_epoch()
            (t1, c1), (t0, c0) = timed.ends[n - 1], timed.ends[args.warmup - 1]
            return (t1 - t0) / args.steps, (c1 - c0) / args.steps

        yield run_round, trainer
    finally:
        trainer.tracker.finish()
        trainer.preemption.restore()
        accelerator = trainer.accelerator
        trainer.model = trainer.optimizer = trainer.train_loader = trainer.val_loader = None
        release(accelerator)
        AcceleratorState._reset_state()


@contextlib.contextmanager
def _wandb_disabled():
    """WANDB_MODE in the environment would override the bench's ``wandb.mode: disabled``."""
    saved = os.environ.pop("WANDB_MODE", None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ["WANDB_MODE"] = saved


def bench_train(args, work: Path) -> dict:
    from dist_seg.data.manifest import load_manifest
    from dist_seg.data.stream import build_loader
    from dist_seg.data.transforms import random_flips, to_device
    from dist_seg.models import build_model
    from dist_seg.train import loss_fn

    if args.warmup < 1 or args.steps < 1 or args.repeats < 1 or args.batch < 1:
        raise UserError("--warmup, --steps, --repeats and --batch must be at least 1")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = args.precision or ("bf16" if device.type == "cuda" else "no")
    root = synthetic_root(work, args.num_images)
    shards = packed(root, work, args.size, "raw", args.shard_size)
    loader = build_loader(load_manifest(shards), "train", batch_size=args.batch, train=True)
    batch = next(iter(loader))  # one real batch, preloaded on the device
    images, masks = to_device(batch, device, channels_last=False)
    kwargs = {"width": args.width} | ({"stem_pool": True} if args.stem_pool else {})

    def build() -> torch.nn.Module:
        torch.manual_seed(0)
        return build_model(args.model, **kwargs).to(device).train()

    # The seed's step: fp32, contiguous, BCEWithLogitsLoss on a float mask, loss.item().
    seed_model = build()
    seed_opt = torch.optim.Adam(seed_model.parameters(), lr=1e-4)
    criterion = torch.nn.BCEWithLogitsLoss()
    seed_x, seed_y = images.contiguous(), masks.unsqueeze(1).float()

    def seed_step():
        loss = criterion(seed_model(seed_x), seed_y)
        seed_opt.zero_grad()
        loss.backward()
        seed_opt.step()
        loss.item()

    def make_step(precision: str, channels_last: bool, compile_: bool, flips: bool = False):
        """A bare step: the trainer's model set-up and loss on preloaded tensors."""
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        model = build().to(memory_format=memory_format)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, fused=True)  # as the trainer
        step_model = torch.compile(model) if compile_ else model
        x = images.contiguous(memory_format=memory_format)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        coins = torch.Generator(device=device).manual_seed(0)

        def step():
            xb, yb = random_flips(x, masks, coins) if flips else (x, masks)
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=bool(dtype)):
                logits = step_model(xb)
            loss, _ = loss_fn(logits, yb, "bce")
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return step, model, optimizer

    # The configured step, then (--switches) the same with one fast-path switch flipped each.
    cl, comp = args.channels_last, args.compile
    steps = [("seed", seed_step, seed_model, seed_opt), ("bare", *make_step(precision, cl, comp))]
    if args.switches:
        for other in ("no", "bf16") + (("fp16",) if device.type == "cuda" else ()):
            if other != precision:
                steps.append((f"bare, precision {other}", *make_step(other, cl, comp)))
        steps.append((f"bare, channels_last {not cl}", *make_step(precision, not cl, comp)))
        steps.append((f"bare, compile {not comp}", *make_step(precision, cl, not comp)))
        steps.append(("bare + flips on the device", *make_step(precision, cl, comp, flips=True)))
        if device.type == "cuda":
            steps.append((BENCHMARK_OFF, *make_step(precision, cl, comp)))

    flops = count_flops(seed_model, seed_x, seed_y)  # the same for every variant
    peak = peak_tflops(device, precision, args.peak_tflops)
    seconds: dict[str, list[float]] = {}
    cpu_seconds: dict[str, list[float]] = {}
    memory: dict[str, float | None] = {}
    warmup_s: dict[str, float] = {}

    def measure(name: str, timed_step, model, optimizer) -> None:
        with peak_memory(device) as peak_above:
            wall, cpu = timed_step()
            above = peak_above()
        seconds.setdefault(name, []).append(wall)
        cpu_seconds.setdefault(name, []).append(cpu)
        if above is not None:  # what the variant holds between steps + its peak above that
            mem = resident_gib(model, optimizer) + above
            memory[name] = max(memory.get(name) or 0.0, mem)
        else:
            memory.setdefault(name, None)

    with contextlib.ExitStack() as stack:
        trainer = None
        if args.trainer:
            run_round, trainer = stack.enter_context(
                real_trainer(args, shards, work, precision, device)
            )
        for r in range(args.repeats):  # interleaved rounds; the seed and bare steps warm up once
            for name, step, model, opt in steps:
                speed_switches(name not in ("seed", BENCHMARK_OFF))
                if r == 0:
                    t0 = time.perf_counter()
                    for _ in range(args.warmup):
                        step()
                    _sync(device)
                    warmup_s[name] = time.perf_counter() - t0
                measure(name, lambda step=step: time_steps(step, args.steps, device), model, opt)
            if trainer is not None:
                speed_switches(True)
                measure("trainer", lambda r=r: run_round(r), trainer.raw_model, trainer.optimizer)

    def record(step_s: float, mem: float | None) -> dict:
        achieved = flops / step_s / 1e12
        return {"step_s": step_s, "ms_per_image": 1e3 * step_s / args.batch,
                "images_per_s": args.batch / step_s, "tflops": achieved,
                "mfu": achieved / peak if peak else None, "peak_mem_gib": mem}  # fmt: skip

    variants = {
        k: record(min(v), memory[k]) | {"rounds_step_s": v, "cpu_step_s": min(cpu_seconds[k])}
        for k, v in seconds.items()
    }
    for k, v in warmup_s.items():
        variants[k]["warmup_s"] = v
    result = {
        "config": {
            "model": args.model,
            "width": args.width,
            "stem_pool": args.stem_pool,
            "size": args.size,
            "shard_size": args.shard_size,
            "batch": args.batch,
            "precision": precision,
            "channels_last": args.channels_last,
            "compile": args.compile,
            "switches": args.switches,
            "warmup": args.warmup,
            "steps": args.steps,
            "repeats": args.repeats,
            "workers": args.workers,
            "device": str(device),
        },
        "flops_per_image": flops / args.batch,
        "peak_tflops": peak,
        "variants": variants,
        "speedup_vs_seed": variants["seed"]["step_s"] / variants["bare"]["step_s"],
    }
    if args.trainer:
        overhead = 100 * (variants["trainer"]["step_s"] / variants["bare"]["step_s"] - 1)
        cpu = 100 * (variants["trainer"]["cpu_step_s"] / variants["bare"]["cpu_step_s"] - 1)
        result |= {"trainer_overhead_pct": overhead, "trainer_overhead_cpu_pct": cpu,
                   "overhead_goal_pct": GOAL_TRAINER_OVERHEAD_PCT,
                   "overhead_goal_met": overhead <= GOAL_TRAINER_OVERHEAD_PCT}  # fmt: skip
    return result


# --- the largest batch that fits ------------------------------------------------------------
def largest_fitting(
    fits: Callable[[int], bool], start: int, limit: int, within: float = 0.0
) -> tuple[int, bool]:
    """The largest batch ``b <= limit`` with ``fits(b)``, assuming every smaller batch fits
    when ``b`` does: doubling from ``start`` until one does not fit, then bisecting between
    the last that fit and the first that did not, until they are at most ``within`` x the
    fitting one apart (0: exactly). Returns (batch, capped): 0 if not even batch 1 fits;
    capped when ``limit`` fits (larger was not tried)."""
    lo, hi, b = 0, None, max(1, min(start, limit))
    while hi is None:
        if not fits(b):
            hi = b
        elif b >= limit:
            return b, True
        else:
            lo, b = b, min(2 * b, limit)
    while hi - lo > max(1, within * lo):
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo, False


def bench_max_batch(args, work: Path) -> dict:
    """Two real training steps (bf16 autocast as configured, channels-last, dist_seg's loss,
    Adam) per batch tried, on random images of ``--size``: the second step holds the
    optimizer state too. cudnn.benchmark is on, as in training (its workspaces count)."""
    from dist_seg.models import build_model
    from dist_seg.train import loss_fn

    if not torch.cuda.is_available():
        raise UserError("--max-batch finds the largest batch that fits in GPU memory: it needs "
                        "CUDA, and this machine has none")  # fmt: skip
    if args.max_batch_limit < 1:
        raise UserError(f"--max-batch-limit {args.max_batch_limit}: must be at least 1")
    device = torch.device("cuda")
    precision = args.precision or "bf16"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    speed_switches(True)
    kwargs = {"width": args.width} | ({"stem_pool": True} if args.stem_pool else {})
    torch.manual_seed(0)
    model = build_model(args.model, **kwargs).to(device, memory_format=memory_format).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    tried: list[dict] = []

    def fits(batch: int) -> bool:
        t0, ok = time.perf_counter(), True
        torch.cuda.reset_peak_memory_stats(device)
        x = y = logits = loss = None
        try:
            x = torch.rand(batch, 3, args.size, args.size, device=device)
            x = x.contiguous(memory_format=memory_format)
            y = torch.randint(0, 2, (batch, args.size, args.size), device=device, dtype=torch.uint8)
            for _ in range(2):
                with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=bool(dtype)):
                    logits = model(x)
                loss, _ = loss_fn(logits, y, "bce")
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            torch.cuda.synchronize(device)
        except torch.cuda.OutOfMemoryError:
            ok = False
        except RuntimeError as e:  # cuDNN/cuBLAS report it in their own words
            if "out of memory" not in str(e).lower() and "CUDNN_STATUS_ALLOC" not in str(e):
                raise
            ok = False
        x = y = logits = loss = None  # noqa: F841  (free before the next try)
        optimizer.zero_grad(set_to_none=True)
        gc.collect()
        torch.cuda.empty_cache()
        peak = torch.cuda.max_memory_allocated(device) / 2**30
        tried.append({"batch": batch, "fits": ok, "peak_mem_gib": peak,
                      "seconds": time.perf_counter() - t0})  # fmt: skip
        return ok

    # Within 1/16: each try costs two steps and a cuDNN autotune of the new shapes.
    best, capped = largest_fitting(fits, MAX_BATCH_START, args.max_batch_limit, within=1 / 16)
    total = torch.cuda.get_device_properties(device).total_memory / 2**30
    return {
        "config": {
            "model": args.model,
            "width": args.width,
            "stem_pool": args.stem_pool,
            "size": args.size,
            "precision": precision,
            "channels_last": args.channels_last,
            "device": str(device),
            "limit": args.max_batch_limit,
        },  # fmt: skip
        "max_batch": best,
        "within": 1 / 16,  # the search stops when the first failing batch is this close
        "capped": capped,
        "device_memory_gib": total,
        "tried": tried,
    }
