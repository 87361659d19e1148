"""A synthetic Oxford-IIIT Pet: the real layout, the real file oddities, learnable shapes.

Each image is a pet-like shape (body, head, ears, legs, tail) with a furry, breed-coloured
texture on a textured background (gradient plus stripes, blotches or tiles, plus noise).
The trimap marks the pet 1, the background 2 and a band a few pixels wide around the
pet's outline 3, as the real trimaps do. The broken files of the real set are planted
under their real names (GIF, PNG RGB and RGBA, grayscale and corrupt JPEG streams, all
named ``.jpg``), with macOS ``._*.png`` junk in ``trimaps/`` and stray ``.mat`` files in
``images/``. The same seed gives byte-identical files.
"""

import colorsys
import io
import shutil
import struct
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from dist_seg.data.pets import BREEDS
from dist_seg.errors import UserError

# (name, kind, split file), ordered so that the first five cover every kind in both splits.
ODDITIES = (
    ("Abyssinian_34", "gif", "trainval"),
    ("Abyssinian_5", "png_rgba", "test"),
    ("Egyptian_Mau_156", "png_rgb", "test"),
    ("staffordshire_bull_terrier_2", "gray", "trainval"),
    ("beagle_116", "corrupt_jpeg", "trainval"),
    ("Egyptian_Mau_139", "gif", "test"),
    ("Egyptian_Mau_14", "png_rgba", "trainval"),
    ("chihuahua_121", "corrupt_jpeg", "trainval"),
    ("Egyptian_Mau_129", "gray", "test"),
    ("Egyptian_Mau_186", "png_rgba", "trainval"),
    ("staffordshire_bull_terrier_22", "gray", "test"),
    ("Egyptian_Mau_145", "gif", "trainval"),
    ("Egyptian_Mau_167", "gif", "test"),
    ("Egyptian_Mau_177", "gif", "trainval"),
    ("Egyptian_Mau_191", "gif", "test"),
)
MIN_IMAGES = 5
STRAY_MATS = ("Abyssinian_100.mat", "Abyssinian_101.mat", "Abyssinian_102.mat")
NUM_APPLEDOUBLE = 3
NUM_XMLS = 5
JPEG_QUALITY = 90
PNG_LEVEL = 6

LIST_HEADER = """\
#Image CLASS-ID SPECIES BREED ID
#ID: 1:37 Class ids
#SPECIES: 1:Cat 2:Dog
#BREED ID: 1-25:Cat 1:12:Dog
#All images with 1st letter as captial are cat images
#images with small first letter are dog images
"""

# Coat colours of real pets (muted: the backgrounds are drawn from all of RGB, so they
# overlap the coats only in part). A few breeds get their well-known coat.
_PALETTE = (
    (30, 28, 28), (70, 45, 30), (120, 80, 50), (200, 120, 60), (225, 200, 160),
    (235, 232, 225), (130, 130, 135), (110, 120, 135), (190, 150, 100), (170, 120, 70),
    (90, 55, 40), (180, 180, 185),
)  # fmt: skip
_COATS = {
    "Bombay": (25, 22, 24),
    "Russian_Blue": (120, 128, 140),
    "samoyed": (235, 232, 225),
    "great_pyrenees": (225, 222, 210),
    "newfoundland": (35, 30, 28),
    "Siamese": (215, 200, 170),
    "shiba_inu": (200, 120, 60),
}
_PATTERNS = ("solid", "stripes", "spots", "patches")


def _ids(breed: str) -> tuple[int, int, int]:
    """(class_id, species, breed_id) of a breed, as in the real list.txt."""
    class_id = BREEDS.index(breed) + 1
    species = 1 if breed[0].isupper() else 2
    breed_id = sum(1 for b in BREEDS[:class_id] if (b[0].isupper()) == (species == 1))
    return class_id, species, breed_id


def _breed_of(name: str) -> str:
    return name.rsplit("_", 1)[0]


