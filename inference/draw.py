"""Pictures of recognition results: each box with its SKU, similarity and the matched gallery thumbnail
(green = known SKU, red = unknown), written as PNG files and as TensorBoard images (``recognize/<image>``)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from datasets.crop import CropSettings, to_rgb
from inference.crops import crop_box
from inference.match import UNKNOWN

log = logging.getLogger(__name__)

THUMB = 40  # thumbnail side (pixels) of the matched gallery item


def _thumbnail(match: dict, settings: CropSettings, cache: dict) -> Image.Image | None:
    key = (match["source"], str(match["box"]))
    if key not in cache:
        try:
            with Image.open(match["source"]) as img:
                crop = crop_box(to_rgb(img), match["box"], settings)  # boxes are on the image as shown
            crop.thumbnail((THUMB, THUMB))
            cache[key] = crop
        except (OSError, ValueError) as exc:  # moved since the bank was built, or unreadable: draw without it
            log.warning("no thumbnail for %s: %s", match["source"], exc)
            cache[key] = None
    return cache[key]


def draw_image(path: Path, results: list[dict], settings: CropSettings, cache: dict | None = None) -> Image.Image:
    """The query image with every result box, label, similarity and gallery thumbnail (beside the box)."""
    cache = {} if cache is None else cache
    with Image.open(path) as src:
        canvas = to_rgb(src)  # as recognised: EXIF orientation applied, so the boxes land where they belong
    scale = max(1, round(480 / max(canvas.size)))  # small scenes are enlarged so the labels stay readable
    canvas = canvas.resize((canvas.width * scale, canvas.height * scale), Image.NEAREST)
    pen = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for r in sorted(results, key=lambda r: r["score"]):
        x, y, w, h = (v * scale for v in r["bbox"])
        known = r["category_id"] != UNKNOWN
        colour = (40, 200, 60) if known else (230, 40, 40)
        pen.rectangle((x, y, x + w, y + h), outline=colour, width=2)
        label = f"{r['match']['name'] if known else 'unknown'} {r['similarity']:.2f}"
        pen.text((x + 2, y + 2), label, fill=colour, font=font, stroke_width=2, stroke_fill=(0, 0, 0))
        thumb = _thumbnail(r["match"], settings, cache)
        if thumb is not None:
            tx, ty = (
                int(min(x + w - thumb.width - 2, canvas.width - thumb.width)),
                int(max(y + h - thumb.height - 2, 0)),
            )
            canvas.paste(thumb, (max(tx, 0), ty))
            pen.rectangle((tx, ty, tx + thumb.width, ty + thumb.height), outline=colour)
    return canvas


def write_pictures(queries, results: list[dict], settings: CropSettings, out_dir: str | Path,
                   tb_dir: str | Path | None = None, limit: int = 8) -> list[Path]:  # fmt: skip
    """Draw the first ``limit`` queries (QueryImage) into ``out_dir`` (PNG) and, when ``tb_dir``, TensorBoard."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    by_image: dict[int, list[dict]] = {}
    for r in results:
        by_image.setdefault(r["image_id"], []).append(r)
    writer = None
    if tb_dir is not None:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(tb_dir))
    written, cache = [], {}
    try:
        for q in list(queries)[:limit]:
            try:
                picture = draw_image(q.path, by_image.get(q.image_id, []), settings, cache)
            except OSError as exc:
                log.warning("no picture for %s: %s", q.path, exc)
                continue
            path = out_dir / f"{q.image_id:06d}_{Path(q.path).stem}.png"
            tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
            picture.save(tmp, format="PNG")
            os.replace(tmp, path)
            written.append(path)
            if writer is not None:
                writer.add_image(f"recognize/{Path(q.path).stem}", np.asarray(picture), 0, dataformats="HWC")
    finally:
        if writer is not None:
            writer.close()
    log.info("wrote %d picture(s) to %s%s", len(written), out_dir, f" and TensorBoard {tb_dir}" if tb_dir else "")
    return written
