"""Reader for COCO-style retail annotations: scene images with many boxes (query side) + a product library.

Layout: ``root/query.json`` (scenes: the seed's ``a_images``), ``root/gallery.json`` (one product per
library image: ``b_images``), image ``file_name`` relative to ``root/images/``; boxes link to library
entries by ``category_id`` (categories are shared). Splits:
  train   = boxes of the training scenes + library boxes whose image is not marked ``"split": "test"``;
  query   = boxes of the held-out scenes;
  gallery = every library box.
Held-out scenes: a scene image's ``"split"`` field (``train``/``test``) when present, else every image whose
id is a multiple of 5. Bad input: a missing file, unknown image or category id, duplicate ids or an empty
split is an error naming the json file and record. A box partly outside its image is clipped (counted,
``meta["clipped"]``); a box with no area left (zero/negative size, or wholly outside the image) is skipped,
counted and logged with its annotation id (mmdetection drops such boxes too; one bad box should not stop
a large set); pass ``skipped={}`` to get the list.
"""

from __future__ import annotations

import json
import logging
import math
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

from PIL import Image

from datasets.crop import oriented_size
from datasets.records import Record, assign_labels, finish_splits, log_skips, require_dir

HELD_OUT_EVERY = 5
log = logging.getLogger(__name__)


def load_json(path: Path) -> dict:
    """A COCO json with ``images``, ``annotations`` and ``categories`` lists; errors name the file."""
    if not path.is_file():
        raise FileNotFoundError(f"COCO annotation file {path} does not exist")
    try:
        coco = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    for key in ("images", "annotations", "categories"):
        if not isinstance(coco.get(key), list):
            raise ValueError(f"{path}: expected a list under {key!r}")
    return coco


def index_by_id(items: list[dict], kind: str, path: Path) -> dict[int, dict]:
    """{id: item}; ValueError naming the file when an id is missing or repeated."""
    out: dict[int, dict] = {}
    for item in items:
        if "id" not in item:
            raise ValueError(f"{path}: a {kind} entry has no 'id': {item}")
        if item["id"] in out:
            raise ValueError(f"{path}: {kind} id {item['id']} appears twice")
        out[item["id"]] = item
    return out


def merge_categories(files: list[tuple[Path, dict]]) -> dict[int, str]:
    """{category id: name} shared by all files; ValueError when two files name one id differently."""
    names: dict[int, str] = {}
    for path, coco in files:
        for cid, cat in index_by_id(coco["categories"], "category", path).items():
            name = str(cat.get("name", cid))
            if names.setdefault(cid, name) != name:
                raise ValueError(f"{path}: category id {cid} is {name!r} here but {names[cid]!r} in another file")
    return names


def image_size(image: dict, file: Path, path: Path) -> tuple[int, int]:
    """(width, height) from the json, else from the image header; errors name the json and the file."""
    if not file.is_file():
        raise FileNotFoundError(f"{path}: image id {image['id']} file {file} does not exist")
    if image.get("width") and image.get("height"):
        return int(image["width"]), int(image["height"])
    try:
        with Image.open(file) as im:
            return oriented_size(im)  # boxes are drawn on the image as shown, EXIF orientation applied
    except Exception as e:  # PIL raises several types for broken files
        raise ValueError(f"{path}: image id {image['id']} file {file} cannot be read ({e})") from e


def checked_annotation(ann: dict, path: Path) -> tuple:
    """(id, image_id, category_id, bbox) of one annotation; ValueError naming the file and the annotation when
    an id is not an integer (a string ``"9"`` is not the category 9) or the bbox is not 4 numbers."""
    aid = ann["id"]
    for key in ("image_id", "category_id"):
        value = ann.get(key)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{path}: annotation {aid} has {key} {value!r} ({type(value).__name__}); ids are integers")
    bbox = ann.get("bbox")
    numbers = isinstance(bbox, (list, tuple)) and all(isinstance(v, (int, float)) for v in bbox)
    if not numbers or len(bbox) != 4 or any(isinstance(v, bool) for v in bbox):
        raise ValueError(f"{path}: annotation {aid} has bbox {bbox!r}; expected [x, y, w, h], 4 numbers")
    return aid, ann["image_id"], ann["category_id"], bbox


