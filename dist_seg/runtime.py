"""Accelerate set-up in one place: device, process group, precision and the fast-path switches."""

from __future__ import annotations

import contextlib
import gc
import hashlib
import os
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, broadcast

from dist_seg.errors import UserError


def cpu_has_fast_bf16() -> bool:
    """bf16 autocast pays on CPUs with native bf16 (AVX512-BF16 or AMX): measured 1.7-2.0x
    over fp32 channels-last on these machines (BENCHMARKS.md). Elsewhere it would be slower."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(f.read().split())
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def resolve_precision(precision: str, cuda: bool) -> str:
    if precision == "auto":
        if cuda:
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if cpu_has_fast_bf16() else "no"
    if precision == "fp16" and not cuda:
        # accelerate would silently run fp16 as fp32 on CPU (DESIGN.md section 3).
        raise UserError(
            "train.precision=fp16 needs a GPU; on CPU it would silently run in fp32. "
            "Use train.precision=bf16 or no"
        )
    return precision


def make_accelerator(
    precision: str = "no", grad_accum: int = 1, log_with=None, timeout_s: int = 600
) -> Accelerator:
    """An Accelerator for this machine: CUDA if present, otherwise CPU processes on gloo,
    so a plain `accelerate launch --multi_gpu --num_processes 2` works on a laptop too."""
    cuda = torch.cuda.is_available()
    # No backend here: accelerate picks gloo for CPU processes and NCCL for GPUs, and none
    # at all for a single process (naming one would make it start a process group).
    kwargs = InitProcessGroupKwargs(timeout=timedelta(seconds=timeout_s))
    if not cuda and uses_deepspeed():
        kwargs.backend = "gloo"  # DeepSpeed on CPU asserts or fails allgather otherwise (DESIGN 4)
    accelerator = Accelerator(
        # cpu=True makes accelerate drop a DeepSpeed config without a word (MULTI_CPU, plain
        # DDP); DeepSpeed itself picks its CPU accelerator where there is no CUDA.
        cpu=not cuda and not uses_deepspeed(),
        mixed_precision=resolve_precision(precision, cuda),
        gradient_accumulation_steps=grad_accum,
        log_with=log_with,
        kwargs_handlers=[kwargs],
    )
    return accelerator


def uses_deepspeed() -> bool:
    """Whether `accelerate launch` was given a DeepSpeed config (it says so in the env)."""
    from accelerate.utils import parse_flag_from_env

    return parse_flag_from_env("ACCELERATE_USE_DEEPSPEED")


def apply_speed_switches(
    cudnn_benchmark: bool = True, tf32: bool = True, deterministic: bool = False
) -> None:
    """train.cudnn_benchmark, train.tf32 and train.deterministic, applied in one place.

    ``deterministic``: cuDNN's deterministic algorithms with benchmarking off, and
    torch.use_deterministic_algorithms (warn_only: an op without a deterministic kernel
    warns instead of stopping the run), so that a resumed run can end bit-identical on a
    GPU too, as it does on CPU. It costs speed: cudnn.benchmark picks the fastest kernels,
    often nondeterministic ones (measure it with `dist-seg bench train --switches`)."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it
        torch.use_deterministic_algorithms(True, warn_only=True)
    if torch.cuda.is_available():
        torch.backends.cudnn.benchmark = cudnn_benchmark and not deterministic
        torch.backends.cudnn.deterministic = deterministic
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32


def sync_buffers(model: torch.nn.Module, accelerator: Accelerator) -> None:
    """Broadcast BatchNorm running statistics from rank 0.

    DDP broadcasts buffers only before a training forward, so after the last step ranks
    hold slightly different statistics (DESIGN.md section 3). Called before every
    evaluation and save, so what is evaluated is what is saved, on every rank.
    """
    if accelerator.num_processes == 1:
        return
    for buf in accelerator.unwrap_model(model).buffers():
        broadcast(buf, from_process=0)


def release(accelerator: Accelerator, *objects) -> None:
    """Free everything before exit: with it, the gloo abort at interpreter shutdown
    ("terminate called without an active exception", DESIGN.md section 3) went away."""
    del objects
    accelerator.free_memory()
    gc.collect()
    accelerator.wait_for_everyone()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def raise_on_any_rank(accelerator: Accelerator, error: Exception | None) -> None:
    """Re-raise ``error`` on *every* rank if any rank had one: a check that fails on one
    rank only would otherwise leave the others waiting in the next collective."""
    if accelerator.num_processes == 1:
        if error is not None:
            raise error
        return
    from accelerate.utils import gather_object

    messages = [m for m in gather_object([str(error) if error else ""]) if m]
    if messages:
        raise type(error)(messages[0]) if error else UserError(messages[0])


