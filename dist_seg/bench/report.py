"""What a benchmark run prints and writes: the machine, the versions, the tables, the JSON."""

from __future__ import annotations

import contextlib
import json
import os
import platform
from pathlib import Path

import numpy as np
import torch


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info = {"cpu": cpu, "cores": os.cpu_count(), "usable_cores": usable,
            "torch_threads": torch.get_num_threads(), "load_avg_1m": round(os.getloadavg()[0], 2)}  # fmt: skip
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def versions() -> dict:
    import PIL
    import webdataset

    from dist_seg import __version__

    found = {"python": platform.python_version(), "torch": torch.__version__,
             "numpy": np.__version__, "pillow": PIL.__version__,
             "webdataset": getattr(webdataset, "__version__", "?"), "dist_seg": __version__}  # fmt: skip
    with contextlib.suppress(Exception):  # the optional peer loader (the bench extra)
        from importlib.metadata import version

        found["mosaicml-streaming"] = version("mosaicml-streaming")
    return found


def write_json(result: dict, path: str | None) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(result, indent=1) + "\n")


def _header(result: dict) -> str:
    m, v = result["machine"], result["versions"]
    return (f"{result['command']}\n{m['cpu']}, {m['cores']} cores ({m['usable_cores']} usable), "
            f"load {m['load_avg_1m']} -> {m['load_avg_1m_end']} | {m['torch_threads']} threads | torch {v['torch']} | {result['date']}"
            + (f" | {m['gpu']}" if "gpu" in m else ""))  # fmt: skip


def _console():
    import sys

    from rich.console import Console

    # Not a terminal (a log, CI, the GPU check): wide enough that no row of a table wraps.
    return Console(highlight=False, width=None if sys.stdout.isatty() else 140)


def print_data(result: dict) -> None:
    from rich.table import Table

    from dist_seg.bench.data import GPU_DECODE, TOOLKIT

    console = _console()
    cfg = result["config"]
    console.print(_header(result))
    table = Table(title=f"loader throughput: epochs of {cfg['epoch_samples']} samples (the "
                  f"{cfg['train_samples']} train samples repeated) at {cfg['size']} px, batch "
                  f"{cfg['batch']}", title_justify="left")  # fmt: skip
    for col in ("workers", "loader", "samples/s", "per core", "x seed", "per CPU-s", "x seed",
                "toolkit x this", "1st batch s"):  # fmt: skip
        table.add_column(col, justify="right")
    for row in result["results"]:
        for kind, r in row["loaders"].items():
            peer = r.get("toolkit_ratio")  # this toolkit's loader / this peer, same encoding
            table.add_row(str(row["workers"]), kind, f"{r['samples_per_s']:.0f}",
                          f"{r['per_core']:.0f}", f"{r.get('ratio', 1):.2f}",
                          f"{r['samples_per_cpu_s']:.0f}", f"{r.get('ratio_cpu', 1):.2f}",
                          f"{peer:.2f}" if peer else "", f"{r['first_batch_s']:.2f}")  # fmt: skip
        table.add_section()
    console.print(table)
    if "gpu_decode" in result:
        g = result["gpu_decode"]
        console.print(f"jpeg, gpu decode: data.decode=gpu, batches decoded in the main process "
                      f"with {'nvJPEG' if g['backend'] == 'nvjpeg' else 'PIL'} on {g['device']}"
                      f"{' (' + g['note'] + ')' if g['note'] else ''}; against the jpeg row "
                      "(decoded in the workers): "
                      + "; ".join(f"{row['workers']} workers {x['vs_jpeg']:.2f}x samples/s, "
                                  f"{x['vs_jpeg_cpu']:.2f}x per CPU-s"
                                  for row in result["results"]
                                  if (x := row["loaders"].get(GPU_DECODE))))  # fmt: skip
        console.print("data.decode=gpu, one process, us/sample: "
                      + ", ".join(f"{k} {v:.1f}" for k, v in g["us_per_sample"].items()))  # fmt: skip
    b = result["bytes_per_sample"]
    console.print(f"on disk per sample: raw {b['raw'] / 1e3:.0f} KB, jpeg {b['jpeg'] / 1e3:.1f} KB "
                  f"(shards incl. tar headers and json); seed's files {b['seed_files'] / 1e3:.1f} KB")  # fmt: skip
    if result.get("skipped_peers"):
        for name, why in result["skipped_peers"].items():
            console.print(f"peer {name!r} not measured: {why}")
    table = Table(title="streaming pipeline, one process, cumulative us/sample",
                  title_justify="left")  # fmt: skip
    table.add_column("stage")
    encodings = list(result["profile_us_per_sample"])
    for e in encodings:
        table.add_column(e, justify="right")
    for stage in result["profile_us_per_sample"][encodings[0]]:
        table.add_row(
            stage, *(f"{result['profile_us_per_sample'][e][stage]:.1f}" for e in encodings)
        )
    console.print(table)
    met = [e for e, ok in result["goal_met"].items() if ok] or ["none"]
    peers = result["peer_goal_met"]
    console.print(
        f"seed = per-file loader (full-size JPEG + PNG, resize); {', '.join(TOOLKIT)} = this "
        "toolkit's streaming loader; wds = a plain webdataset pipeline (WebDataset -> shuffle "
        "-> decode -> to_tuple -> batched, in a DataLoader) over the same shards; mds = mosaic "
        "streaming over the same samples in MDS format.\n"
        "samples/s over whole epochs, worker start included; per core = samples/s / max(1, "
        "workers) (main process not counted); per CPU-s = samples per CPU second of all the "
        "loader's processes (main + workers: insensitive to other load); best of the rounds; "
        "x seed = ratio to the seed-style loader at the same worker count; toolkit x this = "
        "the toolkit's loader per core / this peer's per core, same encoding and workers. "
        "Flips are in no loader (dist_seg flips on the device).\n"
        f"goal {result['goal_ratio']:g}x the seed per core at every worker count met by: "
        f"{', '.join(met)}\n"
        f"goal {result['peer_goal_ratio']:g}x each peer per core at "
        f"{', '.join(map(str, result['peer_goal_workers']))} workers: "
        + "; ".join(f"{k} {'met' if ok else 'NOT met'}" for k, ok in peers.items())
    )


