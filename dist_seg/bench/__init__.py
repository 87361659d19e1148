"""`dist-seg bench data | train`: the speed figures of BENCHMARKS.md, measured on this machine.

``bench data`` (bench/data.py): a synthetic Oxford-IIIT Pet (made once under ``--work``) is
packed at ``--size`` in both encodings and read by the streaming loader
(``build_loader(train=True)``: tar read, decode, border mask, collate), by a seed-style
per-file loader (the course template's Dataset: PIL opens the full-size JPEG and the trimap
PNG and resizes every sample; the DataLoader's default collate) and by a plain webdataset
pipeline over the same shards (the loader a user would write from webdataset's README), over
the same train images with the same worker counts, interleaved in one run. Flips are in
none: dist_seg flips on the device in the train step (``transforms.random_flips``). Figures:
  * samples/s over ``--epochs`` whole epochs of a new loader, worker start included (the
    streaming loader keeps its workers across epochs, as the trainer does; the seed's and
    webdataset's re-create them every epoch; a "raw, restart" row times the streaming loader
    with persistent workers off). An epoch goes over the synthetic train split as many times
    as it takes to be as long as the real one (``--epoch-samples``, 3,312), so the
    per-epoch costs weigh what they weigh on the real set.
  * per core = samples/s / max(1, workers): the workers are counted, not the main process
    that only receives their batches; with 0 workers the main process is the one core.
  * ratio = streaming per core / seed-style per core, at the same worker count; toolkit
    ratio = streaming per core / a peer's per core, same encoding and worker count.
  * the best of ``--repeats`` interleaved rounds (the round least disturbed by other load).
The data bench runs torch with one intra-op thread, as DataLoader workers do. Page cache is
warm for every loader (the synthetic files and shards were just written or read).

``bench train`` (bench/train.py): images/s of one training step against the seed's step,
FLOPs, MFU and peak memory on a GPU, the real trainer's overhead; ``--max-batch``: the
largest batch that fits on the GPU. Printing and JSON: bench/report.py.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from dist_seg.errors import UserError

REAL_TRAIN_SAMPLES = 3312  # the real train split (trainval lines with index % 10 != 0)


# --- command line -------------------------------------------------------------------------------
def add_parser(subparsers, help_text: str) -> argparse.ArgumentParser:
    p = subparsers.add_parser("bench", help=help_text)
    sub = p.add_subparsers(dest="what", required=True, metavar="{data,train}")
    d = sub.add_parser("data", help="samples/s per core: streaming loader vs seed-style and "
                       "plain webdataset loaders")  # fmt: skip
    t = sub.add_parser("train", help="images/s of a train step vs the seed's; trainer overhead")
    for q, num_images in ((d, 600), (t, 200)):
        q.add_argument("--work", help="keep (and reuse) the synthetic set and packs here "
                       "(default: a temporary directory, removed after)")  # fmt: skip
        q.add_argument("--num-images", type=int, default=num_images, help="synthetic set size")
        q.add_argument("--size", type=int, default=256, help="side in pixels (multiple of 16)")
        q.add_argument(
            "--shard-size", type=int, default=256, help="samples per shard (pack's default)"
        )
        q.add_argument("--json", help="also write the results to this file")
    d.add_argument("--batch", type=int, default=16)
    d.add_argument("--workers", default="0,1,2", help="loader worker counts, comma-separated")
    d.add_argument("--epoch-samples", type=int, default=REAL_TRAIN_SAMPLES,
                   help="samples per epoch: the train split is gone over as often as it "
                   "takes (default: the real train split's size)")  # fmt: skip
    d.add_argument("--epochs", type=int, default=2, help="epochs per measurement")
    d.add_argument("--repeats", type=int, default=2, help="interleaved rounds; the best is kept")
    d.add_argument("--decode", choices=("cpu", "gpu"), default="cpu",
                   help="gpu: also time jpeg shards with data.decode=gpu (the workers hand over "
                   "JPEG bytes, the main process decodes each batch: nvJPEG on CUDA, else PIL), "
                   "beside the workers' decode")  # fmt: skip
    t.add_argument("--model", default="unet", choices=("unet", "resnet34_unet"))
    t.add_argument("--width", type=float, default=1.0)
    t.add_argument("--stem-pool", action="store_true", help="resnet34_unet: standard max-pool")
    t.add_argument("--batch", type=int, default=4)
    t.add_argument("--precision", choices=("no", "bf16"), help="default: bf16 on GPU, else no")
    t.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    t.add_argument("--compile", action="store_true")
    t.add_argument("--switches", action="store_true", help="also time the step with each "
                   "fast-path switch flipped, one at a time (precision, channels-last, compile, "
                   "device flips; on a GPU also fp16 and cudnn.benchmark)")  # fmt: skip
    t.add_argument("--warmup", type=int, default=2, help="untimed steps per measurement")
    t.add_argument("--steps", type=int, default=5, help="timed steps per measurement")
    t.add_argument("--repeats", type=int, default=3, help="interleaved rounds; the best is kept")
    t.add_argument("--workers", type=int, default=2, help="loader workers of the real trainer")
    t.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's own)")
    t.add_argument("--trainer", action=argparse.BooleanOptionalAction, default=True,
                   help="also time the real trainer against the bare step")  # fmt: skip
    t.add_argument("--peak-tflops", type=float, help="GPU peak for MFU if not in the table")
    t.add_argument("--max-batch", action="store_true", help="instead: the largest batch of "
                   "--model at --size that trains on this GPU (doubling from 32, then "
                   "bisecting on CUDA out-of-memory, to within 1/16); CUDA only")  # fmt: skip
    t.add_argument("--max-batch-limit", type=int, default=4096,
                   help="--max-batch: the largest batch tried")  # fmt: skip
    p.set_defaults(func=run)
    return p


DATA_FLAGS = ("work", "num_images", "size", "shard_size", "epoch_samples", "batch", "workers",
              "epochs", "repeats", "decode", "json")  # fmt: skip
TRAIN_FLAGS = ("work", "num_images", "size", "shard_size", "model", "width", "stem_pool",
               "batch", "precision", "channels_last", "compile", "switches", "warmup", "steps",
               "repeats", "workers", "threads", "trainer", "peak_tflops", "max_batch",
               "max_batch_limit", "json")  # fmt: skip


def command_line(args) -> str:
    """The `dist-seg bench ...` line that reproduces ``args`` (from a parser or a Namespace)."""
    words = ["dist-seg", "bench", args.what]
    for key in DATA_FLAGS if args.what == "data" else TRAIN_FLAGS:
        value, flag = getattr(args, key, None), "--" + key.replace("_", "-")
        if key in ("channels_last", "trainer"):
            words.append(flag if value else f"--no-{flag[2:]}")
        elif value is True:
            words.append(flag)
        elif value not in (None, False):
            words += [flag, str(value)]
    return " ".join(words)


def run(args) -> int:
    import torch

    from dist_seg.bench import report

    if args.size <= 0 or args.size % 16:
        raise UserError(f"--size {args.size}: must be a positive multiple of 16")
    started = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    threads = torch.get_num_threads()
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    mode = "max_batch" if getattr(args, "max_batch", False) else args.what
    try:
        info = report.machine()  # torch_threads as the train bench runs (the data bench uses 1)
        with _work_dir(args.work) as work:
            if mode == "data":
                from dist_seg.bench.data import bench_data as measure
            elif mode == "train":
                from dist_seg.bench.train import bench_train as measure
            else:
                from dist_seg.bench.train import bench_max_batch as measure
            result = measure(args, work)
        info["load_avg_1m_end"] = round(os.getloadavg()[0], 2)
    finally:
        torch.set_num_threads(threads)
    result = {"bench": args.what, "mode": mode, "command": command_line(args), "date": started,
              "machine": info, "versions": report.versions(), **result}  # fmt: skip
    {"data": report.print_data, "train": report.print_train,
     "max_batch": report.print_max_batch}[mode](result)  # fmt: skip
    report.write_json(result, args.json)
    return 0


@contextlib.contextmanager
def _work_dir(work: str | None):
    if work:
        Path(work).mkdir(parents=True, exist_ok=True)
        yield Path(work)
        return
    with tempfile.TemporaryDirectory(prefix="dist-seg-bench-") as tmp:
        yield Path(tmp)


def main(argv: list[str] | None = None) -> int:  # python -m dist_seg.bench
    from dist_seg.cli import add_plugin

    parser = argparse.ArgumentParser(prog="dist-seg")
    add_plugin(parser.add_subparsers(dest="command", required=True), "bench")
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
