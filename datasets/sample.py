"""The embedded sample set: a synthetic retail product library + shelf scenes, generated from a seed (PIL + numpy).

24 SKUs (12 package designs x 2 variants told apart by band colour, mark and printed text), 3 library
images each (96x96, small pose/light changes) and 80 shelf scenes of 320x240 (60 train, 20 test) with 4-8
products, partial occlusion (neighbours, shelf rail, door frame), scale and lighting changes. Written as
COCO JSON + JPEGs in the retail layout of ``datasets.coco``; scene boxes are the visible extent of each
product. Same seed -> byte-identical files. CLI: ``python -m datasets.sample --out data/sample [--seed 0]``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFont

log = logging.getLogger(__name__)

VERSION = 1
DEFAULT_SEED = 0
MARKER = ".sample-complete.json"
NUM_DESIGNS, VARIANTS, LIBRARY_VIEWS = 12, 2, 3
TRAIN_SCENES, TEST_EVERY, NUM_SCENES = 60, 4, 80  # scene ids that are multiples of TEST_EVERY are test (20)
SCENE_W, SCENE_H, LIB_SIZE = 320, 240, 96
SHELF_ROWS = ((8, 112), (124, 228))  # (top, floor y) of each shelf row
SHAPES = {"box": (52, 80), "can": (44, 70), "bottle": (36, 86), "pouch": (58, 72)}  # canonical w, h (pixels)
BODY = [(200, 40, 40), (235, 130, 30), (230, 200, 40), (50, 150, 60), (30, 150, 150), (40, 80, 190),
        (120, 60, 160), (120, 80, 40), (225, 225, 215), (40, 40, 45), (230, 120, 170), (140, 140, 150)]  # fmt: skip
BAND = [(250, 250, 250), (20, 20, 20), (250, 215, 0), (0, 120, 200), (210, 0, 60), (0, 160, 90)]
SIZES = ("250", "500", "1L", "XL", "MINI", "ZERO")


@dataclass(frozen=True)
class Sku:
    """One product: category id, name and the look that tells it apart."""

    id: int
    name: str
    shape: str
    body: tuple[int, int, int]
    band: tuple[int, int, int]
    brand: str
    size: str
    round_mark: bool


def make_skus(rng: np.random.Generator) -> list[Sku]:
    """12 designs (unique body colour, a shape) x 2 variants (band colour, mark, size text differ)."""
    colours = rng.permutation(len(BODY))
    letters = "ABCDEFGHKLMNPRSTVWXZ"
    skus = []
    for d in range(NUM_DESIGNS):
        shape = list(SHAPES)[d % len(SHAPES)]
        brand = "".join(letters[i] for i in rng.choice(len(letters), size=3, replace=False))
        bands = rng.choice(len(BAND), size=VARIANTS, replace=False)
        sizes = rng.choice(len(SIZES), size=VARIANTS, replace=False)
        for v in range(VARIANTS):
            sid = len(skus) + 1
            name = f"{brand}-{SIZES[sizes[v]]}-{shape}"
            skus.append(Sku(sid, name, shape, BODY[colours[d]], BAND[bands[v]], brand, SIZES[sizes[v]], v == 0))
    return skus


def font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ValueError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def shape_mask(shape: str, w: int, h: int) -> Image.Image:
    """Alpha mask of a package silhouette."""
    mask = Image.new("L", (w, h), 0)
    d = ImageDraw.Draw(mask)
    if shape == "box":
        d.rectangle((0, 0, w - 1, h - 1), fill=255)
    elif shape == "can":
        d.rounded_rectangle((0, 0, w - 1, h - 1), radius=w // 5, fill=255)
    elif shape == "bottle":
        d.rectangle((w * 0.32, 0, w * 0.68, h * 0.2), fill=255)
        d.ellipse((0, h * 0.12, w - 1, h * 0.42), fill=255)
        d.rounded_rectangle((0, h * 0.26, w - 1, h - 1), radius=w // 6, fill=255)
    else:  # pouch
        d.polygon([(w * 0.1, 0), (w * 0.9, 0), (w - 1, h - 1), (0, h - 1)], fill=255)
    return mask


def render_sku(sku: Sku) -> Image.Image:
    """The product at twice its canonical size (RGBA), with band, printed text, mark and shading."""
    w, h = (2 * v for v in SHAPES[sku.shape])
    img = Image.new("RGB", (w, h), sku.body)
    d = ImageDraw.Draw(img)
    y0, y1 = int(h * 0.45), int(h * 0.68)
    d.rectangle((0, y0, w, y1), fill=sku.band)
    ink = (0, 0, 0) if sum(sku.band) > 380 else (255, 255, 255)
    d.text((w / 2, (y0 + y1) / 2), sku.brand, fill=ink, font=font(max(10, w // 4)), anchor="mm")
    body_ink = (0, 0, 0) if sum(sku.body) > 380 else (255, 255, 255)
    d.text((w / 2, h * 0.82), sku.size, fill=body_ink, font=font(max(8, w // 5)), anchor="mm")
    r, cx, cy = w * 0.16, w / 2, h * 0.32
    mark = d.ellipse if sku.round_mark else d.rectangle
    mark((cx - r, cy - r, cx + r, cy + r), fill=sku.band, outline=body_ink, width=2)
    arr = np.asarray(img, dtype=np.float32)
    if sku.shape in ("can", "bottle"):  # cylinder shading
        arr = arr * (0.7 + 0.4 * np.sin(np.linspace(0.15, np.pi - 0.15, w)))[None, :, None]
    else:
        arr = arr * np.linspace(1.05, 0.85, w)[None, :, None]
    out = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).convert("RGBA")
    out.putalpha(shape_mask(sku.shape, w, h))
    return out


def pose(base: Image.Image, height: float, angle: float, light: float) -> Image.Image:
    """One instance: resized to ``height`` pixels, rotated by ``angle`` degrees, brightness ``light``."""
    w = max(4, round(base.width * height / base.height))
    img = base.resize((w, max(4, round(height))), Image.Resampling.LANCZOS)
    rgb = ImageEnhance.Brightness(img.convert("RGB")).enhance(light)
    rgb.putalpha(img.getchannel("A"))
    if angle:
        rgb = rgb.rotate(angle, resample=Image.Resampling.BICUBIC, expand=True)
    return rgb


def relight(img: Image.Image, rng: np.random.Generator, strength: float) -> Image.Image:
    """Global brightness, a linear light gradient, a colour tint and sensor noise."""
    arr = np.asarray(img, dtype=np.float32)
    h, w = arr.shape[:2]
    gain = 1 + strength * rng.uniform(-0.3, 0.3)
    angle, slope = rng.uniform(0, 2 * np.pi), strength * rng.uniform(0, 0.35)
    yy, xx = np.mgrid[0:h, 0:w]
    ramp = 1 + slope * ((xx / w - 0.5) * np.cos(angle) + (yy / h - 0.5) * np.sin(angle))
    tint = 1 + strength * rng.uniform(-0.08, 0.08, size=3)
    arr = arr * gain * ramp[..., None] * tint + rng.normal(0, 2.5, size=arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def library_image(base: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, list[float]]:
    """A clean catalogue photo: the product centred on a light background; returns it and the box."""
    shade = int(rng.integers(228, 250))
    canvas = Image.new("RGB", (LIB_SIZE, LIB_SIZE), (shade, shade, shade - int(rng.integers(0, 8))))
    prod = pose(base, LIB_SIZE * rng.uniform(0.74, 0.86), rng.uniform(-6, 6), rng.uniform(0.9, 1.1))
    x = (LIB_SIZE - prod.width) // 2 + int(rng.integers(-3, 4))
    y = (LIB_SIZE - prod.height) // 2 + int(rng.integers(-3, 4))
    canvas.paste(prod, (x, y), prod)
    bx0, by0, bx1, by1 = prod.getchannel("A").point(lambda a: 255 if a > 127 else 0).getbbox()
    box = [max(0, x + bx0), max(0, y + by0), min(LIB_SIZE, x + bx1), min(LIB_SIZE, y + by1)]
    return relight(canvas, rng, 0.4), [box[0], box[1], box[2] - box[0], box[3] - box[1]]


def shelf_background(rng: np.random.Generator) -> Image.Image:
    """A cabinet interior: tinted back wall with a vertical gradient, shelf boards and side panels."""
    wall = rng.uniform(150, 235, size=3)
    yy = np.linspace(0.85, 1.1, SCENE_H)[:, None, None]
    img = Image.fromarray(np.clip(wall * yy * np.ones((SCENE_H, SCENE_W, 1)), 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(img)
    board = tuple(int(v) for v in rng.uniform(60, 140, size=3))
    for _, floor in SHELF_ROWS:
        d.rectangle((0, floor, SCENE_W, floor + 10), fill=board)
    d.rectangle((0, 0, 3, SCENE_H), fill=board)
    d.rectangle((SCENE_W - 4, 0, SCENE_W, SCENE_H), fill=board)
    return img


def fill_row(
    img: Image.Image,
    ids: np.ndarray,
    bases: list[Image.Image],
    rng: np.random.Generator,
    row: tuple[int, int],
    count: int,
    zoom: float,
    placed: list[tuple[int, int]],
) -> None:
    """Stand ``count`` random products left to right on one shelf row; neighbours may overlap (occlusion)."""
    top, floor = row
    x = int(rng.integers(4, 16))
    for _ in range(count):
        k = int(rng.integers(len(bases)))
        height = min(floor - top - 2, bases[k].height / 2 * zoom * rng.uniform(0.9, 1.1))
        prod = pose(bases[k], height, rng.uniform(-3, 3), rng.uniform(0.85, 1.15))
        if x + prod.width > SCENE_W - 4:
            break
        y = floor - prod.height + int(rng.integers(0, 4))
        img.paste(prod, (x, y), prod)
        visible = np.asarray(prod.getchannel("A")) > 127
        placed.append((k, int(visible.sum())))
        ids[y : y + prod.height, x : x + prod.width][visible] = len(placed)
        x += prod.width + int(rng.integers(-int(0.3 * prod.width), 8))


def scene_image(bases: list[Image.Image], rng: np.random.Generator) -> tuple[Image.Image, list[tuple[int, list]]]:
    """A shelf photo with 4-8 products; returns it and (sku index, visible box [x, y, w, h]) per product."""
    img = shelf_background(rng)
    ids = np.zeros((SCENE_H, SCENE_W), dtype=np.int16)
    n = int(rng.integers(4, 9))
    n_top = n // 2 + int(rng.integers(0, n % 2 + 1))
    placed: list[tuple[int, int]] = []
    zoom = rng.uniform(0.8, 1.15)
    for row, count in zip(SHELF_ROWS, (n_top, n - n_top)):
        fill_row(img, ids, bases, rng, row, count, zoom, placed)
    d = ImageDraw.Draw(img)
    rail = tuple(int(v) for v in rng.uniform(20, 90, size=3))
    occluders = [(0, floor - 3, SCENE_W, floor + 3) for _, floor in SHELF_ROWS]  # price-tag rails
    if rng.random() < 0.5:  # a glass-door frame in front of the shelf
        x = int(rng.integers(40, SCENE_W - 40))
        occluders.append((x, 0, x + int(rng.integers(5, 10)), SCENE_H))
    for x0, y0, x1, y1 in occluders:
        d.rectangle((x0, y0, x1 - 1, y1 - 1), fill=rail)
        ids[y0:y1, x0:x1] = 0
    boxes = []
    for i, (k, full) in enumerate(placed, start=1):
        ys, xs = np.nonzero(ids == i)
        if len(ys) >= 0.3 * full:  # at least 30% visible: annotate its visible extent
            boxes.append(
                (k, [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)])
            )
    return relight(img, rng, 1.0), boxes


def coco_json(images: list[dict], annotations: list[dict], skus: list[Sku]) -> str:
    categories = [{"id": s.id, "name": s.name, "supercategory": "product"} for s in skus]
    return json.dumps({"images": images, "annotations": annotations, "categories": categories}, indent=1)


def annotation(aid: int, image_id: int, sku: Sku, box: list) -> dict:
    return {"id": aid, "image_id": image_id, "category_id": sku.id, "bbox": box, "area": box[2] * box[3], "iscrowd": 0}


def generate(out: str | Path, seed: int = DEFAULT_SEED) -> dict[str, int]:
    """Write the sample set (images/, query.json, gallery.json) into ``out``; returns counts."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    sku_rng, lib_rng, scene_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3))
    skus = make_skus(sku_rng)
    bases = [render_sku(s) for s in skus]
    images, anns = [], []
    for sku, base in zip(skus, bases):
        for view in range(LIBRARY_VIEWS):
            img, box = library_image(base, lib_rng)
            name = f"library_{sku.id:02d}_{view}.jpg"
            img.save(out / "images" / name, "JPEG", quality=92)
            images.append({"id": len(images) + 1, "file_name": name, "width": LIB_SIZE, "height": LIB_SIZE})
            anns.append(annotation(len(anns) + 1, len(images), sku, box))
    (out / "gallery.json").write_text(coco_json(images, anns, skus))
    counts = {"skus": len(skus), "library_images": len(images)}
    images, anns = [], []
    for sid in range(1, NUM_SCENES + 1):
        img, boxes = scene_image(bases, scene_rng)
        name = f"scene_{sid:04d}.jpg"
        img.save(out / "images" / name, "JPEG", quality=90)
        split = "test" if sid % TEST_EVERY == 0 else "train"
        images.append({"id": sid, "file_name": name, "width": SCENE_W, "height": SCENE_H, "split": split})
        for k, box in boxes:
            anns.append(annotation(len(anns) + 1, sid, skus[k], box))
    (out / "query.json").write_text(coco_json(images, anns, skus))
    return {**counts, "scenes": len(images), "scene_boxes": len(anns)}


