"""ROI cropping of one record: load, validate, clip, pad, crop, resize, (augment a gallery view), encode JPEG.

Everything here is a pure function of (record, settings, view), so crops are byte-identical across runs
and across worker processes; gallery views draw their randomness from a seed derived from the sample.
"""

from __future__ import annotations

import io
import random
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from datasets.records import Record


class CropError(ValueError):
    """A record that cannot be cropped; ``reason`` is a short machine-readable cause."""

    def __init__(self, record: Record, reason: str, detail: str) -> None:
        super().__init__(f"record {record.path!r} (identity {record.identity}, box {record.box}): {reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class CropSettings:
    """The crop options of ``PrepareConfig`` (its defaults are the only ones) plus the root of relative paths."""

    root: str
    padding: float
    min_size: int
    max_side: int
    quality: int


def resolve_path(record: Record, root: str) -> Path:
    """Image file of a record: absolute paths as they are, relative ones under ``root``."""
    path = Path(record.path)
    return path if path.is_absolute() or not root else Path(root) / path


ALPHA_BACKGROUND = (255, 255, 255)
"""colour under transparent pixels: white, as product cut-outs are shown in catalogues"""

EXIF_ORIENTATION = 0x0112
"""EXIF tag of the camera orientation; values 5..8 swap width and height"""


class UnsupportedImage(ValueError):
    """An image mode without a faithful 8-bit RGB rendering."""


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB as a viewer shows the image: EXIF orientation applied, 16-bit scaled, alpha composited.

    16-bit greyscale (``I;16*``, or ``I`` within 0..65535) is scaled by 255/65535; transparency (``RGBA``,
    ``LA``, ``PA``, palette transparency, PNG colour keys) is composited over ``ALPHA_BACKGROUND``. Modes without
    a faithful 8-bit rendering (float, 32-bit integer beyond 16 bits) raise ``UnsupportedImage``.
    """
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        values = np.asarray(img, dtype=np.int64)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise UnsupportedImage(f"{img.mode} image with values {values.min()}..{values.max()} is not 16-bit")
        grey = Image.fromarray(((values * 255 + 32767) // 65535).astype(np.uint8), mode="L")
        key = img.info.get("transparency")
        if isinstance(key, int):  # a PNG tRNS colour key: this one 16-bit grey value is transparent
            grey = Image.merge("LA", (grey, Image.fromarray(np.where(values == key, 0, 255).astype(np.uint8))))
        img = grey
    elif img.mode == "F":
        raise UnsupportedImage("floating-point images have no defined 8-bit rendering")
    if img.mode in ("P", "L", "RGB") and "transparency" in img.info:  # palette alpha or a PNG tRNS colour key
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*ALPHA_BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def oriented_size(img: Image.Image) -> tuple[int, int]:
    """(width, height) after the EXIF orientation, read from the header without decoding the pixels."""
    width, height = img.size
    return (height, width) if img.getexif().get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8) else (width, height)


def load_image(record: Record, root: str) -> Image.Image:
    """Fully decoded RGB image (see ``to_rgb``); missing, corrupt, truncated or unrenderable files raise
    ``CropError`` naming the file."""
    path = resolve_path(record, root)
    if not path.is_file():
        raise CropError(record, "missing_image", f"image file {path} does not exist")
    try:
        with Image.open(path) as img:
            img.load()  # forces a full decode: truncated JPEGs fail here, not later
            return to_rgb(img)
    except UnsupportedImage as exc:
        raise CropError(record, "unsupported_image", f"{path}: {exc}") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise CropError(record, "bad_image", f"cannot decode {path}: {exc}") from None


def clip_box(record: Record, width: int, height: int, min_size: int) -> tuple[int, int, int, int]:
    """Integer (x0, y0, x1, y1) of the record's box clipped to the image; degenerate boxes raise ``CropError``."""
    if record.box is None:
        x0, y0, x1, y1 = 0.0, 0.0, float(width), float(height)
    else:
        x, y, w, h = (float(v) for v in record.box)
        if not w > 0 or not h > 0:
            raise CropError(record, "degenerate_box", f"box has non-positive size w={w} h={h}")
        x0, y0, x1, y1 = x, y, x + w, y + h
    cx0, cy0 = max(0, round(x0)), max(0, round(y0))
    cx1, cy1 = min(width, round(x1)), min(height, round(y1))
    if cx1 <= cx0 or cy1 <= cy0:
        raise CropError(record, "box_outside", f"box lies outside the {width}x{height} image")
    if min(cx1 - cx0, cy1 - cy0) < min_size:
        raise CropError(record, "too_small", f"clipped box {cx1 - cx0}x{cy1 - cy0} is below min_size={min_size}")
    return cx0, cy0, cx1, cy1


def padded_box(box: tuple[int, int, int, int], padding: float, width: int, height: int) -> tuple[int, int, int, int]:
    """Box grown by ``padding`` x its side on every side (context), clipped to the image."""
    x0, y0, x1, y1 = box
    dx, dy = round((x1 - x0) * padding), round((y1 - y0) * padding)
    return max(0, x0 - dx), max(0, y0 - dy), min(width, x1 + dx), min(height, y1 + dy)


def limit_side(img: Image.Image, max_side: int) -> Image.Image:
    """Downscale so the longer side is at most ``max_side`` (0 = keep)."""
    longest = max(img.size)
    if not max_side or longest <= max_side:
        return img
    scale = max_side / longest
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    return img.resize(size, Image.BICUBIC)


def view_seed(split: str, position: int, view: int) -> int:
    """Stable per-sample seed of a gallery view (independent of Python's hash randomisation)."""
    return zlib.crc32(f"{split}/{position}/{view}".encode())


def augment_view(img: Image.Image, seed: int) -> Image.Image:
    """One deterministic augmented gallery view: flip, small rotation and scale, colour change."""
    rng = random.Random(seed)
    if rng.random() < 0.5:
        img = ImageOps.mirror(img)
    fill = tuple(int(c) for c in img.resize((1, 1), Image.BOX).getpixel((0, 0)))
    img = img.rotate(rng.uniform(-10.0, 10.0), resample=Image.BILINEAR, fillcolor=fill)
    scale = rng.uniform(0.85, 1.15)
    img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BILINEAR)
    for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        img = enhancer(img).enhance(rng.uniform(0.75, 1.25))
    return img


def encode_jpeg(img: Image.Image, quality: int) -> bytes:
    """Deterministic JPEG bytes (fixed quality and subsampling, no metadata)."""
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality, subsampling=0 if quality >= 90 else 2, optimize=False)
    return buf.getvalue()


def crop_record(record: Record, settings: CropSettings, views: int = 0, position: int = 0) -> list[dict]:
    """Crop one record into ``1 + views`` samples: ``{"jpg": bytes, "box": [...], "crop_box": [...], "view": k}``."""
    img = load_image(record, settings.root)
    box = clip_box(record, img.width, img.height, settings.min_size)
    crop_box = padded_box(box, settings.padding, img.width, img.height)
    crop = limit_side(img.crop(crop_box), settings.max_side)
    out = []
    for view in range(views + 1):
        pic = crop if view == 0 else augment_view(crop, view_seed(record.split, position, view))
        out.append(
            {
                "jpg": encode_jpeg(pic, settings.quality),
                "box": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
                "crop_box": [crop_box[0], crop_box[1], crop_box[2] - crop_box[0], crop_box[3] - crop_box[1]],
                "view": view,
            }
        )
    return out
