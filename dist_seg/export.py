"""`dist-seg export`: a checkpoint as ONNX or TorchScript, any batch and image size, checked.

    dist-seg export --checkpoint runs/unet/best.pt --format onnx --out unet.onnx

writes ``unet.onnx`` and ``unet.onnx.json``. The exported model takes float32 RGB images in
[0, 1], shape [B, 3, H, W] with any B, H and W the PyTorch model takes, and returns logits
[B, 1, H, W] (ImageNet normalization, for a run that started from ImageNet weights, is
inside it). Its metadata (ONNX ``metadata_props``, TorchScript extra file ``dist_seg.json``)
holds the model name, width, training image size (``image_size``: the side, or "HxW" when
not square; ``image_height``, ``image_width``) and aspect policy (``aspect``: stretch |
pad), so ``load_exported`` and ``exported_size`` give ``predict`` what it needs without the
checkpoint.

How: both formats trace the model (``torch.jit.trace``; ``torch.onnx.export`` with
``dynamo=False``, whose ``dynamic_axes`` free batch, height and width, and which needs only
onnx, not onnxscript). A trace records one side of every Python ``if``: ResNet34-UNet's
decoder resizes its upsampled map to the skip's size only when the two differ. So it is
traced at a side of 34 (= 2 mod 32), where every decoder level resizes; at sizes where they
already match, that bilinear resize (``align_corners=True``, same size) is an exact
identity. UNet has no such branch (its size check, which a trace drops, only raises).

The file is written only after it is checked: it is run (onnxruntime on the CPU, or the
TorchScript interpreter) and compared with the PyTorch model on

- random images at the training size H x W (batch 1) and at (H + 32) x (W + 16) (batch 2):
  ``checks``, ``max_abs_diff``;
- real-layout images: the first ``REAL_IMAGES`` readable images of the test split of a
  Pets root (``--check-data DIR``; without it, a synthetic twin made by
  ``dist_seg.data.synth`` in a temporary folder), read by ``pets.load_sample`` and prepared
  as ``predict`` prepares them (``sizes.fit_pair`` to the training size under the training
  aspect policy, float in [0, 1]): all of them at the training size, and the first one also
  32 px larger each way (``checks_real``,
  ``max_abs_diff_real``, ``check_data``).

A max absolute logit difference above ``TOLERANCE`` on either is a UserError, and so is a
``--check-data`` that is not a Pets root; nothing is written then. ``FILE.json`` records the
sizes and images checked and the differences.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import warnings
import zipfile
from itertools import islice
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from dist_seg.checkpoint import model_from_checkpoint
from dist_seg.data.pets import iter_split
from dist_seg.data.sizes import fit_pair, format_size, parse_size, trained_aspect
from dist_seg.data.synth import make_synthetic
from dist_seg.errors import DataError, UserError
from dist_seg.models.pretrained import normalize_imagenet, uses_imagenet_norm

FORMATS = ("onnx", "torchscript")
TOLERANCE = 1e-3  # max absolute logit difference, exported vs PyTorch
OPSET = 17
TRACE_SIDE = {"unet": 32, "resnet34_unet": 34}  # see the module docstring
META_KEY = "dist_seg"  # ONNX metadata_props key (JSON); TorchScript extra file META_KEY.json
INSTALL_HINT = 'pip install -e ".[export]"'
REAL_IMAGES = 4  # real-layout check: the first readable images of the test split
SYNTH_IMAGES, SYNTH_SEED = 8, 0  # without --check-data: 4 test images (PNG RGB/RGBA, JPEG)


def add_parser(subparsers, help_text: str) -> None:
    p = subparsers.add_parser("export", help=help_text)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--out", required=True, help="file to write; FILE.json gets the check report")
    p.add_argument(
        "--check-data",
        metavar="DIR",
        help="an Oxford-IIIT Pet root whose test images the export is also checked on "
        "(default: a few synthetic ones)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    report = export_checkpoint(args.checkpoint, args.format, args.out, args.check_data)
    shapes = ", ".join("x".join(map(str, c["shape"])) for c in report["checks"])
    print(
        f"exported {report['model']} as {report['format']} to {args.out}: max |logit diff| "
        f"{report['max_abs_diff']:.2e} vs PyTorch on random {shapes}; "
        f"{report['max_abs_diff_real']:.2e} on {len(report['checks_real'][0]['images'])} "
        f"real-layout images ({report['check_data']}) (report: {args.out}.json)"
    )
    return 0


def export_checkpoint(
    checkpoint: str | Path, fmt: str, out: str | Path, check_data: str | Path | None = None
) -> dict:
    """Export, check, then write ``out`` and ``out.json`` (atomically); returns the report.
    ``check_data``: a Pets root for the real-layout check (None: synthetic images)."""
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if fmt == "onnx":
        _import_onnx()
    out = Path(out)
    model, cfg, _ = model_from_checkpoint(checkpoint)
    if uses_imagenet_norm(cfg):
        model = _ImageNetInput(model)
    model = model.float().eval()  # after wrapping: the ONNX exporter restores the wrapper's mode
    # (h, w) trained at; 0: the pack's own size, which older checkpoints did not record
    size = parse_size(cfg.data.size or 256, "the checkpoint's data.size")
    aspect = trained_aspect(cfg)
    # before any work: a bad DIR fails fast
    source, real = _real_layout_inputs(check_data, size, aspect)
    meta = {
        "model": cfg.model.name,
        "width": cfg.model.width,
        "stem_pool": cfg.model.stem_pool,
        "image_size": cfg.data.size,
        "image_height": size[0] if cfg.data.size else 0,
        "image_width": size[1] if cfg.data.size else 0,
        "aspect": aspect,
        "imagenet_norm": uses_imagenet_norm(cfg),
        "input": "float32 RGB in [0, 1], [B, 3, H, W]",
        "output": "logits [B, 1, H, W]",
    }
    side = TRACE_SIDE[cfg.model.name]
    example = torch.rand(1, 3, side, side, generator=torch.Generator().manual_seed(0))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        with warnings.catch_warnings():  # TracerWarnings about the branches explained above
            warnings.simplefilter("ignore")
            if fmt == "onnx":
                _export_onnx(model, example, tmp, meta)
            else:
                _export_torchscript(model, example, tmp, meta)
        exported = ExportedModel(tmp)
        g = torch.Generator().manual_seed(1)
        shapes = [(1, 3, *size), (2, 3, size[0] + 32, size[1] + 16)]
        checks = _check(model, exported, [torch.rand(s, generator=g) for s in shapes])
        diffs = _check(model, exported, [images for _, images in real])
        checks_real = [
            {"shape": c["shape"], "images": names, "max_abs_diff": c["max_abs_diff"]}
            for (names, _), c in zip(real, diffs)
        ]
        report = {
            **meta,
            "format": fmt,
            "checkpoint": str(checkpoint),
            "traced_at": list(example.shape),
            "checks": checks,
            "max_abs_diff": max(c["max_abs_diff"] for c in checks),  # random images
            "check_data": source,
            "checks_real": checks_real,
            "max_abs_diff_real": max(c["max_abs_diff"] for c in checks_real),
            "tolerance": TOLERANCE,
            "torch": torch.__version__,
            **({"opset": OPSET} if fmt == "onnx" else {}),
        }
        for what, found in (("random", checks), (f"real-layout ({source})", checks_real)):
            diff = max(c["max_abs_diff"] for c in found)
            if not diff <= TOLERANCE:  # also catches NaN
                raise UserError(
                    f"the {fmt} export of {checkpoint} differs from the PyTorch model by "
                    f"{diff:.3g} (> {TOLERANCE}) on {what} images {found}; nothing written"
                )
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    report_path = out.with_name(f"{out.name}.json")
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    return report


class _ImageNetInput(nn.Module):
    """``model(normalize_imagenet(x))``: the exported file takes [0, 1] images like predict."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(normalize_imagenet(x))


