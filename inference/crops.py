"""Crops for embedding, made exactly as training's shards were (``datasets.crop``: clip, pad, crop, limit the
side, JPEG round trip at the prepare quality), plus the gallery's augmented views (flip, box scales, light)."""

from __future__ import annotations

import io
import zlib
from dataclasses import dataclass

from PIL import Image, ImageEnhance, ImageOps

from configs import PrepareConfig
from datasets.crop import CropSettings, clip_box, encode_jpeg, limit_side, padded_box
from datasets.records import Record


def crop_settings(prepare: PrepareConfig) -> CropSettings:
    """The crop options a retrieval run trained with (its ``data.prepare``)."""
    return CropSettings("", prepare.padding, prepare.min_size, prepare.max_side, prepare.quality)


def crop_box(img: Image.Image, box, settings: CropSettings, scale: float = 1.0, name: str = "") -> Image.Image:
    """The training crop of ``box`` ([x, y, w, h]; None = whole image) of ``img``; ``scale`` grows or shrinks
    the box around its centre first (a looser or tighter detection). Raises ``datasets.crop.CropError``."""
    record = Record(name, -1, box=None if box is None else tuple(float(v) for v in box))
    x0, y0, x1, y1 = clip_box(record, img.width, img.height, settings.min_size)
    if scale != 1.0:
        cx, cy, hw, hh = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) * scale / 2, (y1 - y0) * scale / 2
        x0, y0 = max(0, round(cx - hw)), max(0, round(cy - hh))
        x1, y1 = min(img.width, max(x0 + 1, round(cx + hw))), min(img.height, max(y0 + 1, round(cy + hh)))
    padded = padded_box((x0, y0, x1, y1), settings.padding, img.width, img.height)
    crop = limit_side(img.crop(padded), settings.max_side)
    with Image.open(io.BytesIO(encode_jpeg(crop, settings.quality))) as decoded:  # what the shards hold
        return decoded.convert("RGB")


@dataclass(frozen=True)
class ViewConfig:
    """Augmented gallery views added per library crop (the seed enlarges the feature bank this way)."""

    flip: bool = False
    """add the mirrored crop"""
    scales: tuple[float, ...] = ()
    """add crops of the box scaled by these factors around its centre (e.g. 0.9, 1.1)"""
    light: int = 0
    """add this many light colour changes (brightness, contrast, saturation within +-20 %)"""

    def __post_init__(self) -> None:
        if any(not 0.25 <= s <= 4.0 for s in self.scales):
            raise ValueError(f"views: scales {self.scales} must lie in [0.25, 4]")
        if self.light < 0:
            raise ValueError(f"views: light={self.light} must be >= 0")

    @classmethod
    def parse(cls, text: str) -> ViewConfig:
        """``"flip,scale=0.9:1.1,light=2"`` (empty = no views)."""
        flip, scales, light = False, (), 0
        for part in filter(None, (p.strip() for p in text.split(","))):
            key, _, value = part.partition("=")
            if key == "flip" and not value:
                flip = True
            elif key == "scale" and value:
                scales = tuple(float(v) for v in value.split(":"))
            elif key == "light" and value.isdigit():
                light = int(value)
            else:
                raise ValueError(f"--views: cannot read {part!r}; write e.g. flip,scale=0.9:1.1,light=2")
        return cls(flip, scales, light)

    def names(self) -> list[str]:
        return ["flip"] * self.flip + [f"scale{s:g}" for s in self.scales] + [f"light{k}" for k in range(self.light)]


def light_change(img: Image.Image, seed: int) -> Image.Image:
    """A deterministic brightness / contrast / saturation change of up to +-20 %."""
    factors = [0.8 + 0.4 * ((seed >> (8 * i)) & 0xFF) / 255 for i in range(3)]
    for enhancer, f in zip((ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color), factors):
        img = enhancer(img).enhance(f)
    return img


def gallery_views(img: Image.Image, box, settings: CropSettings, views: ViewConfig, name: str = "") -> list:
    """[(view name, crop)]: the plain crop ("orig") then every configured view of it."""
    base = crop_box(img, box, settings, name=name)
    out = [("orig", base)]
    if views.flip:
        out.append(("flip", ImageOps.mirror(base)))
    out += [(f"scale{s:g}", crop_box(img, box, settings, s, name)) for s in views.scales]
    for k in range(views.light):
        seed = zlib.crc32(f"{name}/{box}/{k}".encode())
        out.append((f"light{k}", light_change(base, seed)))
    return out
