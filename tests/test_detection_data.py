"""Detection data: VOC -> COCO conversion (real BCCD) and DetrCocoDataset's handling of bad input."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from PIL import Image

from datasets import voc
from tests.conftest import shared_dataset

pytest.importorskip("mmdet")

from trainers.detection_data import DetrCocoDataset  # noqa: E402


def test_voc_to_coco_on_bccd(tmp_path):
    root = shared_dataset("bccd") / "BCCD"
    files = voc.convert(root, tmp_path, ("train", "val"))
    train = json.loads(files["train"].read_text())
    assert [c["name"] for c in train["categories"]] == ["Platelets", "RBC", "WBC"]
    ids = (root / "ImageSets" / "Main" / "train.txt").read_text().split()
    assert len(train["images"]) == len(ids) == 205
    # one box checked by hand against its XML
    image, objects = voc.parse_voc_xml(root / "Annotations" / f"{ids[0]}.xml")
    coco_img = next(im for im in train["images"] if im["file_name"] == image["file_name"])
    anns = [a for a in train["annotations"] if a["image_id"] == coco_img["id"]]
    x1, y1, x2, y2 = objects[0]["bbox"]
    assert anns[0]["bbox"] == [x1, y1, x2 - x1, y2 - y1]
    assert all((root / "JPEGImages" / im["file_name"]).is_file() for im in train["images"])
    assert voc.main(["--root", str(root), "--out", str(tmp_path / "cli"), "--splits", "val"]) is None
    assert (tmp_path / "cli" / "val.json").is_file()


def _voc_tree(tmp_path: Path, objects: str, size: str = "<size><width>50</width><height>40</height></size>") -> Path:
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (tmp_path / sub).mkdir(parents=True, exist_ok=True)
    xml = f"<annotation><filename>a.jpg</filename>{size}{objects}</annotation>"
    (tmp_path / "Annotations" / "a.xml").write_text(xml)
    (tmp_path / "ImageSets" / "Main" / "train.txt").write_text("a\n")
    Image.new("RGB", (50, 40)).save(tmp_path / "JPEGImages" / "a.jpg")
    return tmp_path


def _obj(name: str, box: tuple[int, int, int, int]) -> str:
    tags = "".join(f"<{t}>{v}</{t}>" for t, v in zip(("xmin", "ymin", "xmax", "ymax"), box))
    return f"<object><name>{name}</name><bndbox>{tags}</bndbox></object>"


def test_voc_bad_input(tmp_path, caplog):
    root = _voc_tree(tmp_path / "ok", _obj("cell", (-5, 10, 20, 30)) + _obj("cell", (60, 50, 70, 60)))
    with caplog.at_level(logging.WARNING):
        coco = json.loads(voc.convert(root, tmp_path / "out", ("train",))["train"].read_text())
    assert [a["bbox"] for a in coco["annotations"]] == [[0.0, 10.0, 20.0, 20.0]]  # clipped; the outside one skipped
    assert "1 boxes outside the image" in caplog.text
    with pytest.raises(ValueError, match=r"a\.xml: missing <size>"):
        voc.convert(_voc_tree(tmp_path / "nosize", _obj("cell", (1, 1, 5, 5)), size=""), tmp_path / "o2", ("train",))
    with pytest.raises(FileNotFoundError, match="val.txt"):
        voc.convert(root, tmp_path / "o3", ("val",))


def _coco(tmp_path: Path, annotations: list[dict], categories=None, n_images: int = 3) -> Path:
    (tmp_path / "images").mkdir(parents=True, exist_ok=True)
    images = []
    for i in range(1, n_images + 1):
        Image.new("RGB", (40, 30)).save(tmp_path / "images" / f"{i}.jpg")
        images.append(
            {"id": i, "file_name": f"{i}.jpg", "width": 40, "height": 30, "split": "test" if i == 3 else "train"}
        )
    cats = categories or [{"id": 5, "name": "cola"}, {"id": 9, "name": "chips"}]
    path = tmp_path / "query.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": cats}))
    return path


def _ann(aid: int, image_id: int, bbox: list[float], cat: int = 5) -> dict:
    return {"id": aid, "image_id": image_id, "category_id": cat, "bbox": bbox, "area": bbox[2] * bbox[3], "iscrowd": 0}


def _dataset(root: Path, **kwargs) -> DetrCocoDataset:
    return DetrCocoDataset(data_root=str(root), ann_file="query.json", data_prefix=dict(img="images/"), **kwargs)


def test_dataset_clips_skips_and_counts(tmp_path, caplog):
    anns = [
        _ann(1, 1, [30, 20, 20, 20]),  # partly outside: clipped to [30, 20, 40, 30]
        _ann(2, 1, [50, 5, 10, 10], cat=9),  # wholly outside: skipped
        _ann(3, 3, [1, 1, 10, 10], cat=9),
    ]  # image 2 has no boxes
    _coco(tmp_path, anns)
    with caplog.at_level(logging.INFO):
        ds = _dataset(tmp_path, filter_cfg=dict(filter_empty_gt=True))
    assert "1 boxes clipped to the image" in caplog.text and "1 boxes outside the image" in caplog.text
    assert "1 training image(s) without boxes left out" in caplog.text
    assert ds.metainfo["classes"] == ("cola", "chips")
    infos = [ds.get_data_info(i) for i in range(len(ds))]
    assert [d["img_id"] for d in infos] == [1, 3]
    assert infos[0]["instances"] == [{"bbox": [30.0, 20.0, 40.0, 30.0], "bbox_label": 0, "ignore_flag": 0}]
    assert infos[1]["instances"][0]["bbox_label"] == 1
    # test mode keeps images without boxes; split filtering follows the retail reader's rule
    assert len(_dataset(tmp_path, test_mode=True)) == 3
    held_out = _dataset(tmp_path, test_mode=True, split="test")
    assert [held_out.get_data_info(i)["img_id"] for i in range(len(held_out))] == [3]
    agnostic = _dataset(tmp_path, class_agnostic=True, test_mode=True)
    assert agnostic.metainfo["classes"] == ("object",)
    labels = {inst["bbox_label"] for i in range(len(agnostic)) for inst in agnostic.get_data_info(i)["instances"]}
    assert labels == {0}


def test_dataset_bad_input_errors(tmp_path):
    _coco(tmp_path / "unknown_cat", [_ann(7, 1, [1, 1, 5, 5], cat=42)])
    with pytest.raises(ValueError, match=r"query\.json: annotation id 7 .*category_id 42"):
        _dataset(tmp_path / "unknown_cat")
    _coco(tmp_path / "empty", [])
    assert len(_dataset(tmp_path / "empty", test_mode=True)) == 3  # evaluation may hold empty images
    with pytest.raises(ValueError, match="no training image has a box"):
        _dataset(tmp_path / "empty", filter_cfg=dict(filter_empty_gt=True))
    path = _coco(tmp_path / "missing", [_ann(1, 1, [1, 1, 5, 5])])
    (path.parent / "images" / "2.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 image file\(s\) missing, e\.g\. .*2\.jpg"):
        _dataset(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        DetrCocoDataset(data_root=str(tmp_path), ann_file="nope.json")
    with pytest.raises(ValueError, match="split='val'"):
        _dataset(tmp_path / "empty", split="val")


def test_yolo_to_coco_on_coco8(tmp_path):
    from datasets import yolo

    root = shared_dataset("coco8")
    yolo.main(["--root", str(root), "--out", str(tmp_path)])
    val = json.loads((tmp_path / "val.json").read_text())
    assert (
        len(val["images"]) == 4 and val["categories"] == json.loads((tmp_path / "train.json").read_text())["categories"]
    )
    first = val["images"][0]
    cls, cx, cy, w, h = yolo.read_labels(root / "labels" / "val" / (Path(first["file_name"]).stem + ".txt"))[0]
    ann = next(a for a in val["annotations"] if a["image_id"] == first["id"])
    assert ann["category_id"] == cls + 1
    assert ann["bbox"][2] == pytest.approx(min(w * first["width"], first["width"] - ann["bbox"][0]), abs=1e-6)
    ds = DetrCocoDataset(
        data_root=str(tmp_path), ann_file="val.json", data_prefix=dict(img=str(root / "images")), test_mode=True
    )
    assert len(ds) == 4 and sum(len(ds.get_data_info(i)["instances"]) for i in range(4)) == len(val["annotations"])
    bad = tmp_path / "bad" / "labels" / "val"
    bad.mkdir(parents=True)
    (bad / "x.txt").write_text("3 0.5 oops 0.1 0.1\n")
    with pytest.raises(ValueError, match=r"x\.txt:1: expected"):
        yolo.read_labels(bad / "x.txt")
