"""Pascal VOC XML -> COCO detection JSON (one file per ImageSets/Main split), e.g. for BCCD.

``python -m datasets.voc --root ../shared/data/bccd/BCCD --out data/bccd`` writes ``data/bccd/{train,val,...}.json``
whose ``file_name`` is relative to ``ROOT/JPEGImages``.
"""

from __future__ import annotations

import argparse
import json
import logging
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

log = logging.getLogger(__name__)


def _text(node: ET.Element, tag: str, xml_path: Path) -> str:
    child = node.find(tag)
    if child is None or child.text is None:
        raise ValueError(f"{xml_path}: missing <{tag}>")
    return child.text.strip()


def parse_voc_xml(xml_path: Path) -> tuple[dict, list[dict]]:
    """(image info, objects) of one VOC file; each object is {name, bbox [x1, y1, x2, y2], difficult}."""
    try:
        root = ET.parse(xml_path).getroot()
    except ET.ParseError as exc:
        raise ValueError(f"{xml_path}: not valid XML ({exc})") from None
    size = root.find("size")
    if size is None:
        raise ValueError(f"{xml_path}: missing <size>")
    image = {
        "file_name": _text(root, "filename", xml_path),
        "width": int(float(_text(size, "width", xml_path))),
        "height": int(float(_text(size, "height", xml_path))),
    }
    objects = []
    for obj in root.iter("object"):
        box = obj.find("bndbox")
        if box is None:
            raise ValueError(f"{xml_path}: <object> without <bndbox>")
        coords = [float(_text(box, tag, xml_path)) for tag in ("xmin", "ymin", "xmax", "ymax")]
        difficult = obj.find("difficult")
        objects.append(
            {
                "name": _text(obj, "name", xml_path),
                "bbox": coords,
                "difficult": int(difficult.text.strip()) if difficult is not None and difficult.text else 0,
            }
        )
    return image, objects


def voc_to_coco(root: str | Path, ids: list[str], classes: list[str]) -> tuple[dict, Counter]:
    """COCO dict for the VOC image ``ids`` under ``root`` (Annotations/, JPEGImages/) and the skip counts.

    VOC pixel boxes are inclusive 1-based; COCO width = xmax - xmin (the common convention). Boxes are
    clipped to the image; boxes with nothing left and objects of unknown classes are counted, not kept.
    """
    root = Path(root)
    class_ids = {name: i + 1 for i, name in enumerate(classes)}
    coco: dict = {"images": [], "annotations": [], "categories": [{"id": i, "name": n} for n, i in class_ids.items()]}
    skipped: Counter = Counter()
    for image_id, stem in enumerate(ids, start=1):
        xml_path = root / "Annotations" / f"{stem}.xml"
        if not xml_path.is_file():
            raise FileNotFoundError(f"{xml_path} (listed in the split file) does not exist")
        image, objects = parse_voc_xml(xml_path)
        if not (root / "JPEGImages" / image["file_name"]).is_file():
            image["file_name"] = f"{stem}.jpg"  # some VOC sets carry a stale <filename>
        coco["images"].append({"id": image_id, **image})
        if not objects:
            skipped["images without objects (kept, no boxes)"] += 1
        for obj in objects:
            if obj["name"] not in class_ids:
                skipped[f"objects of unknown class {obj['name']!r}"] += 1
                continue
            x1, y1, x2, y2 = obj["bbox"]
            x1, y1 = max(x1, 0.0), max(y1, 0.0)
            x2, y2 = min(x2, float(image["width"])), min(y2, float(image["height"]))
            if x2 - x1 < 1 or y2 - y1 < 1:
                skipped["boxes outside the image or under 1 px"] += 1
                continue
            w, h = x2 - x1, y2 - y1
            coco["annotations"].append(
                {
                    "id": len(coco["annotations"]) + 1,
                    "image_id": image_id,
                    "category_id": class_ids[obj["name"]],
                    "bbox": [x1, y1, w, h],
                    "area": w * h,
                    "iscrowd": 0,
                    "difficult": obj["difficult"],
                }
            )
    return coco, skipped


def voc_classes(root: str | Path) -> list[str]:
    """Sorted class names found in all of ``root/Annotations/*.xml``."""
    names = set()
    for xml_path in sorted(Path(root, "Annotations").glob("*.xml")):
        names.update(obj["name"] for obj in parse_voc_xml(xml_path)[1])
    if not names:
        raise ValueError(f"{root}/Annotations: no objects found")
    return sorted(names)


def convert(root: str | Path, out: str | Path, splits: tuple[str, ...] = ("train", "val", "test")) -> dict[str, Path]:
    """Write ``out/SPLIT.json`` for each ``root/ImageSets/Main/SPLIT.txt``; returns split -> file."""
    root, out = Path(root), Path(out)
    if not (root / "Annotations").is_dir():
        raise FileNotFoundError(f"{root}: not a VOC root (no Annotations/ folder)")
    classes = voc_classes(root)
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for split in splits:
        list_file = root / "ImageSets" / "Main" / f"{split}.txt"
        if not list_file.is_file():
            raise FileNotFoundError(f"{list_file} does not exist (choose splits that {root} has)")
        ids = [line.split()[0] for line in list_file.read_text().splitlines() if line.strip()]
        coco, skipped = voc_to_coco(root, ids, classes)
        for reason, n in sorted(skipped.items()):
            log.warning("%s: %d %s", list_file, n, reason)
        path = out / f"{split}.json"
        path.write_text(json.dumps(coco))
        log.info("%s: %d images, %d boxes -> %s", split, len(coco["images"]), len(coco["annotations"]), path)
        written[split] = path
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, help="VOC root with Annotations/, JPEGImages/, ImageSets/Main/")
    parser.add_argument("--out", required=True, help="folder for SPLIT.json")
    parser.add_argument("--splits", nargs="+", default=["train", "val", "test"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for split, path in convert(args.root, args.out, tuple(args.splits)).items():
        print(f"{split}\t{path}")


if __name__ == "__main__":
    main()