def _export_onnx(model: nn.Module, example: Tensor, path: Path, meta: dict) -> None:
    onnx = _import_onnx()
    axes = {0: "batch", 2: "height", 3: "width"}
    torch.onnx.export(
        model,
        (example,),
        str(path),
        dynamo=False,
        input_names=["images"],
        output_names=["logits"],
        dynamic_axes={"images": axes, "logits": axes},
        opset_version=OPSET,
    )
    proto = onnx.load(str(path))
    props = {
        META_KEY: json.dumps(meta),
        "image_size": str(meta["image_size"]),
        "model": meta["model"],
    }
    for key, value in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))


def _export_torchscript(model: nn.Module, example: Tensor, path: Path, meta: dict) -> None:
    traced = torch.jit.trace(model, example, check_trace=False)
    torch.jit.save(traced, str(path), _extra_files={f"{META_KEY}.json": json.dumps(meta)})


def _real_layout_inputs(
    check_data: str | Path | None, size: int | tuple[int, int], aspect: str = "stretch"
) -> tuple[str, list]:
    """(source, [(names, images [B, 3, H, W])]): the first REAL_IMAGES readable test images
    of ``check_data`` (a Pets root) or of a synthetic set, as ``predict_mask`` feeds them to
    an exported model (and, normalized, to the PyTorch one): fitted to ``size`` (h, w) under
    ``aspect``, float in [0, 1]; the first image also 32 px larger each way."""
    size = parse_size(size, "the checkpoint's data.size")
    if check_data is None:
        source = f"synthetic: dist_seg.data.synth, {SYNTH_IMAGES} images, seed {SYNTH_SEED}"
        with tempfile.TemporaryDirectory(prefix="dist-seg-export-") as tmp:
            make_synthetic(Path(tmp), num_images=SYNTH_IMAGES, seed=SYNTH_SEED)
            samples = list(islice(iter_split(Path(tmp), "test", skip_bad=True), REAL_IMAGES))
    else:
        source = str(check_data)
        try:
            samples = list(islice(iter_split(Path(check_data), "test", skip_bad=True), REAL_IMAGES))
        except DataError as e:
            raise UserError(f"--check-data {check_data}: {e}") from None
        if not samples:
            raise UserError(f"--check-data {check_data}: no readable image in its test split")

    def batch(hw: tuple[int, int], chosen: list) -> Tensor:  # as predict_mask prepares one
        arrays = [np.array(fit_pair(s.image, None, hw, aspect)[0]) for s in chosen]
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div_(255)

    names = [s.name for s in samples]
    larger = (size[0] + 32, size[1] + 32)
    return source, [(names, batch(size, samples)), (names[:1], batch(larger, samples[:1]))]


