"""``data.decode: gpu``: JPEG images decoded per batch in the training process, on the GPU.

With ``data.decode: cpu`` (the default) a loader worker decodes every sample's JPEG and PNG
(about 700 us of CPU a sample at 256 px, BENCHMARKS.md section 1). With ``gpu``:

* The workers (``EncodedReader``) read the tar, decode and resize only the mask (PNG, masks
  stay lossless and are always the workers' work) and hand the image over as it is stored:
  its JPEG bytes, plus the height and width read from its frame header.
* ``EncodedReader.collate`` packs a batch's bytes into one uint8 buffer of
  ``batch x capacity`` (sample i at row i; a power of two at least as long as the
  longest stream this worker has met), so a worker's batches go through the same shared
  ``stream.BatchRing`` buffers as decoded ones: ``image_bytes`` [B, capacity] and
  ``image_info`` [(length, kind, height, width)] take the place of ``image``.
* The training process (``BatchDecoder``, called by ``stream.EpochLoader`` on every batch
  it receives) decodes the batch in one ``torchvision.io.decode_jpeg(list, device="cuda")``
  call (nvJPEG) into the uint8 N x 3 x H x W batch the worker path yields (channels-last in
  memory, like it), on the device. "key", "name", "mask" and "full_mask" pass through.

Resizing. The worker path fits a stored image whose size is not ``data.size`` with PIL
(``sizes.fit_pair``: bilinear, antialiased when shrinking; stretched or letterboxed by
``data.aspect``): packs made at ``data.size`` need none, foreign (``dist-seg index``) or
original-size packs need it for every sample. Here the image is decoded at its stored size
and fitted on the device (``fit_on_device``: ``F.interpolate(bilinear, antialias=True)``,
PIL's filter in float, at most 1 level from PIL's uint8 result over 90 random images and
sizes, up and down; the same letterbox box). Decoding and then resizing on the device keeps
the point of the switch (no pixel work on the host) for exactly the data sets whose images
are large; the mask is fitted in the worker as before (``fit_mask``, exact).

Without CUDA, or without a torchvision that loads (PyPI's does not load against the CPU
torch build: torchvision stays an optional import, used only where it loads), the same
batch path runs with the workers' own decoder in the training process: PIL (libjpeg-turbo)
decode and PIL resize, so its batches are pixel-equal to ``data.decode: cpu``. The loader
says which, in one line at start. nvJPEG's IDCT and chroma upsampling may differ from
libjpeg-turbo's by a level or two; tests/test_gpu.py reports the largest difference.

Not decoded here, and left to the workers as with ``cpu``: shards whose images are not
JPEG members (raw ``.npy`` packs: nothing to decode, said in one line), and, sample by
sample, any image member that is not a JPEG nvJPEG reads (PNG or GIF content under a
``.jpg`` name, CMYK, arithmetic-coded or lossless JPEG, Adobe RGB JPEGs): those arrive as
pixels at the final size (kind ``PIXELS``). Raw shards with ``gpu`` are a notice, not an
error: one config can serve raw and jpeg packs.

Host waits: torchvision synchronises its own decoder stream before ``decode_jpeg`` returns,
so the training process waits for each batch's decode (about what a batch's decode takes on
the device), not for the training kernels queued on the compute stream.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from PIL import Image

from dist_seg.data.codec import IGNORE, Reader, apply_border, decode_member, decode_rgb
from dist_seg.data.sizes import fit_pair, letterbox
from dist_seg.errors import UserError

DECODES = ("cpu", "gpu")
JPEG, PIXELS = 0, 1  # image_info kinds: JPEG bytes to decode; HxWx3 pixels at the final size
MIN_CAPACITY = 4096  # bytes per sample of a worker's first batch buffer
_SAID: set[str] = set()  # lines said already in this process (train and val loaders alike)
_BACKENDS: dict[str, tuple[str, str]] = {}  # device -> (backend, why), probed once


# --- the worker side -------------------------------------------------------------------------
def jpeg_header(data) -> tuple[int, int] | None:
    """(height, width) of a JPEG nvJPEG decodes to RGB as libjpeg-turbo does: 8-bit
    baseline, extended or progressive Huffman, 1 or 3 components, not an Adobe RGB JPEG.
    None for anything else (other content under a .jpg name included)."""
    b = memoryview(data)
    n, i, adobe_rgb = len(b), 2, False
    if n < 4 or b[0] != 0xFF or b[1] != 0xD8:
        return None
    while i + 4 <= n:
        if b[i] != 0xFF:
            return None
        marker = b[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            i += 2
            continue
        length = b[i + 2] << 8 | b[i + 3]
        if marker == 0xEE and bytes(b[i + 4 : i + 9]) == b"Adobe" and i + 15 < n:
            adobe_rgb = b[i + 15] == 0  # APP14 transform 0: RGB (or CMYK) stored as is
        elif 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # a frame header
            if marker > 0xC2 or i + 10 > n or b[i + 4] != 8:  # lossless, arithmetic, 12-bit
                return None
            height, width, components = b[i + 5] << 8 | b[i + 6], b[i + 7] << 8 | b[i + 8], b[i + 9]
            if components == 1 or (components == 3 and not adobe_rgb):
                return (height, width) if height and width else None
            return None
        elif marker in (0xDA, 0xD9):  # a scan or the end before any frame header
            return None
        i += 2 + length
    return None


class EncodedReader:
    """A ``codec.Reader`` that decodes only the mask: one stored sample -> (key, (image
    bytes as uint8, kind, height, width), mask HxW uint8 0/1/255 at the reader's size[,
    original-size mask]). Its mask steps are Reader.labels, then the same fit and border
    (tests/test_decode.py checks both give the same masks, foreign shards included)."""

    def __init__(self, reader: Reader):
        if reader.size is None:
            raise UserError("data.decode=gpu needs a batch size in pixels: set data.size")
        self.reader = reader
        self.capacity = 0  # bytes per sample of this worker's ring buffers; grows, never shrinks

    # what ShardStream and evaluate ask of a reader
    size = property(lambda self: self.reader.size)
    members = property(lambda self: self.reader.members)

    def complete(self, sample: dict) -> bool:
        return self.reader.complete(sample)

    def check_members(self, sample: dict) -> None:
        self.reader.check_members(sample)

    def __call__(self, sample: dict) -> tuple:
        r = self.reader
        data = sample[r.members.image]
        header = jpeg_header(data)
        if header is None:  # not for nvJPEG: the worker path, pixels at the final size
            key, image, *rest = r(sample)
            return (key, (np.ascontiguousarray(image).reshape(-1), PIXELS, *r.size), *rest)
        key = sample["__key__"]
        mask = decode_member(sample[r.members.mask], r.members.mask, gray=True)
        mask, full = r.labels(sample, key, mask, header)
        if header != r.size:
            mask = fit_mask(mask, header, r.size, r.aspect)
        if r.border is not None:
            mask = apply_border(mask, r.border)
        image = (np.frombuffer(data, np.uint8), JPEG, *header)
        return (key, image, mask, full) if r.full else (key, image, mask)

    def collate(self, samples: list[tuple], ring, batch_size: int) -> dict:
        """A batch of encoded samples: ``image_bytes`` uint8 [n, capacity] (sample i in row
        i), ``image_info`` [(length, kind, height, width)], ``mask`` uint8 [n, H, W]. With
        ``ring`` (a worker's stream.BatchRing) both tensors are its shared buffers."""
        n, longest = len(samples), max(len(s[1][0]) for s in samples)
        mask_shape = samples[0][2].shape
        if ring is not None:
            if longest > self.capacity:  # powers of two: a few buffer sizes per worker at most
                self.capacity = max(MIN_CAPACITY, 1 << (longest - 1).bit_length())
            data, masks = ring.next(batch_size, (self.capacity,), mask_shape)
            data, masks = data[:n], masks[:n]
        else:
            data = torch.empty((n, longest), dtype=torch.uint8)
            masks = torch.empty((n, *mask_shape), dtype=torch.uint8)
        rows = data.numpy()
        for i, (_, (stored, _, _, _), *_) in enumerate(samples):
            rows[i, : len(stored)] = stored
        np.stack([s[2] for s in samples], out=masks.numpy())
        batch = {
            "name": [s[0] for s in samples],
            "image_bytes": data,
            "image_info": [(len(s[1][0]), *s[1][1:]) for s in samples],
            "mask": masks,
        }
        if len(samples[0]) > 3:  # original-size masks (evaluate --original-size)
            batch["full_mask"] = [s[3] for s in samples]
        return batch


# --- the training-process side ---------------------------------------------------------------
class BatchDecoder:
    """An encoded batch -> the batch the worker path yields, "image" uint8 [B, 3, H, W]
    (channels-last in memory), decoded with nvJPEG on ``device`` (``backend`` "nvjpeg") or
    with PIL on the CPU ("cpu": pixel-equal to the workers' decode)."""

    def __init__(self, size: tuple[int, int], aspect: str, device: torch.device, backend: str):
        self.size, self.aspect, self.device, self.backend = tuple(size), aspect, device, backend

    def __call__(self, batch: dict) -> dict:
        data, info = batch["image_bytes"], batch["image_info"]
        rest = {k: v for k, v in batch.items() if k not in ("image_bytes", "image_info")}
        if self.backend == "nvjpeg":
            try:
                return {**rest, "image": self._nvjpeg(data, info)}
            except RuntimeError as e:  # a stream the header check passed but nvJPEG refused
                warnings.warn(
                    f"nvJPEG could not decode a batch ({str(e).splitlines()[0]}); decoding "
                    "it on the CPU (PIL)",
                    stacklevel=2,
                )
                return {**rest, "image": self._pil(data, info).to(self.device)}
        return {**rest, "image": self._pil(data, info)}

    def _pil(self, data: torch.Tensor, info: list) -> torch.Tensor:
        h, w = self.size
        out = np.empty((len(info), h, w, 3), dtype=np.uint8)
        rows = data.numpy()
        for i, (length, kind, _, _) in enumerate(info):
            if kind == PIXELS:
                out[i] = rows[i, :length].reshape(h, w, 3)
                continue
            image = decode_rgb(rows[i, :length])  # the workers' decode and fit, exactly
            out[i] = fit_pair(image, None, self.size, self.aspect)[0]
        return torch.from_numpy(out).permute(0, 3, 1, 2)

    def _nvjpeg(self, data: torch.Tensor, info: list) -> torch.Tensor:
        from torchvision.io import ImageReadMode, decode_jpeg

        jpegs = [i for i, (_, kind, _, _) in enumerate(info) if kind == JPEG]
        # One call for the batch: nvJPEG decodes baseline streams as one hardware batch. It
        # has read the host bytes when it returns (torchvision syncs its decoder's stream).
        decoded = decode_jpeg([data[i, : info[i][0]] for i in jpegs], mode=ImageReadMode.RGB,
                              device=self.device) if jpegs else []  # fmt: skip
        if len(jpegs) == len(info) and all(d.shape[1:] == self.size for d in decoded):
            return torch.stack(decoded).contiguous(memory_format=torch.channels_last)
        h, w = self.size
        out = torch.empty((len(info), h, w, 3), dtype=torch.uint8, device=self.device)
        for i, image in zip(jpegs, decoded):
            out[i] = fit_on_device(image, self.size, self.aspect).permute(1, 2, 0)
        for i, (length, kind, _, _) in enumerate(info):
            if kind == PIXELS:
                out[i] = data[i, :length].view(h, w, 3).to(self.device, non_blocking=True)
        return out.permute(0, 3, 1, 2)


def fit_mask(mask: np.ndarray, image_hw: tuple[int, int], size: tuple[int, int], aspect: str):
    """The mask half of ``sizes.fit_pair`` for an image of ``image_hw`` that is not at
    ``size``: nearest, stretched, or letterboxed with IGNORE around it."""
    if aspect == "stretch":
        return resize_array(mask, size, Image.NEAREST)
    top, left, h, w = letterbox(*image_hw, size)
    padded = np.full(size, IGNORE, dtype=mask.dtype)
    padded[top : top + h, left : left + w] = resize_array(mask, (h, w), Image.NEAREST)
    return padded


def resize_array(array: np.ndarray, hw: tuple[int, int], resample) -> np.ndarray:
    if array.shape[:2] == tuple(hw):
        return array
    resized = Image.fromarray(np.ascontiguousarray(array)).resize((hw[1], hw[0]), resample)
    return np.asarray(resized)


def fit_on_device(image: torch.Tensor, size: tuple[int, int], aspect: str) -> torch.Tensor:
    """``sizes.fit_pair``'s image half on the device: uint8 [3, h, w] -> [3, *size], bilinear
    with antialiasing (PIL's filter, in float: at most 1 level from PIL's uint8 result),
    stretched or letterboxed on black; an image of that size as it is."""
    if tuple(image.shape[1:]) == tuple(size):
        return image
    if aspect == "stretch":
        return resize_on_device(image, size)
    top, left, h, w = letterbox(image.shape[1], image.shape[2], size)
    canvas = torch.zeros((3, *size), dtype=torch.uint8, device=image.device)
    canvas[:, top : top + h, left : left + w] = resize_on_device(image, (h, w))
    return canvas


def resize_on_device(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(image.shape[1:]) == tuple(size):
        return image
    x = torch.nn.functional.interpolate(image[None].float(), size=tuple(size), mode="bilinear",
                                        antialias=True, align_corners=False)  # fmt: skip
    return x.round_().clamp_(0, 255).to(torch.uint8)[0]


def choose_backend(device) -> tuple[str, str]:
    """("nvjpeg", "") where torchvision's nvJPEG decode works on ``device``, else ("cpu",
    why not). Probed once per device with a tiny JPEG."""
    device = torch.device(device or "cpu")
    if device.type != "cuda":
        return "cpu", "no CUDA device"
    if str(device) not in _BACKENDS:
        try:  # optional: PyPI's torchvision raises on import against the CPU torch build
            import torchvision
            from torchvision.io import ImageReadMode, decode_jpeg
        except Exception as e:  # ImportError, RuntimeError, OSError ...
            why = "torchvision is not installed" if isinstance(e, ImportError) else (
                f"torchvision does not load ({str(e).splitlines()[0] if str(e) else type(e).__name__})")  # fmt: skip
            _BACKENDS[str(device)] = ("cpu", why)
            return _BACKENDS[str(device)]
        from dist_seg.data.codec import jpeg_bytes

        probe = torch.frombuffer(bytearray(jpeg_bytes(np.zeros((16, 16, 3), np.uint8))), dtype=torch.uint8)  # fmt: skip
        try:
            decode_jpeg([probe], mode=ImageReadMode.RGB, device=device)
            _BACKENDS[str(device)] = ("nvjpeg", f"torchvision {torchvision.__version__}")
        except Exception as e:  # a build without nvJPEG, a driver error
            _BACKENDS[str(device)] = ("cpu", f"torchvision's nvJPEG decode fails ({str(e).splitlines()[0]})")  # fmt: skip
    return _BACKENDS[str(device)]


def say_once(say, line: str) -> None:
    if say is not None and line not in _SAID:
        _SAID.add(line)
        say(line)


def batch_decoding(reader, location: str, device, say=print) -> tuple[object, BatchDecoder | None]:
    """(the reader the workers use, the decoder the training process applies to each batch:
    None to leave decoding in the workers) for ``data.decode: gpu``, and one line saying
    which path it is (once per process: the train and val loaders say the same)."""
    image = reader.members.image
    if not image.lower().endswith(("jpg", "jpeg")):
        say_once(say, f"data.decode=gpu: {location} stores images as .{image.rsplit('.', 1)[-1]}, "
                 "not JPEG: nothing to decode, the loader workers read them as with data.decode=cpu")  # fmt: skip
        return reader, None
    device = torch.device(device or "cpu")
    backend, why = choose_backend(device)
    if backend == "nvjpeg":
        say_once(say, f"data.decode=gpu: JPEG images decoded per batch with nvJPEG on {device} "
                 f"({why}); masks in the loader workers")  # fmt: skip
    else:
        say_once(say, f"data.decode=gpu: {why}, so JPEG batches are decoded on the CPU in the "
                 "training process (PIL, pixel-equal to data.decode=cpu); masks in the loader workers")  # fmt: skip
    return EncodedReader(reader), BatchDecoder(reader.size, reader.aspect, device, backend)