def clip_box(bbox, width: int, height: int) -> tuple[tuple[float, float, float, float] | None, bool]:
    """([x, y, w, h] clipped to the image or None when no area is left, whether it was clipped)."""
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4 or not all(map(math.isfinite, bbox)):
        return None, False
    x, y, w, h = (float(v) for v in bbox)
    x0, y0, x1, y1 = max(x, 0.0), max(y, 0.0), min(x + w, width), min(y + h, height)
    if w <= 0 or h <= 0 or x1 <= x0 or y1 <= y0:
        return None, False
    clipped = (x0, y0, x1 - x0, y1 - y0)
    return clipped, clipped != (x, y, w, h)


def is_held_out(image: dict, path: Path) -> bool:
    """The documented scene rule: ``split`` field when present, else image id multiple of HELD_OUT_EVERY."""
    split = image.get("split")
    if split is None:
        return int(image["id"]) % HELD_OUT_EVERY == 0
    if split not in ("train", "test"):
        raise ValueError(f"{path}: image id {image['id']} has split {split!r}; expected 'train' or 'test'")
    return split == "test"


def read_boxes(
    path: Path, coco: dict, image_dir: Path, categories: dict[int, str], skipped: dict[str, list[str]]
) -> list[tuple[Record, dict]]:
    """(record, image entry) for every usable annotation of one json, in annotation order.

    Boxes with no area are added to ``skipped``; clipped boxes are kept and counted in the log.
    """
    images = index_by_id(coco["images"], "image", path)
    index_by_id(coco["annotations"], "annotation", path)  # ids must be unique
    sizes: dict[int, tuple[int, int]] = {}
    out, clipped_ids = [], []
    for ann in coco["annotations"]:
        aid, iid, cid, bbox = checked_annotation(ann, path)
        if iid not in images:
            raise ValueError(f"{path}: annotation {aid} points at image id {iid}, which is not in 'images'")
        if cid not in categories:
            raise ValueError(f"{path}: annotation {aid} has unknown category_id {cid} (known: {sorted(categories)})")
        image = images[iid]
        file = image_dir / str(image.get("file_name", ""))
        if iid not in sizes:
            sizes[iid] = image_size(image, file, path)
        box, clipped = clip_box(bbox, *sizes[iid])
        if box is None:
            skipped["box with no area inside its image"].append(f"{path.name} annotation {aid} bbox={ann.get('bbox')}")
            continue
        if clipped:
            clipped_ids.append(aid)
        meta = {"image_id": iid, "annotation_id": aid, "source": path.name, "clipped": clipped}
        out.append((Record(str(file), cid, box=box, name=categories[cid], meta=meta), image))
    if clipped_ids:
        log.warning(
            "%s: clipped %d box(es) to their image (kept), annotations %s", path, len(clipped_ids), clipped_ids[:5]
        )
    return out


def read_coco(
    root: str | Path, title: str = "COCO retail", skipped: dict[str, list[str]] | None = None
) -> dict[str, list[Record]]:
    """Splits train/query/gallery of a retail COCO set under ``root`` (see the module docstring)."""
    root = require_dir(root, "COCO retail root")
    image_dir = require_dir(root / "images", "COCO retail images")
    files = [(root / name, load_json(root / name)) for name in ("query.json", "gallery.json")]
    categories = merge_categories(files)
    skipped = skipped if skipped is not None else {}
    found: dict[str, list[str]] = defaultdict(list)
    splits: dict[str, list[Record]] = {"train": [], "query": [], "gallery": []}
    (qpath, qcoco), (gpath, gcoco) = files
    for rec, image in read_boxes(qpath, qcoco, image_dir, categories, found):
        split = "query" if is_held_out(image, qpath) else "train"
        splits[split].append(replace(rec, split=split))
    for rec, image in read_boxes(gpath, gcoco, image_dir, categories, found):
        splits["gallery"].append(replace(rec, split="gallery"))
        if image.get("split") != "test":
            splits["train"].append(replace(rec, split="train"))
    annotated = {ann.get("image_id") for ann in gcoco["annotations"]}
    found["library image without annotation (no category)"] += [
        f"{gpath.name} image {im['id']}" for im in gcoco["images"] if im["id"] not in annotated
    ]
    skipped.update(found)
    log_skips(root, found)
    splits["train"], _ = assign_labels(splits["train"])
    return finish_splits(splits, root, title)
