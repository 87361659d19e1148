"""`dist-seg` (and `python -m dist_seg`): one entry point, one subcommand per job."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

from dist_seg.errors import UserError

# Commands in their own modules: name -> (module, help). A module is imported only when its
# command is the one run (or for a parser of every command): bench and export import torch,
# compare matplotlib, which would add seconds to every other command.
PLUGINS: dict[str, tuple[str, str]] = {
    "compare": ("dist_seg.compare", "overlay runs' loss and Dice curves and tabulate their best epochs"),
    "bench": ("dist_seg.bench", "speed: streaming loader vs per-file and webdataset loaders; train step vs seed step; max batch"),
    "export": ("dist_seg.export", "a checkpoint as ONNX or TorchScript (dynamic batch and size), checked"),
}  # fmt: skip


def add_plugin(sub, name: str) -> None:
    module, help_text = PLUGINS[name]
    importlib.import_module(module).add_parser(sub, help_text)  # sets func=run


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a model (also under accelerate launch / SLURM)")
    p.add_argument("--config", help="YAML run config (see configs/)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config value, type-checked (repeatable)",
    )
    p.add_argument("--resume", help="'auto' (the run's own last.pt, if any) or a checkpoint path")
    # The seed's own command line, accepted unchanged beside the toolkit's spellings.
    p.add_argument("--model", help="unet | resnet34_unet (seed: resnet34)")
    p.add_argument(
        "--data_path",
        "--data-path",
        dest="data_path",
        help="raw Oxford-IIIT Pet root (packed once into shards/) or a shard directory",
    )
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch_size", "--batch-size", dest="batch_size", type=int, help="per process")
    p.add_argument("--learning-rate", "--learning_rate", "--lr", dest="lr", type=float)
    p.add_argument("--flip", nargs="?", const="yes", help="flip augmentation: --flip [Yes|No]")
    p.add_argument("--no-flip", dest="flip", action="store_const", const="no")
    p.add_argument(
        "--name", help="run name: runs/NAME (default: SLURM job id, else the config's name)"
    )


def _legacy_overrides(args) -> dict:
    """The seed's flags as a config override dict."""
    over: dict = {}
    if args.model:
        over.setdefault("model", {})["name"] = (
            "resnet34_unet" if args.model == "resnet34" else args.model
        )
    if args.data_path:
        path = Path(args.data_path)
        if (path / "manifest.json").exists() or "://" in args.data_path:
            over.setdefault("data", {})["shards"] = args.data_path
        else:
            size = 256
            over.setdefault("data", {}).update(
                root=args.data_path, shards=f"shards/{path.name}-{size}"
            )
    if args.epochs is not None:
        over.setdefault("train", {})["epochs"] = args.epochs
    if args.batch_size is not None:
        over.setdefault("train", {})["batch_size"] = args.batch_size
    if args.lr is not None:
        over.setdefault("optim", {})["lr"] = args.lr
    if args.flip is not None:
        if args.flip.lower() not in ("yes", "no", "true", "false"):
            raise UserError(f"--flip {args.flip!r}: expected Yes or No")
        over.setdefault("data", {})["flip"] = args.flip.lower() in ("yes", "true")
    if args.name:
        over.setdefault("run", {})["name"] = args.name
    return over


def _add_mask_policy(p) -> None:
    p.add_argument(
        "--foreground-values",
        help="mask policy 'values': these stored values are foreground (e.g. 255 or 1,2); "
        "default policy: any non-zero value is foreground",
    )
    p.add_argument(
        "--mask-threshold",
        type=float,
        help="mask policy 'threshold': values >= it are foreground (lossy masks: 128)",
    )
    p.add_argument("--ignore-value", type=int, help="a stored mask value that is not scored")


def _add_aspect(p, when: str = "") -> None:
    p.add_argument(
        "--aspect",
        default="stretch",
        choices=("stretch", "pad"),
        help=f"how images are fitted to the size{f' ({when})' if when else ''}: stretch "
        "(the seed's resize) or pad (letterbox: keep the aspect ratio, pad images with 0 and "
        "masks with the ignore value 255)",
    )


def _mask_policy(args):
    """The MaskPolicy that --foreground-values / --mask-threshold / --ignore-value name."""
    from dist_seg.data.masks import MaskPolicy

    if args.foreground_values and args.mask_threshold is not None:
        raise UserError("pack: --foreground-values or --mask-threshold, not both")
    if args.foreground_values:
        try:
            values = tuple(int(v) for v in args.foreground_values.split(","))
        except ValueError:
            raise UserError(f"--foreground-values {args.foreground_values!r}: integers") from None
        policy = MaskPolicy("values", values=values, ignore=args.ignore_value)
    elif args.mask_threshold is not None:
        policy = MaskPolicy("threshold", threshold=args.mask_threshold, ignore=args.ignore_value)
    else:
        policy = MaskPolicy("nonzero", ignore=args.ignore_value)
    return policy


