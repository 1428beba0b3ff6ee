"""``DetrCocoDataset``: mmdet's COCO dataset with our data rules (image splits, class-agnostic mode, checked input).

Registered in mmdet's DATASETS registry; detection configs name it as ``type='DetrCocoDataset'``.
"""

from __future__ import annotations

import json
import logging
import os.path as osp
from collections import Counter
from pathlib import Path

from datasets.coco import is_held_out
from trainers import mmcv_ext

mmcv_ext.install()

from mmdet.datasets import CocoDataset  # noqa: E402  (after mmcv_ext.install)
from mmdet.registry import DATASETS  # noqa: E402

log = logging.getLogger(__name__)

AGNOSTIC_CLASSES = ("object",)
SPLITS = ("train", "test")


def image_split(image: dict, path: str | Path) -> str:
    """``train`` / ``test``: the retail reader's held-out rule (``split`` field, else every 5th image id)."""
    return "test" if is_held_out(image, Path(path)) else "train"


def read_coco_json(path: str | Path) -> dict:
    """A COCO detection file, checked for the keys we use; FileNotFoundError / ValueError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"COCO annotation file {path} does not exist")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise ValueError(f"{path}: missing the COCO list {key!r}")
    if not data["categories"]:
        raise ValueError(f"{path}: 'categories' is empty")
    return data


def category_names(path: str | Path) -> tuple[str, ...]:
    """Class names of a COCO file in category-id order (the per-class label order)."""
    cats = sorted(read_coco_json(path)["categories"], key=lambda c: c["id"])
    return tuple(str(c["name"]) for c in cats)


def clip_box(bbox, width: int, height: int) -> list[float] | None:
    """COCO ``[x, y, w, h]`` clipped to the image as ``[x1, y1, x2, y2]``; None when under 1 pixel wide/high."""
    x, y, w, h = (float(v) for v in bbox)
    x1, y1 = max(x, 0.0), max(y, 0.0)
    x2, y2 = min(x + w, float(width)), min(y + h, float(height))
    if x2 - x1 < 1 or y2 - y1 < 1:
        return None
    return [x1, y1, x2, y2]


@DATASETS.register_module()
class DetrCocoDataset(CocoDataset):
    """COCO boxes with ``split`` ('train' / 'test' / None = all images) and ``class_agnostic`` (one 'object' class).

    Per-class mode takes the class names from the file's categories unless ``metainfo`` names them. Boxes
    reaching outside the image are clipped; boxes with nothing left, crowd-free images without boxes and
    (in training) images left without boxes are counted and logged. An annotation whose category id is
    not in ``categories`` is a ValueError naming the file and the annotation.
    """

    def __init__(self, *args, split: str | None = None, class_agnostic: bool = False, **kwargs) -> None:
        if split is not None and split not in SPLITS:
            raise ValueError(f"DetrCocoDataset split={split!r}; choose one of {SPLITS} or None (all images)")
        self.split = split
        self.class_agnostic = class_agnostic
        metainfo = dict(kwargs.pop("metainfo", None) or {})
        if class_agnostic:
            metainfo["classes"] = AGNOSTIC_CLASSES
        super().__init__(*args, metainfo=metainfo, **kwargs)

    def load_data_list(self) -> list[dict]:
        data = read_coco_json(self.ann_file)
        cats = sorted(data["categories"], key=lambda c: c["id"])
        if "classes" not in self._metainfo or self._metainfo["classes"] == CocoDataset.METAINFO["classes"]:
            self._metainfo["classes"] = tuple(str(c["name"]) for c in cats)
        self._metainfo.pop("palette", None)  # COCO's 80 colours do not fit our classes; the visualiser picks
        names = list(self._metainfo["classes"])
        if self.class_agnostic:
            cat2label = {c["id"]: 0 for c in cats}
        else:
            by_name = {str(c["name"]): c["id"] for c in cats}
            unknown = [n for n in names if n not in by_name]
            if unknown:
                raise ValueError(f"{self.ann_file}: classes {unknown} are not among its categories")
            cat2label = {by_name[n]: i for i, n in enumerate(names)}
        self.cat_ids = list(cat2label)
        self.cat2label = cat2label

        anns_by_image: dict[int, list[dict]] = {}
        known = {c["id"] for c in cats}
        for ann in data["annotations"]:
            if ann.get("category_id") not in known:
                raise ValueError(
                    f"{self.ann_file}: annotation id {ann.get('id')} (image {ann.get('image_id')}) has category_id "
                    f"{ann.get('category_id')!r}, which is not in 'categories' (ids {sorted(known)})"
                )
            anns_by_image.setdefault(ann["image_id"], []).append(ann)

        images = [im for im in data["images"] if self.split is None or image_split(im, self.ann_file) == self.split]
        if not images:
            raise ValueError(f"{self.ann_file}: no images in split {self.split!r}")
        skipped: Counter[str] = Counter()
        data_list = [self._parse_image(im, anns_by_image.get(im["id"], []), skipped) for im in images]
        self._check_images(data_list)
        if skipped:
            log.warning("%s: %s", self.ann_file, ", ".join(f"{n} {reason}" for reason, n in sorted(skipped.items())))
        log.info(
            "%s: %d images (split %s), %d boxes", self.ann_file, len(data_list), self.split, self.num_boxes(data_list)
        )
        return data_list

    def _parse_image(self, image: dict, anns: list[dict], skipped: Counter) -> dict:
        width, height = int(image["width"]), int(image["height"])
        instances = []
        for ann in anns:
            if ann["category_id"] not in self.cat2label:
                skipped["boxes of classes outside metainfo skipped"] += 1
                continue
            box = clip_box(ann["bbox"], width, height)
            if box is None:
                skipped["boxes outside the image or under 1 px skipped"] += 1
                continue
            if box != [
                ann["bbox"][0],
                ann["bbox"][1],
                ann["bbox"][0] + ann["bbox"][2],
                ann["bbox"][1] + ann["bbox"][3],
            ]:
                skipped["boxes clipped to the image"] += 1
            instances.append(
                {
                    "bbox": box,
                    "bbox_label": self.cat2label[ann["category_id"]],
                    "ignore_flag": int(ann.get("iscrowd", 0)),
                }
            )
        if not instances:
            skipped["images without boxes"] += 1
        return {
            "img_path": osp.join(self.data_prefix.get("img", ""), image["file_name"]),
            "img_id": image["id"],
            "seg_map_path": None,
            "height": height,
            "width": width,
            "instances": instances,
        }

    def _check_images(self, data_list: list[dict]) -> None:
        missing = [d["img_path"] for d in data_list if not osp.isfile(d["img_path"])]
        if missing:
            raise FileNotFoundError(
                f"{self.ann_file}: {len(missing)} image file(s) missing, e.g. {missing[0]} "
                f"(file_name is joined to data_root + data_prefix['img'])"
            )

    def filter_data(self) -> list[dict]:
        if self.test_mode or not (self.filter_cfg or {}).get("filter_empty_gt", False):
            return self.data_list
        min_size = (self.filter_cfg or {}).get("min_size", 0)
        kept = [d for d in self.data_list if d["instances"] and min(d["width"], d["height"]) >= min_size]
        if len(kept) < len(self.data_list):
            log.warning(
                "%s: %d training image(s) without boxes left out", self.ann_file, len(self.data_list) - len(kept)
            )
        if not kept:
            raise ValueError(f"{self.ann_file}: no training image has a box (split {self.split!r})")
        return kept

    @staticmethod
    def num_boxes(data_list: list[dict]) -> int:
        return sum(len(d["instances"]) for d in data_list)