def _coat(breed: str) -> tuple[np.ndarray, np.ndarray, str]:
    """Fixed per breed (not per seed): base colour, second colour, pattern."""
    rng = np.random.default_rng(1000 + BREEDS.index(breed))
    i, j = rng.choice(len(_PALETTE), 2, replace=False)
    base = np.array(_COATS.get(breed, _PALETTE[i]), dtype=np.float32)
    second = np.array(_PALETTE[j], dtype=np.float32)
    pattern = "solid" if breed in _COATS else _PATTERNS[rng.integers(len(_PATTERNS))]
    return base, second, pattern


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cell_y: float, cell_x: float):
    """Values in [0, 1], smooth over about cell_y x cell_x pixels."""
    small = rng.random((int(h / cell_y) + 2, int(w / cell_x) + 2), dtype=np.float32)
    return np.asarray(Image.fromarray(small, mode="F").resize((w, h), Image.BILINEAR))


def _ellipse(cx, cy, a, b, theta, n=48) -> list[tuple[float, float]]:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    x, y = a * np.cos(t), b * np.sin(t)
    c, s = np.cos(theta), np.sin(theta)
    return list(zip((cx + c * x - s * y).tolist(), (cy + s * x + c * y).tolist(), strict=True))


def _draw_pet(rng: np.random.Generator, w: int, h: int, species: int):
    """Pet mask (HxW uint8 0/255), head box (x0, y0, x1, y1) and body frame for shading."""
    a = rng.uniform(0.2, 0.38) * min(w, h)  # body half-length
    b = a * rng.uniform(0.45, 0.7)  # body half-width
    cx, cy = rng.uniform(0.3, 0.7) * w, rng.uniform(0.3, 0.7) * h
    theta = rng.uniform(0, 2 * np.pi)
    u = np.array([np.cos(theta), np.sin(theta)])  # along the body, towards the head
    v = np.array([-u[1], u[0]]) * rng.choice([-1.0, 1.0])  # towards the legs
    c = np.array([cx, cy])

    img = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(img)
    draw.polygon(_ellipse(cx, cy, a, b, theta), fill=255)
    # Legs: four rectangles from the body axis towards v.
    leg_w, leg_len = b * rng.uniform(0.25, 0.4), b * rng.uniform(1.4, 2.0)
    for off in (-0.65, -0.35, 0.35, 0.65):
        p = c + u * (off * a + rng.uniform(-0.05, 0.05) * a)
        tilt = v + u * rng.uniform(-0.3, 0.3)
        q = [p - u * leg_w / 2, p + u * leg_w / 2]
        q += [q[1] + tilt * leg_len, q[0] + tilt * leg_len]
        draw.polygon([tuple(x) for x in q], fill=255)
    # Tail: a thick curved line from the back end.
    phi = theta + np.pi + rng.uniform(-1.0, 1.0)
    bend, p = rng.uniform(-0.5, 0.5), c - u * a * 0.85
    tail = [tuple(p)]
    step = a * rng.uniform(0.5, 1.0) / 6
    for _ in range(6):
        p = p + step * np.array([np.cos(phi), np.sin(phi)])
        phi += bend
        tail.append(tuple(p))
    draw.line(
        tail, fill=255, width=max(3, int(b * (0.25 if species == 1 else 0.35))), joint="curve"
    )
    # Head with ears: pointed triangles for cats, hanging ellipses for dogs.
    r = b * rng.uniform(0.75, 1.05)
    hc = c + u * (a * 0.85 + r * 0.55) + v * rng.uniform(-0.3, 0.1) * r
    draw.polygon(_ellipse(hc[0], hc[1], r * 1.1, r, theta), fill=255)
    for side in (-1.0, 1.0):
        if species == 1:
            phi = theta + side * rng.uniform(0.5, 0.9)
            base = [
                hc + r * 0.9 * np.array([np.cos(phi + d), np.sin(phi + d)]) for d in (-0.35, 0.35)
            ]
            tip = hc + r * rng.uniform(1.5, 1.8) * np.array([np.cos(phi), np.sin(phi)])
            draw.polygon([tuple(base[0]), tuple(tip), tuple(base[1])], fill=255)
        else:
            phi = theta + side * rng.uniform(1.2, 1.6)
            ec = hc + r * 0.95 * np.array([np.cos(phi), np.sin(phi)])
            draw.polygon(_ellipse(ec[0], ec[1], r * 0.6, r * 0.32, phi), fill=255)
    box = (hc[0] - 1.7 * r, hc[1] - 1.7 * r, hc[0] + 1.7 * r, hc[1] + 1.7 * r)
    head_box = tuple(int(np.clip(x, 0, lim - 1)) for x, lim in zip(box, (w, h, w, h), strict=True))
    return np.asarray(img), head_box, (c, a, theta)