def print_train(result: dict) -> None:
    from rich.table import Table

    console = _console()
    cfg = result["config"]
    console.print(_header(result))
    table = Table(title=f"{cfg['model']} width {cfg['width']:g} at {cfg['size']} px, batch "
                  f"{cfg['batch']}, {cfg['steps']} timed steps after {cfg['warmup']}, "
                  f"on {cfg['device']}", title_justify="left")  # fmt: skip
    for col in ("", "ms/step", "ms/image", "images/s", "TFLOP/s", "MFU", "peak GiB", "x seed",
                "x bare", "worst round", "CPU ms/step", "warmup s"):  # fmt: skip
        table.add_column(col, justify="right")
    seed_s = result["variants"]["seed"]["step_s"]
    bare_s = result["variants"]["bare"]["step_s"]
    for key, v in result["variants"].items():
        table.add_row(key, f"{1e3 * v['step_s']:.1f}", f"{v['ms_per_image']:.1f}",
                      f"{v['images_per_s']:.1f}", f"{v['tflops']:.3f}",
                      f"{100 * v['mfu']:.1f}%" if v["mfu"] is not None else "-",
                      f"{v['peak_mem_gib']:.2f}" if v["peak_mem_gib"] is not None else "-",
                      f"{seed_s / v['step_s']:.2f}", f"{bare_s / v['step_s']:.2f}",
                      f"{max(v['rounds_step_s']) / v['step_s']:.2f}x",
                      f"{1e3 * v['cpu_step_s']:.1f}",
                      f"{v['warmup_s']:.1f}" if "warmup_s" in v else "-")  # fmt: skip
    console.print(table)
    layout = "channels-last" if cfg["channels_last"] else "contiguous"
    console.print(
        f"seed = fp32, contiguous, BCEWithLogitsLoss, preloaded batch; bare = {cfg['precision']}, "
        f"{layout}{', compiled' if cfg['compile'] else ''}, dist_seg's loss, preloaded batch"
        + (f"; trainer = Trainer.train_one_epoch on the streaming loader ({cfg['workers']} "
           "workers), same set-up as bare" if "trainer" in result["variants"] else "")
        + f".\nFLOPs per image (fwd + bwd, FlopCounterMode): {result['flops_per_image'] / 1e9:.3g} G"
        + (f"; MFU against {result['peak_tflops']:g} TFLOP/s" if result["peak_tflops"] else "")
    )  # fmt: skip
    if "trainer_overhead_pct" in result:
        ok = "met" if result["overhead_goal_met"] else "NOT met"
        console.print(f"real trainer vs bare step: {result['trainer_overhead_pct']:+.1f}% wall "
                      f"(goal <= {result['overhead_goal_pct']:g}%: {ok}); "
                      f"{result['trainer_overhead_cpu_pct']:+.1f}% CPU time of the main process")  # fmt: skip


def print_max_batch(result: dict) -> None:
    console = _console()
    cfg = result["config"]
    console.print(_header(result))
    for t in result["tried"]:
        mem = f"{t['peak_mem_gib']:.1f} GiB" if t["peak_mem_gib"] is not None else "-"
        console.print(f"  batch {t['batch']:>5}: {'fits' if t['fits'] else 'out of memory'}"
                      f" ({mem}, {t['seconds']:.1f} s)")  # fmt: skip
    capped = (" (the --max-batch-limit: larger was not tried)" if result["capped"] else
              f" (within {result['within']:.0%}: the smallest that did not fit is at most that much larger)")  # fmt: skip
    console.print(f"largest batch of {cfg['model']} width {cfg['width']:g} at {cfg['size']} px "
                  f"({cfg['precision']}, {'channels-last' if cfg['channels_last'] else 'contiguous'}) "
                  f"that fits on {cfg['device']}: {result['max_batch']}{capped}")  # fmt: skip
