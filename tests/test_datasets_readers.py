"""Readers on the real sets in ../shared/data and on small hand-made trees, including the bad-input cases."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from PIL import Image

from configs import DataConfig
from datasets.coco import read_coco
from datasets.folders import read_folders, read_grocery
from datasets.market1501 import read_market1501
from datasets.mars import read_mars
from datasets.readers import read_records
from tests.conftest import shared_dataset


def touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")


def jpg_names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.jpg"))


# --- Market-1501 / DukeMTMC-reID -------------------------------------------------------------------------


def test_market1501_mini_matches_the_files(caplog):
    root = shared_dataset("market1501_mini")
    with caplog.at_level(logging.INFO):
        splits = read_market1501(root)
    assert "# cameras" in caplog.text and "Market1501" in caplog.text  # the seed's stats table is logged
    for split, sub in (("train", "bounding_box_train"), ("query", "query"), ("gallery", "bounding_box_test")):
        names = jpg_names(root / sub)
        recs = splits[split]
        assert sorted(Path(r.path).name for r in recs) == names
        for r in recs:
            name = Path(r.path).name
            assert r.identity == int(name[:4]) and r.camera == int(name[6]) - 1 and r.split == split
            assert Path(r.path).is_file()
    train = splits["train"]
    assert sorted({r.label for r in train}) == list(range(len({r.identity for r in train})))
    assert all(r.label == -1 for r in splits["query"] + splits["gallery"])
    assert {r.camera for r in splits["gallery"]} == set(range(6))


def test_market1501_read_records_dispatch():
    root = shared_dataset("market1501_mini")
    assert read_records(DataConfig(reader="market1501", root=str(root))) == read_market1501(root)


def test_market1501_junk_and_distractors_follow_the_protocol(tmp_path, caplog):
    for sub in ("bounding_box_train", "query", "bounding_box_test"):
        for name in (
            "0002_c1s1_000151_01.jpg",
            "0002_c3s1_000301_01.jpg",
            "-1_c1s1_000001_00.jpg",
            "0000_c2s1_1_00.jpg",
        ):
            touch(tmp_path / sub / name)
    touch(tmp_path / "bounding_box_test" / "Thumbs.db")  # ignored, as in the official download
    with caplog.at_level(logging.WARNING):
        splits = read_market1501(tmp_path)
    assert [r.identity for r in splits["train"]] == [2, 2] and [r.identity for r in splits["query"]] == [2, 2]
    assert sorted(r.identity for r in splits["gallery"]) == [0, 2, 2]  # distractor kept, junk dropped
    assert "skipped 3 record(s): junk (pid -1)" in caplog.text  # counted, reported
    assert "distractor (pid 0) outside the gallery (train)" in caplog.text


def test_dukemtmc_names(tmp_path):
    for sub, name in (("bounding_box_train", "0005_c2_f0046985.jpg"), ("query", "0005_c1_f0045000.jpg")):
        touch(tmp_path / sub / name)
    touch(tmp_path / "bounding_box_test" / "0005_c8_f0100000.jpg")
    splits = read_market1501(tmp_path, title="DukeMTMC-reID")
    assert [(r.identity, r.camera, r.meta["frame"]) for r in splits["train"]] == [(5, 1, 46985)]
    assert splits["gallery"][0].camera == 7


def test_market1501_bad_name_missing_folder_empty_split(tmp_path):
    for sub in ("bounding_box_train", "query", "bounding_box_test"):
        (tmp_path / sub).mkdir()
    touch(tmp_path / "bounding_box_train" / "0001_c1s1_000001_00.jpg")
    touch(tmp_path / "query" / "0001_c2s1_000001_00.jpg")
    with pytest.raises(ValueError, match=r"split 'gallery' is empty"):
        read_market1501(tmp_path)
    touch(tmp_path / "bounding_box_test" / "person7.jpg")
    with pytest.raises(ValueError, match=r"person7\.jpg: file name does not follow"):
        read_market1501(tmp_path)
    (tmp_path / "query" / "0001_c2s1_000001_00.jpg").unlink()
    (tmp_path / "query").rmdir()
    with pytest.raises(FileNotFoundError, match="Market-1501 query split: directory .*query does not exist"):
        read_market1501(tmp_path)


# --- MARS ---------------------------------------------------------------------------------------------


def test_mars_mini_matches_the_files():
    root = shared_dataset("mars_mini")
    splits = read_mars(root)
    train_files = sorted(root.glob("bbox_train/*/*.jpg"))
    test_files = sorted(root.glob("bbox_test/*/*.jpg"))
    assert len(splits["train"]) == len(train_files)
    assert {r.identity for r in splits["train"]} == {int(p.parent.name) for p in train_files}
    assert len(splits["query"]) + len(splits["gallery"]) == len(test_files)
    # the rule: one query per (identity, camera), the first frame of the lowest tracklet
    first: dict[tuple[int, int], tuple[int, int, str]] = {}
    for p in test_files:
        key = (int(p.name[:4]), int(p.name[5]) - 1)
        first[key] = min(first.get(key, (10**9, 0, "")), (int(p.name[7:11]), int(p.name[12:15]), p.name))
    assert sorted(Path(r.path).name for r in splits["query"]) == sorted(v[2] for v in first.values())
    assert not {r.path for r in splits["query"]} & {r.path for r in splits["gallery"]}
    assert all({"tracklet", "frame"} <= set(r.meta) for r in splits["query"])
    assert sorted({r.label for r in splits["train"]}) == list(range(16))
    assert {r.camera for r in splits["train"]} <= set(range(6))


def test_mars_junk_distractor_and_mismatched_folder(tmp_path):
    touch(tmp_path / "bbox_train" / "0001" / "0001C1T0001F001.jpg")
    for name in ("0002/0002C1T0001F001.jpg", "0002/0002C1T0001F002.jpg", "0002/0002C2T0003F005.jpg"):
        touch(tmp_path / "bbox_test" / name)
    touch(tmp_path / "bbox_test" / "00-1" / "00-1C3T0004F001.jpg")
    touch(tmp_path / "bbox_test" / "0000" / "0000C3T0005F001.jpg")
    splits = read_mars(tmp_path)
    assert [Path(r.path).name for r in splits["query"]] == ["0002C1T0001F001.jpg", "0002C2T0003F005.jpg"]
    assert sorted(r.identity for r in splits["gallery"]) == [0, 2]
    touch(tmp_path / "bbox_test" / "0002" / "0003C1T0001F001.jpg")
    with pytest.raises(ValueError, match=r"0003C1T0001F001\.jpg: the pid .* does not match its folder 0002"):
        read_mars(tmp_path)


# --- Grocery Store and plain folders -------------------------------------------------------------------


def test_grocery_store_matches_the_lists():
    root = shared_dataset("grocery_store")
    splits = read_records(DataConfig(reader="grocery", root=str(root)))
    base = root / "dataset"
    for split, name in (("train", "train.txt"), ("query", "val.txt")):
        lines = [line.split(",") for line in (base / name).read_text().splitlines() if line.strip()]
        assert [(Path(r.path), r.identity) for r in splits[split]] == [(base / p, int(f)) for p, f, _ in lines]
    classes = (base / "classes.csv").read_text().splitlines()[1:]
    assert len(splits["gallery"]) == len(classes) == 81
    assert {r.identity for r in splits["gallery"]} == set(range(81))
    assert all(Path(r.path).is_file() and "Iconic" in r.path for r in splits["gallery"])
    by_id = {r.identity: r.name for r in splits["gallery"]}
    assert by_id[0] == "Golden-Delicious" and all(r.name == by_id[r.identity] for r in splits["train"])
    assert sorted({r.label for r in splits["train"]}) == list(range(81))


def make_grocery(root: Path, train_line: str) -> Path:
    base = root / "dataset"
    header = "Class Name (str),Class ID (int),Coarse Class Name (str),Coarse Class ID (int),Iconic Image Path (str)"
    touch(base / "iconic" / "A.jpg")
    touch(base / "train" / "a1.jpg")
    (base / "classes.csv").write_text(f"{header}\nA,0,Fruit,0,/iconic/A.jpg\n")
    (base / "train.txt").write_text(train_line + "\n")
    (base / "val.txt").write_text("train/a1.jpg, 0, 0\n")
    return root


def test_grocery_bad_lists(tmp_path):
    assert len(read_grocery(make_grocery(tmp_path / "ok", "train/a1.jpg, 0, 0"))["train"]) == 1
    with pytest.raises(ValueError, match=r"train\.txt:1: class id 7 is not in classes\.csv"):
        read_grocery(make_grocery(tmp_path / "cls", "train/a1.jpg, 7, 0"))
    with pytest.raises(FileNotFoundError, match=r"train\.txt:1: image .*gone\.jpg does not exist"):
        read_grocery(make_grocery(tmp_path / "img", "train/gone.jpg, 0, 0"))


def test_folders_identities_shared_across_splits(tmp_path, caplog):
    for rel in ("train/cola/1.jpg", "train/cola/2.jpg", "train/milk/1.png", "gallery/milk/x.jpg", "gallery/tea/y.jpg"):
        touch(tmp_path / rel)
    (tmp_path / "train" / "empty").mkdir()
    with caplog.at_level(logging.WARNING):
        splits = read_records(DataConfig(reader="folders", root=str(tmp_path)))
    assert "class folder without images" in caplog.text
    ids = {r.name: r.identity for recs in splits.values() for r in recs}
    assert ids == {"cola": 0, "milk": 2, "tea": 3}  # sorted over all class names, "empty" included
    assert [r.label for r in splits["train"]] == [0, 0, 1]
    (tmp_path / "query" / "x").mkdir(parents=True)
    with pytest.raises(ValueError, match="split 'query' is empty"):
        read_folders(tmp_path)


# --- COCO retail ----------------------------------------------------------------------------------------


def make_coco(root: Path, scenes: list[dict] | None = None, anns: list[dict] | None = None) -> Path:
    """A tiny retail set: 2 scenes (id 1 train, id 2 test), 2 library images, 2 categories."""
    (root / "images").mkdir(parents=True)
    for name, size in (("s1.jpg", (64, 48)), ("s2.jpg", (64, 48)), ("l1.jpg", (32, 32)), ("l2.jpg", (32, 32))):
        Image.new("RGB", size, (90, 120, 30)).save(root / "images" / name)
    cats = [{"id": 1, "name": "cola"}, {"id": 2, "name": "milk"}]
    scenes = scenes or [
        {"id": 1, "file_name": "s1.jpg", "width": 64, "height": 48, "split": "train"},
        {"id": 2, "file_name": "s2.jpg", "width": 64, "height": 48, "split": "test"},
    ]
    anns = anns or [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 2, 20, 30]},
        {"id": 2, "image_id": 1, "category_id": 2, "bbox": [30, 4, 20, 30]},
        {"id": 3, "image_id": 2, "category_id": 2, "bbox": [5, 5, 10, 10]},
    ]
    library = [{"id": i, "file_name": f"l{i}.jpg", "width": 32, "height": 32} for i in (1, 2)]
    lib_anns = [{"id": i, "image_id": i, "category_id": i, "bbox": [1, 1, 30, 30]} for i in (1, 2)]
    (root / "query.json").write_text(json.dumps({"images": scenes, "annotations": anns, "categories": cats}))
    (root / "gallery.json").write_text(json.dumps({"images": library, "annotations": lib_anns, "categories": cats}))
    return root


def test_coco_splits(tmp_path):
    splits = read_records(DataConfig(reader="coco", root=str(make_coco(tmp_path))))
    assert [(r.identity, r.box) for r in splits["train"]] == [
        (1, (2, 2, 20, 30)),
        (2, (30, 4, 20, 30)),
        (1, (1, 1, 30, 30)),
        (2, (1, 1, 30, 30)),
    ]
    assert [r.label for r in splits["train"]] == [0, 1, 0, 1]
    assert [(r.identity, r.meta["annotation_id"], r.name) for r in splits["query"]] == [(2, 3, "milk")]
    assert [r.identity for r in splits["gallery"]] == [1, 2] and splits["gallery"][0].meta["source"] == "gallery.json"


def test_coco_held_out_rule_without_split_field(tmp_path):
    scenes = [{"id": i, "file_name": "s1.jpg", "width": 64, "height": 48} for i in (4, 5)]
    anns = [{"id": i, "image_id": i, "category_id": 1, "bbox": [1, 1, 8, 8]} for i in (4, 5)]
    splits = read_coco(make_coco(tmp_path, scenes, anns))
    assert [r.meta["image_id"] for r in splits["query"]] == [5]  # every 5th image id is held out


def bad_case(tmp_path: Path, ann: dict | None = None, scene: dict | None = None) -> Path:
    scenes = [{"id": 1, "file_name": "s1.jpg", "width": 64, "height": 48, "split": "train"}]
    scenes.append(scene or {"id": 2, "file_name": "s2.jpg", "width": 64, "height": 48, "split": "test"})
    anns = [{"id": 1, "image_id": 2, "category_id": 2, "bbox": [5, 5, 10, 10]}]
    anns.append(ann or {"id": 9, "image_id": 1, "category_id": 1, "bbox": [2, 2, 20, 30]})
    return make_coco(tmp_path, scenes, anns)


def test_coco_unknown_category(tmp_path):
    root = bad_case(tmp_path, ann={"id": 9, "image_id": 1, "category_id": 42, "bbox": [2, 2, 20, 30]})
    with pytest.raises(ValueError, match=r"query\.json: annotation 9 has unknown category_id 42"):
        read_coco(root)


def test_coco_annotation_points_at_missing_image(tmp_path):
    root = bad_case(tmp_path, ann={"id": 9, "image_id": 77, "category_id": 1, "bbox": [2, 2, 20, 30]})
    with pytest.raises(ValueError, match=r"query\.json: annotation 9 points at image id 77"):
        read_coco(root)


def test_coco_missing_image_file(tmp_path):
    root = bad_case(tmp_path, scene={"id": 2, "file_name": "gone.jpg", "width": 64, "height": 48, "split": "test"})
    with pytest.raises(FileNotFoundError, match=r"query\.json: image id 2 file .*gone\.jpg does not exist"):
        read_coco(root)


@pytest.mark.parametrize(
    "bbox, why",
    [([2, 2, 0, 10], "zero width"), ([2, 2, 10, -5], "negative height"), ([70, 2, 10, 10], "wholly outside")],
)
def test_coco_box_without_area_is_skipped_and_counted(tmp_path, caplog, bbox, why):
    root = bad_case(tmp_path, ann={"id": 9, "image_id": 1, "category_id": 1, "bbox": bbox})
    skipped: dict[str, list[str]] = {}
    with caplog.at_level(logging.WARNING):
        splits = read_coco(root, skipped=skipped)
    assert skipped["box with no area inside its image"] == [f"query.json annotation 9 bbox={bbox}"], why
    assert "skipped 1 record(s): box with no area" in caplog.text and "annotation 9" in caplog.text
    assert all(r.meta["annotation_id"] != 9 for r in splits["train"])


def test_coco_box_partly_outside_is_clipped(tmp_path, caplog):
    root = bad_case(tmp_path, ann={"id": 9, "image_id": 1, "category_id": 1, "bbox": [-4, 40, 20, 30]})
    with caplog.at_level(logging.WARNING):
        rec = next(r for r in read_coco(root)["train"] if r.meta["annotation_id"] == 9)
    assert rec.box == (0.0, 40.0, 16.0, 8.0) and rec.meta["clipped"] is True
    assert "clipped 1 box(es)" in caplog.text


def test_coco_empty_split(tmp_path):
    root = bad_case(tmp_path, scene={"id": 2, "file_name": "s2.jpg", "width": 64, "height": 48, "split": "train"})
    with pytest.raises(ValueError, match=r"split 'query' is empty"):
        read_coco(root)


def test_coco_corrupt_jpeg_without_size(tmp_path):
    root = bad_case(tmp_path, scene={"id": 2, "file_name": "s2.jpg", "split": "test"})  # size must be read
    (root / "images" / "s2.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated garbage")
    with pytest.raises(ValueError, match=r"query\.json: image id 2 file .*s2\.jpg cannot be read"):
        read_coco(root)


def test_coco_duplicate_ids_bad_json_and_bad_split(tmp_path):
    root = bad_case(tmp_path, ann={"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 2, 20, 30]})
    with pytest.raises(ValueError, match=r"query\.json: annotation id 1 appears twice"):
        read_coco(root)
    (root / "gallery.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"gallery\.json: not valid JSON"):
        read_coco(root)
    root2 = bad_case(tmp_path / "b", scene={"id": 2, "file_name": "s2.jpg", "width": 64, "height": 48, "split": "val"})
    with pytest.raises(ValueError, match=r"image id 2 has split 'val'"):
        read_coco(root2)