def _background(rng, h, w, yy, xx, avoid: np.ndarray) -> np.ndarray:
    """Textured background (3xHxW float) whose main colours keep some distance from the pet's."""

    def colour(min_dist: float) -> np.ndarray:
        for _ in range(100):  # mostly saturated colours, unlike the muted coats
            hsv = rng.random(), rng.uniform(0.3, 1.0), rng.uniform(0.3, 1.0)
            col = np.array(colorsys.hsv_to_rgb(*hsv), dtype=np.float32) * 255
            if np.linalg.norm(col - avoid) >= min_dist:
                break
        return col

    c1, c2 = colour(100), colour(100)
    c3 = rng.uniform(0, 255, 3).astype(np.float32)  # may come close to the pet
    ang = rng.uniform(0, 2 * np.pi)
    t = np.clip((xx * np.cos(ang) + yy * np.sin(ang)) / (h + w) + 0.5, 0, 1)  # gradient
    kind = rng.choice(3, p=[0.4, 0.4, 0.2])
    if kind == 0:  # stripes
        ang, period = rng.uniform(0, np.pi), rng.uniform(12, 60)
        m = 0.5 + 0.5 * np.sin(2 * np.pi * (xx * np.cos(ang) + yy * np.sin(ang)) / period)
    elif kind == 1:  # blotches
        n = _smooth_noise(rng, h, w, *(rng.uniform(25, 80, 2)))
        m = np.clip((n - 0.5) * 4 + 0.5, 0, 1)
    else:  # tiles
        p = int(rng.integers(20, 70))
        m = ((np.arange(h)[:, None] // p + np.arange(w)[None, :] // p) % 2).astype(np.float32)
        m *= 0.5  # hard edges everywhere: keep them fainter than the pet's
    m *= rng.uniform(0.15, 0.45)
    noise = (rng.random((h, w), dtype=np.float32) - 0.5) * rng.uniform(10, 40)
    bg = np.empty((3, h, w), np.float32)
    for ch in range(3):
        bg[ch] = c1[ch] + (c2[ch] - c1[ch]) * t
        bg[ch] += m * (c3[ch] - bg[ch])
        bg[ch] += noise
    return bg


def _pet_texture(rng, h, w, yy, xx, breed, frame) -> np.ndarray:
    """Furry, shaded, breed-coloured texture (3xHxW float) over the whole frame."""
    base, second, pattern = _coat(breed)
    base = np.clip(base + rng.uniform(-15, 15, 3), 0, 255).astype(np.float32)
    c, a, theta = frame
    cell = (1.5, 6.0) if rng.random() < 0.5 else (6.0, 1.5)  # fur direction
    fur = _smooth_noise(rng, h, w, *cell)
    if pattern == "stripes":
        d = (xx - c[0]) * np.cos(theta) + (yy - c[1]) * np.sin(theta)
        warp = _smooth_noise(rng, h, w, 30, 30) * 10
        m = (np.sin(2 * np.pi * (d + warp) / (a * rng.uniform(0.2, 0.35))) > 0.3).astype(np.float32)
    elif pattern == "spots":
        m = (_smooth_noise(rng, h, w, a / 5, a / 5) > 0.7).astype(np.float32)
    elif pattern == "patches":
        m = (_smooth_noise(rng, h, w, a / 1.5, a / 1.5) > 0.55).astype(np.float32)
    else:
        m = np.zeros((h, w), np.float32)
    dist2 = ((xx - c[0]) ** 2 + (yy - c[1]) ** 2) / (2 * a) ** 2
    shade = (1.1 - 0.3 * np.clip(dist2, 0, 1)) * (0.75 + 0.5 * fur)  # lit centre, fur
    pet = np.empty((3, h, w), np.float32)
    for ch in range(3):
        pet[ch] = (base[ch] + (second[ch] - base[ch]) * m) * shade
    return pet


def _render(rng: np.random.Generator, breed: str, sides: tuple[int, int] = (200, 501)):
    """(image HxWx3 uint8, trimap HxW uint8, head box) for one synthetic pet, each side
    drawn from [sides[0], sides[1])."""
    w, h = (int(x) for x in rng.integers(*sides, 2))
    species = _ids(breed)[1]
    for _ in range(50):  # resample the pose until the pet covers a sensible fraction
        mask, head_box, frame = _draw_pet(rng, w, h, species)
        if 0.08 <= (mask > 0).mean() <= 0.65:
            break
    yy = np.arange(h, dtype=np.float32)[:, None]  # broadcast coordinates: [H, 1] and [1, W]
    xx = np.arange(w, dtype=np.float32)[None, :]
    pet = _pet_texture(rng, h, w, yy, xx, breed, frame)
    bg = _background(rng, h, w, yy, xx, avoid=_coat(breed)[0])
    mask_img = Image.fromarray(mask)
    alpha = np.asarray(mask_img.filter(ImageFilter.GaussianBlur(0.8)), np.float32) / 255
    image = np.empty((h, w, 3), np.uint8)
    for ch in range(3):  # soft-edged composite of the pet over the background
        image[..., ch] = np.clip(bg[ch] + alpha * (pet[ch] - bg[ch]), 0, 255)
    # Trimap: a band of half-width r around the outline is 3 (dilation minus erosion).
    r = int(rng.integers(2, 4))
    blur = np.asarray(mask_img.filter(ImageFilter.BoxBlur(r)))
    trimap = np.full((h, w), 2, np.uint8)
    trimap[blur > 0] = 3
    trimap[blur == 255] = 1
    return image, trimap, head_box


def _encode(image: np.ndarray, kind: str) -> bytes:
    buf = io.BytesIO()
    img = Image.fromarray(image)
    if kind == "gif":
        img.quantize(colors=256, method=Image.Quantize.FASTOCTREE).save(buf, format="GIF")
    elif kind == "png_rgb":
        img.save(buf, format="PNG", compress_level=PNG_LEVEL)
    elif kind == "png_rgba":
        img.putalpha(255)
        img.save(buf, format="PNG", compress_level=PNG_LEVEL)
    elif kind == "gray":
        img.convert("L").save(buf, format="JPEG", quality=JPEG_QUALITY)
    else:
        img.save(buf, format="JPEG", quality=JPEG_QUALITY)
    data = buf.getvalue()
    if kind == "corrupt_jpeg":
        # Bytes between the last scan and EOI: libjpeg warns "extraneous bytes before marker".
        data = data[:-2] + b"\x13\x37\x00\x42\x07" + data[-2:]
    return data


def _appledouble() -> bytes:
    """A macOS AppleDouble header (what `._name.png` files hold), padded to 4 KiB."""
    header = struct.pack(">II16sH", 0x00051607, 0x00020000, b"Mac OS X        ", 1)
    header += struct.pack(">III", 9, 50, 32)  # one entry: Finder info at offset 50
    return header.ljust(4096, b"\x00")


def _mat_file() -> bytes:
    text = b"MATLAB 5.0 MAT-file, Platform: GLNXA64, Created on: Thu Jan  1 00:00:00 2015"
    return text.ljust(116, b" ") + b"\x00" * 8 + b"\x00\x01IM" + b"\x00" * 64


def _xml(name: str, w: int, h: int, box: tuple[int, int, int, int]) -> str:
    species = "cat" if name[0].isupper() else "dog"
    x0, y0, x1, y1 = box
    return (
        "<annotation><folder>OXIIIT</folder>"
        f"<filename>{name}.jpg</filename>"
        "<source><database>OXFORD-IIIT Pet Dataset</database>"
        "<annotation>OXIIIT</annotation><image>flickr</image></source>"
        f"<size><width>{w}</width><height>{h}</height><depth>3</depth></size>"
        "<segmented>0</segmented>"
        f"<object><name>{species}</name><pose>Frontal</pose><truncated>0</truncated>"
        f"<occluded>0</occluded><bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin>"
        f"<xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox><difficult>0</difficult></object>"
        "</annotation>\n"
    )


def _plan(num_images: int, seed: int) -> dict[str, str]:
    """name -> split file ("trainval" or "test") for every image."""
    rng = np.random.default_rng([seed, 0])
    planted = ODDITIES[: min(len(ODDITIES), max(MIN_IMAGES, num_images // 4))]
    split_of = {name: split for name, _, split in planted}
    order = rng.permutation(len(BREEDS))
    counters = dict.fromkeys(BREEDS, 0)
    normal = []
    while len(split_of) + len(normal) < num_images:
        breed = BREEDS[order[len(normal) % len(BREEDS)]]
        counters[breed] += 1
        name = f"{breed}_{counters[breed]}"
        if name not in split_of:
            normal.append(name)
    n_trainval = (num_images + 1) // 2 - sum(s == "trainval" for s in split_of.values())
    n_trainval = max(0, min(len(normal), n_trainval))
    for i, j in enumerate(rng.permutation(len(normal))):
        split_of[normal[j]] = "trainval" if i < n_trainval else "test"
    return split_of


def _line(name: str) -> str:
    return "{} {} {} {}".format(name, *_ids(_breed_of(name)))


def _sort_key(name: str) -> tuple[int, str]:
    return _ids(_breed_of(name))[0], name


def make_synthetic(
    root: Path, num_images: int = 200, seed: int = 0, overwrite: bool = False
) -> dict:
    """Write a synthetic Oxford-IIIT Pet under ``root`` and return a summary:
    ``counts`` per split, ``oddities`` (file -> what it really is), ``junk`` (stray files).

    ``overwrite`` deletes an existing ``images/`` and ``annotations/`` under ``root`` first.
    """
    if num_images < MIN_IMAGES:
        raise UserError(f"--num-images must be at least {MIN_IMAGES} (one per oddity kind)")
    root = Path(root)
    images, ann = root / "images", root / "annotations"
    trimaps, xmls = ann / "trimaps", ann / "xmls"
    if images.exists() or ann.exists():
        if not overwrite:
            raise UserError(f"{root} already holds images/ or annotations/; use an empty folder")
        shutil.rmtree(images, ignore_errors=True)
        shutil.rmtree(ann, ignore_errors=True)
    for d in (images, trimaps, xmls):
        d.mkdir(parents=True, exist_ok=True)

    split_of = _plan(num_images, seed)
    kinds = {name: kind for name, kind, _ in ODDITIES if name in split_of}
    names = sorted(split_of, key=_sort_key)
    xml_names = [n for n in names if split_of[n] == "trainval"][:NUM_XMLS]
    for i, name in enumerate(names):
        rng = np.random.default_rng([seed, 1, i])
        image, trimap, head_box = _render(rng, _breed_of(name))
        (images / f"{name}.jpg").write_bytes(_encode(image, kinds.get(name, "jpeg")))
        Image.fromarray(trimap).save(trimaps / f"{name}.png", compress_level=PNG_LEVEL)
        if name in xml_names:
            h, w = trimap.shape
            (xmls / f"{name}.xml").write_text(_xml(name, w, h, head_box))

    junk = [f"images/{m}" for m in STRAY_MATS]
    for m in STRAY_MATS:
        (images / m).write_bytes(_mat_file())
    for name in names[:NUM_APPLEDOUBLE]:
        (trimaps / f"._{name}.png").write_bytes(_appledouble())
        junk.append(f"annotations/trimaps/._{name}.png")

    lines = {s: [_line(n) for n in names if split_of[n] == s] for s in ("trainval", "test")}
    (ann / "list.txt").write_text(LIST_HEADER + "".join(_line(n) + "\n" for n in names))
    for s, split_lines in lines.items():
        (ann / f"{s}.txt").write_text("".join(line + "\n" for line in split_lines))

    n_trainval = len(lines["trainval"])
    n_val = (n_trainval + 9) // 10
    return {
        "counts": {
            "train": n_trainval - n_val,
            "val": n_val,
            "test": len(lines["test"]),
            "trainval": n_trainval,
        },
        "oddities": {f"images/{n}.jpg": k for n, k in kinds.items()},
        "junk": junk,
    }


# --- the generic layout (a folder of images, a folder of masks) --------------------------------
GENERIC_BROKEN = ("no_mask", "no_image", "other_size")


def make_synthetic_generic(
    root: Path, num_images: int = 60, seed: int = 0, overwrite: bool = False,
    sides: tuple[int, int] = (40, 97),
) -> dict:  # fmt: skip
    """Write a generic-layout set under ``root``, as Carvana's comes::

        images/<name>.jpg              JPEG, sides drawn from ``sides`` (not square)
        masks/<name>_mask.png | .gif   0/255 grey PNG (even i) or 0/1 palette GIF (odd i)

    plus three broken pairs: an image with no mask, a mask with no image, a mask of another
    size than its image. Pack it with ``--match '{stem}_mask' --skip-bad`` (they are then
    skipped and counted). Returns ``{"pairs": N good pairs, "broken": {kind: file}}``.
    """
    if num_images < 1:
        raise UserError("--num-images must be at least 1")
    root = Path(root)
    images, masks = root / "images", root / "masks"
    if images.exists() or masks.exists():
        if not overwrite:
            raise UserError(f"{root} already holds images/ or masks/; use an empty folder")
        shutil.rmtree(images, ignore_errors=True)
        shutil.rmtree(masks, ignore_errors=True)
    images.mkdir(parents=True)
    masks.mkdir(parents=True)
    breeds = [BREEDS[i % len(BREEDS)] for i in range(num_images + 3)]
    names = [f"item_{i:04d}" for i in range(num_images + 3)]
    for i, (name, breed) in enumerate(zip(names, breeds)):
        image, trimap, _ = _render(np.random.default_rng([seed, 2, i]), breed, sides)
        fg = trimap != 2  # the seed's border policy: border counts as foreground
        if i < num_images + 2:  # the last is the mask with no image
            Image.fromarray(image).save(images / f"{name}.jpg", quality=JPEG_QUALITY)
        if i == num_images + 1:
            continue  # the image with no mask
        if i == num_images:  # a mask of another size than its image
            fg = fg[:-8, :]
        if i % 2:
            gif = Image.fromarray(fg.astype(np.uint8), mode="L").convert("P")
            gif.putpalette([0, 0, 0, 255, 255, 255])
            gif.save(masks / f"{name}_mask.gif")
        else:
            Image.fromarray(fg.astype(np.uint8) * 255).save(masks / f"{name}_mask.png")
    return {
        "pairs": num_images,
        "broken": {
            "other_size": f"masks/{names[num_images]}_mask.{'gif' if num_images % 2 else 'png'}",
            "no_mask": f"images/{names[num_images + 1]}.jpg",
            "no_image": f"masks/{names[num_images + 2]}_mask.{'gif' if num_images % 2 else 'png'}",
        },
    }