@torch.no_grad()
def _check(model: nn.Module, exported: ExportedModel, batches: list[Tensor]) -> list[dict]:
    """[{"shape", "max_abs_diff"}] per batch of images: exported vs PyTorch logits."""
    checks = []
    for images in batches:
        shape = tuple(images.shape)
        try:
            logits = exported(images)
        except Exception as e:  # onnxruntime and the TorchScript interpreter raise their own
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
            last = lines[-1][:200] if lines else type(e).__name__  # TorchScript: the cause
            raise UserError(
                f"the exported {exported.format} model fails on images {list(shape)} ({last}); "
                "nothing written"
            ) from None
        if logits.shape != (shape[0], 1, *shape[2:]):
            raise UserError(
                f"the exported {exported.format} model returns {list(logits.shape)} for images "
                f"{list(shape)}; nothing written"
            )
        diff = (logits - model(images)).abs().max().item()
        checks.append({"shape": list(shape), "max_abs_diff": diff})
    return checks


class ExportedModel:
    """An exported file as a callable: float images [B, 3, H, W] in [0, 1] (numpy array or
    tensor, any device) -> float32 logits tensor [B, 1, H, W] on the CPU.

    ``format`` is "onnx" (run by onnxruntime on the CPU) or "torchscript"; ``meta`` is the
    metadata export wrote (``image_size``: the training side or "HxW", 0 = images were not
    resized). ``size`` is that as (height, width) and ``aspect`` the policy images were
    fitted with (stretch for files exported before it was recorded).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.format = _format_of(self.path)
        if self.format == "onnx":
            self._session = _onnx_session(self.path)
            text = self._session.get_modelmeta().custom_metadata_map.get(META_KEY)
            self.meta = _parse_meta(self.path, text)
        else:
            self.meta = _parse_meta(self.path, _torchscript_meta(self.path))
            with warnings.catch_warnings():  # torch.jit.load's DeprecationWarning
                warnings.simplefilter("ignore", DeprecationWarning)
                self._module = torch.jit.load(str(self.path), map_location="cpu").eval()
        self.size = parse_size(self.meta["image_size"], f"{self.path} image_size")
        self.image_size: int | str = format_size(self.size)
        self.aspect: str = self.meta.get("aspect", "stretch")

    def __call__(self, images: np.ndarray | Tensor) -> Tensor:
        if isinstance(images, Tensor):
            images = images.detach().to("cpu", torch.float32)
        else:
            images = torch.from_numpy(np.asarray(images, dtype=np.float32))
        if self.format == "onnx":
            (logits,) = self._session.run(None, {"images": images.contiguous().numpy()})
            return torch.from_numpy(logits)
        with torch.no_grad():
            return self._module(images)


def load_exported(path: str | Path) -> ExportedModel:
    """The file ``dist-seg export`` wrote, ready to call on images (see ExportedModel)."""
    return ExportedModel(path)


def exported_size(path: str | Path) -> int | str:
    """The training image size stored in an exported file: the side, or "HxW" when not
    square (0 = the model saw images unresized)."""
    return read_metadata(path)["image_size"]


def read_metadata(path: str | Path) -> dict:
    """The metadata dict ``dist-seg export`` stored inside the file (not the FILE.json)."""
    path = Path(path)
    if _format_of(path) == "onnx":
        text = _onnx_session(path).get_modelmeta().custom_metadata_map.get(META_KEY)
    else:
        text = _torchscript_meta(path)
    return _parse_meta(path, text)


def _torchscript_meta(path: Path) -> str | None:
    with zipfile.ZipFile(path) as archive:
        names = [n for n in archive.namelist() if n.endswith(f"/extra/{META_KEY}.json")]
        return archive.read(names[0]).decode() if names else None


def _onnx_session(path: Path):
    ort = _import_onnxruntime()
    try:
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own Fail/InvalidProtobuf types
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise UserError(
            f"{path} is neither a TorchScript archive nor a readable ONNX model ({first})"
        ) from None


def _parse_meta(path: Path, text: str | None) -> dict:
    if text is None:
        raise UserError(f"{path} has no dist_seg metadata: export it with `dist-seg export`")
    return json.loads(text)


def _format_of(path: Path) -> str:
    if not path.is_file():
        raise UserError(f"exported model {path} not found")
    return "torchscript" if zipfile.is_zipfile(path) else "onnx"


def _import_onnx():
    try:
        import onnx
    except ImportError:
        raise UserError(f"ONNX export needs onnx and onnxruntime: {INSTALL_HINT}") from None
    _import_onnxruntime()
    return onnx


def _import_onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise UserError(f"running ONNX models needs onnxruntime: {INSTALL_HINT}") from None
    return onnxruntime