def file_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` except the marker, keyed by relative path."""
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name != MARKER)
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def marker_info(root: Path) -> dict | None:
    """The completion marker's content, or None when the set under ``root`` is absent or unfinished."""
    try:
        return json.loads((root / MARKER).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _remove_stale_temps(root: Path) -> None:
    """Delete temporary folders left by generations that were killed (their process is gone)."""
    for tmp in root.parent.glob(f".{root.name}.tmp-*"):
        try:
            os.kill(int(tmp.name.rsplit("-", 1)[1]), 0)
        except ProcessLookupError:
            shutil.rmtree(tmp, ignore_errors=True)
        except (ValueError, PermissionError):
            continue


def ensure_sample(root: str | Path, seed: int = DEFAULT_SEED, force: bool = False) -> Path:
    """Generate the sample set into ``root`` unless a complete one (marker written last) is there.

    Generation goes to a temporary sibling folder that is renamed into place, so a killed run never
    leaves a half-written set behind ``root``; a set from another seed is an error unless ``force``.
    """
    root = Path(os.path.abspath(root))
    info = marker_info(root)
    if info is not None and not force:
        if info.get("seed") != seed:
            raise ValueError(f"{root} holds the sample set made with seed {info.get('seed')}, not {seed}; use --force")
        if info.get("version") == VERSION:
            return root
    ours = {"images", "query.json", "gallery.json", MARKER}
    if root.is_dir() and info is None and not {p.name for p in root.iterdir()} <= ours:
        raise ValueError(f"{root} exists and is not a generated sample set (no {MARKER}); choose another data.root")
    root.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(root)
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        counts = generate(tmp, seed)
        info = {"seed": seed, "version": VERSION, "counts": counts, "files": file_hashes(tmp)}
        (tmp / MARKER).write_text(json.dumps(info, indent=1, sort_keys=True))  # written last
        done = marker_info(root)
        if done and done.get("seed") == seed and done.get("version") == VERSION and not force:
            return root  # another process (rank) finished first: keep its identical set, drop ours
        if root.exists():
            old = root.parent / f".{root.name}.old-{os.getpid()}"
            os.rename(root, old)
            shutil.rmtree(old)
        try:
            os.rename(tmp, root)
        except OSError:  # another process renamed its set into place in between
            if marker_info(root) is None:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("sample set (seed %d) written to %s: %s", seed, root, counts)
    return root


def main(argv: list[str] | None = None) -> None:
    """CLI: generate the sample set and log its statistics table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/sample", help="output folder (default: data/sample)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="generator seed (default: 0)")
    parser.add_argument("--force", action="store_true", help="regenerate even if a complete set is there")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from datasets.coco import read_coco

    read_coco(ensure_sample(args.out, args.seed, args.force), title=f"sample (seed {args.seed})")


if __name__ == "__main__":
    main()
