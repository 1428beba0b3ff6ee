"""YOLO txt labels -> COCO detection JSON (one file per split), e.g. for coco8.

``python -m datasets.yolo --root ../shared/data/coco8 --out data/coco8`` reads ``ROOT/images/SPLIT/*.jpg`` and
``ROOT/labels/SPLIT/*.txt`` (``class cx cy w h``, normalised) and writes ``OUT/SPLIT.json`` whose ``file_name``
is relative to ``ROOT/images``. Category ``k`` gets id ``k + 1`` and the k-th name of ``--names`` (else ``"k"``).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from PIL import Image

from datasets.crop import oriented_size
from datasets.records import IMAGE_EXTENSIONS

log = logging.getLogger(__name__)


def read_labels(path: Path) -> list[tuple[int, float, float, float, float]]:
    """Rows ``(class, cx, cy, w, h)`` of one label file (no file = no objects); ValueError naming file and line."""
    if not path.is_file():
        return []
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        try:
            cls, cx, cy, w, h = int(parts[0]), *(float(v) for v in parts[1:5])
        except (ValueError, IndexError):
            raise ValueError(f"{path}:{number}: expected 'class cx cy w h', got {line!r}") from None
        rows.append((cls, cx, cy, w, h))
    return rows


def yolo_split_to_coco(root: Path, split: str, names: list[str] | None = None) -> dict:
    """COCO dict of ``root/images/split`` with boxes from ``root/labels/split`` (clipped to the image)."""
    image_dir = root / "images" / split
    if not image_dir.is_dir():
        raise FileNotFoundError(f"{image_dir} does not exist")
    images, annotations, classes = [], [], set()
    for image_id, path in enumerate(sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS), 1):
        with Image.open(path) as im:
            width, height = oriented_size(im)  # labels are normalised to the image as shown (EXIF applied)
        images.append({"id": image_id, "file_name": f"{split}/{path.name}", "width": width, "height": height})
        for cls, cx, cy, w, h in read_labels(root / "labels" / split / f"{path.stem}.txt"):
            x1, y1 = max((cx - w / 2) * width, 0.0), max((cy - h / 2) * height, 0.0)
            x2, y2 = min((cx + w / 2) * width, float(width)), min((cy + h / 2) * height, float(height))
            if x2 - x1 < 1 or y2 - y1 < 1:
                log.warning("%s: a class-%d box has no area inside the image; skipped", path.name, cls)
                continue
            classes.add(cls)
            bbox = [x1, y1, x2 - x1, y2 - y1]
            annotations.append(
                {"id": len(annotations) + 1, "image_id": image_id, "category_id": cls + 1, "bbox": bbox,
                 "area": bbox[2] * bbox[3], "iscrowd": 0}
            )  # fmt: skip
    if names is not None and classes and max(classes) >= len(names):
        raise ValueError(f"{root}/labels/{split}: class {max(classes)} but only {len(names)} names given")
    top = len(names) if names is not None else (max(classes) + 1 if classes else 0)
    categories = [{"id": k + 1, "name": names[k] if names else str(k)} for k in range(top)]
    return {"images": images, "annotations": annotations, "categories": categories}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, help="folder with images/SPLIT and labels/SPLIT")
    parser.add_argument("--out", required=True, help="folder for SPLIT.json")
    parser.add_argument("--splits", nargs="+", default=["train", "val"])
    parser.add_argument("--names", default=None, help="text file with one class name per line")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    names = Path(args.names).read_text().split("\n") if args.names else None
    names = [n.strip() for n in names if n.strip()] if names else None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # one category list for all splits: the widest one
    coco = {split: yolo_split_to_coco(Path(args.root), split, names) for split in args.splits}
    widest = max((c["categories"] for c in coco.values()), key=len)
    for split, data in coco.items():
        data["categories"] = widest
        (out / f"{split}.json").write_text(json.dumps(data))
        print(f"{split}\t{out / f'{split}.json'}\t{len(data['images'])} images\t{len(data['annotations'])} boxes")


if __name__ == "__main__":
    main()