def _generic_options(args) -> dict:
    """pack_generic's keyword arguments from `pack --images/--masks` flags."""
    from dist_seg.data.generic import parse_fractions

    if not (args.images and args.masks):
        raise UserError("pack: --images and --masks go together")
    policy = _mask_policy(args)
    lists = {}
    for item in args.split_list:
        split, eq, path = item.partition("=")
        if not eq or not path:
            raise UserError(f"--split-list {item!r}: expected SPLIT=FILE, like train=train.txt")
        lists[split] = Path(path)
    return dict(match=args.match, policy=policy, split_lists=lists or None,
                fractions=parse_fractions(args.split_fractions))  # fmt: skip


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The whole parser; given ``argv``, plugin commands other than the one chosen are
    placeholders (their help only), and their modules are not imported."""
    chosen = next((a for a in argv if not a.startswith("-")), None) if argv is not None else None
    parser = argparse.ArgumentParser(prog="dist-seg", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "synth", help="write a synthetic Oxford-IIIT Pet twin (same layout and oddities)"
    )
    p.add_argument("--root", required=True)
    p.add_argument(
        "--layout",
        default="pets",
        choices=("pets", "generic"),
        help="pets: the Oxford-IIIT Pet layout; generic: images/ + masks/<stem>_mask.png|gif "
        "(JPEG images, 0/255 PNG and palette GIF masks, three broken pairs)",
    )
    p.add_argument("--num-images", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing set in --root")

    p = sub.add_parser("download", help="fetch and verify the two official archives")
    p.add_argument("--root", required=True)
    p.add_argument("--base-url", help="a mirror holding images.tar.gz and annotations.tar.gz")

    p = sub.add_parser(
        "pack",
        help="pack a data set into WebDataset shards + manifest.json",
        description="Either --root (an Oxford-IIIT Pet root) or --images DIR --masks DIR "
        "(any binary segmentation set; README 'Your own data').",
    )
    p.add_argument("--root", help="an Oxford-IIIT Pet root (images/, annotations/)")
    p.add_argument("--images", help="a folder of images (or of train/ val/ test/ folders)")
    p.add_argument("--masks", help="the folder of their masks, laid out alike")
    p.add_argument(
        "--match",
        default="{stem}",
        help="a mask's name (no extension) from its image's: '{stem}' (default, same name), "
        "'{stem}_mask' (Carvana), '{stem}_segmentation' (ISIC)",
    )
    _add_mask_policy(p)
    p.add_argument(
        "--split-list",
        action="append",
        default=[],
        metavar="SPLIT=FILE",
        help="a list file of one split (one name per line); repeat per split",
    )
    p.add_argument(
        "--split-fractions",
        help="train,val,test fractions of the hash split (default 0.8,0.1,0.1)",
    )
    p.add_argument("--out", required=True)
    p.add_argument(
        "--size",
        default="256",
        help="a side (256) or HxW, height first (192x320), multiples of 16; 0 keeps originals",
    )
    _add_aspect(p)
    p.add_argument("--shard-size", type=int, default=256, help="samples per shard")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--encoding", default="raw", choices=("raw", "jpeg"))
    p.add_argument("--skip-bad", action="store_true", help="skip and count unreadable samples")

    p = sub.add_parser(
        "index",
        help="a manifest for WebDataset shards written by others (train on them as they are)",
    )
    p.add_argument(
        "--shards", required=True, help="a folder of .tar shards; the manifest goes there"
    )
    p.add_argument("--image-key", default="jpg", help="the image member's extension (jpg)")
    p.add_argument("--mask-key", default="png", help="the mask member's extension (png)")
    p.add_argument("--meta-key", help="a json member to require in every sample (optional)")
    p.add_argument(
        "--split-by-prefix",
        action="store_true",
        help="the split is each shard's name up to its first - or _ (train-000000.tar)",
    )
    p.add_argument(
        "--split", default="train", help="the split of every shard, without --split-by-prefix"
    )
    _add_mask_policy(p)
    _add_aspect(p, when="as they are read, to data.size")

    _add_train(sub)

    p = sub.add_parser("evaluate", help="metrics.json (+ masks) of a checkpoint on one split")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--shards", required=True)
    p.add_argument("--split", default="test")
    p.add_argument("--out", help="where metrics.json goes (default: the checkpoint's directory)")
    p.add_argument("--save-masks", help="directory for predicted masks and overlays")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--tta", action="store_true", help="average the logits over flips")
    p.add_argument(
        "--original-size",
        action="store_true",
        help="also score at each image's original size (logits upsampled, original masks)",
    )

    p = sub.add_parser("predict", help="masks for any images, at their original resolution")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--checkpoint")
    which.add_argument("--exported", help="an ONNX or TorchScript file from `dist-seg export`")
    p.add_argument("--tta", action="store_true", help="average the logits over flips")
    p.add_argument("--input", required=True, help="an image or a directory of images")
    p.add_argument("--out", required=True)

    for name, (_, help_text) in PLUGINS.items():
        if argv is None or name == chosen:
            add_plugin(sub, name)
        else:
            sub.add_parser(name, help=help_text)

    p = sub.add_parser("demo", help="synthesize, pack, train a small model on CPU, evaluate")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument(
        "--data",
        default="pets",
        choices=("pets", "generic"),
        help="pets: a synthetic Oxford-IIIT Pet; generic: a synthetic images + masks folder",
    )
    return parser


def run(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    if getattr(args, "func", None) is not None:
        return args.func(args) or 0
    if args.command == "synth":
        from dist_seg.data.synth import make_synthetic, make_synthetic_generic

        make = make_synthetic_generic if args.layout == "generic" else make_synthetic
        summary = make(
            Path(args.root), num_images=args.num_images, seed=args.seed, overwrite=args.overwrite
        )
        print(f"synthetic data set in {args.root}: {summary}")
    elif args.command == "download":
        from dist_seg.data.download import download

        download(Path(args.root), base_url=args.base_url)
    elif args.command == "pack":
        from rich.progress import Progress

        from dist_seg.data.pack import pack, pack_generic

        options = dict(size=args.size, shard_size=args.shard_size, workers=args.workers,
                       encoding=args.encoding, skip_bad=args.skip_bad, aspect=args.aspect)  # fmt: skip
        if bool(args.root) == bool(args.images or args.masks):
            raise UserError("pack: give either --root (Oxford-IIIT Pet) or --images and --masks")
        with Progress() as progress:
            if args.root:
                m = pack(Path(args.root), Path(args.out), progress=progress, **options)
            else:
                m = pack_generic(
                    Path(args.images or ""), Path(args.masks or ""), Path(args.out),
                    progress=progress, **_generic_options(args), **options,
                )  # fmt: skip
        counts = {k: v["num_samples"] for k, v in m["splits"].items()}
        skipped = len(m["source"]["skipped"])
        fit = f", {m['aspect']}" if m["image_size"] else ""  # stretch | pad
        print(
            f"packed {counts} into {args.out} ({m['encoding']}, {m['image_size'] or 'original'} px"
            f"{fit}{f', {skipped} skipped' if skipped else ''})"
        )
    elif args.command == "index":
        from dist_seg.data.index import index

        m = index(Path(args.shards), image_key=args.image_key, mask_key=args.mask_key,
                  meta_key=args.meta_key, policy=_mask_policy(args),
                  split_by_prefix=args.split_by_prefix, split=args.split,
                  aspect=args.aspect)  # fmt: skip
        counts = {k: v["num_samples"] for k, v in m["splits"].items()}
        print(f"indexed {counts} in {args.shards}/manifest.json (image {args.image_key!r}, "
              f"mask {args.mask_key!r}, masks: {_mask_policy(args).describe()})")  # fmt: skip
    elif args.command == "train":
        from dist_seg.config import load_config, parse_set
        from dist_seg.train import EXIT_PREEMPTED, train

        cfg = load_config(args.config, [_legacy_overrides(args), parse_set(args.overrides)])
        if train(cfg, resume=args.resume)["preempted"]:
            return EXIT_PREEMPTED
    elif args.command == "evaluate":
        from dist_seg.evaluate import run_evaluate

        run_evaluate(
            args.checkpoint,
            args.shards,
            args.split,
            args.out,
            args.save_masks,
            batch_size=args.batch_size,
            num_workers=args.workers,
            tta=args.tta,
            original_size=args.original_size,
        )
    elif args.command == "predict":
        from dist_seg.predict import predict

        predict(args.checkpoint, args.input, args.out, exported=args.exported, tta=args.tta)
    elif args.command == "demo":
        from dist_seg.demo import demo

        demo(Path(args.out), epochs=args.epochs, data_kind=args.data)
    return 0


def _is_main_process() -> bool:
    try:
        from accelerate.state import PartialState

        return not PartialState._shared_state or PartialState().is_main_process
    except Exception:
        return True


def _leave_process_group() -> None:
    """On an error every rank raised alike: leave the process group cleanly, so gloo does
    not abort the interpreter at exit (DESIGN.md section 3) and the exit code stays 2."""
    import gc

    torch = sys.modules.get("torch")
    gc.collect()
    if (
        torch is not None
        and torch.distributed.is_available()
        and torch.distributed.is_initialized()
    ):
        torch.distributed.destroy_process_group()


def error_line(err: BaseException) -> str:
    """One line for the user. An error raised in a DataLoader worker comes back wrapped with
    the worker's traceback; its last line is the original message."""
    text = str(err).strip().splitlines()
    line = text[-1] if text else type(err).__name__
    for prefix in (
        "dist_seg.errors.DataError: ",
        "dist_seg.errors.UserError: ",
        "DataError: ",
        "UserError: ",
    ):
        line = line.removeprefix(prefix)
    return line


def main(argv: list[str] | None = None) -> None:
    try:
        code = run(argv)
    except UserError as e:
        if _is_main_process():
            print(f"dist-seg: error: {error_line(e)}", file=sys.stderr, flush=True)
        _leave_process_group()
        code = 2
    except KeyboardInterrupt:
        print("dist-seg: interrupted", file=sys.stderr, flush=True)
        code = 130
    sys.stdout.flush()
    sys.stderr.flush()
    sys.exit(code)
