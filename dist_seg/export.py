"""`dist-seg export`: a checkpoint as ONNX or TorchScript, any batch and image size, checked.

    dist-seg export --checkpoint runs/unet/best.pt --format onnx --out unet.onnx

writes ``unet.onnx`` and ``unet.onnx.json``. The exported model takes float32 RGB images in
[0, 1], shape [B, 3, H, W] with any B, H and W the PyTorch model takes, and returns logits
[B, 1, H, W] (ImageNet normalization, for a run that started from ImageNet weights, is
inside it). Its metadata (ONNX ``metadata_props``, TorchScript extra file ``dist_seg.json``)
holds the model name, width and training image size, so ``load_exported`` and
``exported_size`` give ``predict`` what it needs without the checkpoint.

How: both formats trace the model (``torch.jit.trace``; ``torch.onnx.export`` with
``dynamo=False``, whose ``dynamic_axes`` free batch, height and width, and which needs only
onnx, not onnxscript). A trace records one side of every Python ``if``: ResNet34-UNet's
decoder resizes its upsampled map to the skip's size only when the two differ. So it is
traced at a side of 34 (= 2 mod 32), where every decoder level resizes; at sizes where they
already match, that bilinear resize (``align_corners=True``, same size) is an exact
identity. UNet has no such branch (its size check, which a trace drops, only raises).

The file is written only after it is checked: it is run (onnxruntime on the CPU, or the
TorchScript interpreter) on random images at the training size (batch 1) and at a second
size (batch 2) and compared with the PyTorch model; a max absolute logit difference above
``TOLERANCE`` is a UserError. ``FILE.json`` records the sizes checked and the differences.
"""

from __future__ import annotations

import argparse
import json
import os
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from dist_seg.checkpoint import model_from_checkpoint
from dist_seg.errors import UserError
from dist_seg.models.pretrained import normalize_imagenet, uses_imagenet_norm

FORMATS = ("onnx", "torchscript")
TOLERANCE = 1e-3  # max absolute logit difference, exported vs PyTorch
OPSET = 17
TRACE_SIDE = {"unet": 32, "resnet34_unet": 34}  # see the module docstring
META_KEY = "dist_seg"  # ONNX metadata_props key (JSON); TorchScript extra file META_KEY.json
INSTALL_HINT = 'pip install -e ".[export]"'


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "export", help="a checkpoint as ONNX or TorchScript (dynamic batch and size), checked"
    )
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--out", required=True, help="file to write; FILE.json gets the check report")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    report = export_checkpoint(args.checkpoint, args.format, args.out)
    shapes = ", ".join("x".join(map(str, c["shape"])) for c in report["checks"])
    print(
        f"exported {report['model']} as {report['format']} to {args.out}: max |logit diff| "
        f"{report['max_abs_diff']:.2e} vs PyTorch on {shapes} (report: {args.out}.json)"
    )
    return 0


def export_checkpoint(checkpoint: str | Path, fmt: str, out: str | Path) -> dict:
    """Export, check, then write ``out`` and ``out.json`` (atomically); returns the report."""
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if fmt == "onnx":
        _import_onnx()
    out = Path(out)
    model, cfg, _ = model_from_checkpoint(checkpoint)
    if uses_imagenet_norm(cfg):
        model = _ImageNetInput(model)
    model = model.float().eval()  # after wrapping: the ONNX exporter restores the wrapper's mode
    size = cfg.data.size or 256  # 0 = the pack's own size, not in the checkpoint
    meta = {
        "model": cfg.model.name,
        "width": cfg.model.width,
        "stem_pool": cfg.model.stem_pool,
        "image_size": cfg.data.size,
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
        shapes = [(1, 3, size, size), (2, 3, size + 32, size + 16)]
        checks = _check(model, ExportedModel(tmp), shapes)
        report = {
            **meta,
            "format": fmt,
            "checkpoint": str(checkpoint),
            "traced_at": list(example.shape),
            "checks": checks,
            "max_abs_diff": max(c["max_abs_diff"] for c in checks),
            "tolerance": TOLERANCE,
            "torch": torch.__version__,
            **({"opset": OPSET} if fmt == "onnx" else {}),
        }
        if not report["max_abs_diff"] <= TOLERANCE:  # also catches NaN
            raise UserError(
                f"the {fmt} export of {checkpoint} differs from the PyTorch model by "
                f"{report['max_abs_diff']:.3g} (> {TOLERANCE}) on {checks}; nothing written"
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


@torch.no_grad()
def _check(model: nn.Module, exported: ExportedModel, shapes: list[tuple[int, ...]]) -> list:
    g = torch.Generator().manual_seed(1)
    checks = []
    for shape in shapes:
        images = torch.rand(shape, generator=g)
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
    metadata export wrote (``image_size``: the training side, 0 = images were not resized).
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
        self.image_size: int = int(self.meta["image_size"])

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


def exported_size(path: str | Path) -> int:
    """The training image side stored in an exported file (0 = the model saw images unresized)."""
    return int(read_metadata(path)["image_size"])


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