def read_on_every_rank(accelerator: Accelerator, path: Path | None) -> bytes | None:
    """The bytes of ``path`` as the main process reads it, on every rank (None: no file).

    Ranks that see the very same file (same size and sha256) read their own copy, so on a
    shared disk nothing big crosses the network; ranks that do not (node-local disks, a
    relative path in another working directory) get the main process's bytes by broadcast.
    """
    if accelerator.num_processes == 1:
        return _read(path) if path is not None else None
    from accelerate.utils import broadcast_object_list, gather_object

    data, error = None, None
    if accelerator.is_main_process and path is not None:
        try:
            data = _read(path)
        except UserError as e:
            error = e
    raise_on_any_rank(accelerator, error)
    meta = [None if data is None else (str(path), len(data), hashlib.sha256(data).hexdigest())]
    broadcast_object_list(meta, from_process=0)
    if meta[0] is None:
        return None
    name, size, digest = meta[0]
    if not accelerator.is_main_process:
        with contextlib.suppress(OSError):
            local = Path(name)
            if local.is_file() and local.stat().st_size == size:
                data = local.read_bytes()
                data = data if hashlib.sha256(data).hexdigest() == digest else None
    if any(gather_object([data is None])):
        box = [data if accelerator.is_main_process else None]
        broadcast_object_list(box, from_process=0)
        data = box[0] if data is None else data
    return data


def _read(path: Path) -> bytes:
    if not path.is_file():
        raise UserError(f"checkpoint {path} not found; give the path of a last.pt or --resume auto")
    try:
        return path.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read checkpoint {path}: {e.strerror}") from None


class Preemption:
    """SIGTERM and SIGUSR1 only set a flag; the trainer checkpoints at the next step boundary
    where all ranks compare flags (DESIGN.md section 7: handlers must not do the work)."""

    SIGNALS = ("SIGTERM", "SIGUSR1")

    def __init__(self):
        import signal

        self.requested = False
        self._previous = {}
        for name in self.SIGNALS:
            sig = getattr(signal, name, None)
            if sig is not None:
                # not possible outside the main thread (e.g. a test runner thread): no-op there
                with contextlib.suppress(ValueError):
                    self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def restore(self) -> None:
        import signal

        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


class LateFlags:
    """Per-step decisions without a host sync: flags all-reduced on the device, read by the
    host one step late.

    Each step ``reduce`` sums [this rank's loss is non-finite, this rank was asked to stop]
    over ranks on the device (an all-reduce queued like any kernel), and ``push`` copies the
    step's flags into pinned host memory behind an event. ``read`` returns the pushed values,
    waiting for that event only: called after the next step's forward and backward are
    queued, it waits for work finished long ago, so the device never waits for the host.
    Every rank reads the same all-reduced values at the same step: the same decisions.
    """

    def __init__(self, accelerator: Accelerator, preemption: Preemption, size: int = 3):
        self.accelerator, self.preemption = accelerator, preemption
        cuda = accelerator.device.type == "cuda"
        # Host buffers read and written through numpy views: no torch call, no sync.
        self._stop = torch.zeros(1, pin_memory=cuda)
        self._stop_view = self._stop.numpy()
        self._host = torch.zeros(size, pin_memory=cuda)
        self._host_view = self._host.numpy()
        self._event = torch.cuda.Event() if cuda else None
        self.pending = None  # what the last push was about (the trainer's step), until read

    def reduce(self, bad: torch.Tensor) -> torch.Tensor:
        """[ranks with a non-finite loss, ranks asked to stop] on the device, all-reduced."""
        acc = self.accelerator
        # The stop flag goes host -> device without blocking. A copy still queued when the
        # next step rewrites the buffer can only see 1 a step early: the flag never goes back.
        self._stop_view[0] = float(self.preemption.requested)
        stop = self._stop.to(acc.device, non_blocking=True)
        flags = torch.cat([bad.reshape(1).float(), stop])
        if acc.num_processes > 1:
            flags = acc.reduce(flags, reduction="sum")
        return flags

    def push(self, flags: torch.Tensor, about) -> None:
        self._host.copy_(flags, non_blocking=True)
        if self._event is not None:
            self._event.record()
        self.pending = about

    def read(self):
        """(values, about) of the last push, then nothing until the next push."""
        if self.pending is None:
            return None, None
        if self._event is not None:
            self._event.synchronize()
        about, self.pending = self.pending, None
        return self._host_view.copy(), about
