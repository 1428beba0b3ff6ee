"""Readers for identity folders: the Grocery Store layout (split lists + iconic library) and plain class folders.

Grocery Store (reader ``grocery``): ``dataset/{train,val,test}.txt`` lines ``path, fine id, coarse id``,
``dataset/classes.csv`` with one iconic image per class. Splits: train (train.txt), the query split
(``data.query_split``: ``query`` reads val.txt, any other name NAME reads NAME.txt, e.g. ``test`` for the
official test list), gallery (the iconic images, the product library). Identity = fine class id.
Plain folders (reader ``folders``): ``root/<split>/<class name>/*.jpg``; identity = index of the class
name among all class names of all splits (sorted), so a class keeps its identity across splits.
"""

from __future__ import annotations

import csv
import logging
from collections import defaultdict
from pathlib import Path

from datasets.records import Record, assign_labels, finish_splits, list_images, log_skips, require_dir

log = logging.getLogger(__name__)

CLASS_COLUMNS = {
    "name": "Class Name (str)",
    "id": "Class ID (int)",
    "coarse_name": "Coarse Class Name (str)",
    "coarse_id": "Coarse Class ID (int)",
    "iconic": "Iconic Image Path (str)",
}
DEFAULT_QUERY_LIST = "val"
"""the list read for the query split when ``data.query_split`` is ``query``"""


def read_classes(path: Path) -> dict[int, dict[str, str]]:
    """classes.csv as {fine id: row}; ValueError naming the file on missing columns or duplicate ids."""
    if not path.is_file():
        raise FileNotFoundError(f"Grocery Store class list {path} does not exist")
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    missing = [c for c in CLASS_COLUMNS.values() if rows and c not in rows[0]]
    if not rows or missing:
        raise ValueError(f"{path}: expected a header with columns {list(CLASS_COLUMNS.values())}; missing {missing}")
    classes: dict[int, dict[str, str]] = {}
    for line, row in enumerate(rows, start=2):
        cid = int(row[CLASS_COLUMNS["id"]])
        if cid in classes:
            raise ValueError(f"{path}:{line}: class id {cid} appears twice")
        classes[cid] = {key: row[col].strip() for key, col in CLASS_COLUMNS.items()}
    return classes


def read_list(path: Path, base: Path, split: str, classes: dict[int, dict[str, str]]) -> list[Record]:
    """Records of a split list (``path, fine id, coarse id`` per line); errors name the list file and line."""
    if not path.is_file():
        raise FileNotFoundError(f"Grocery Store split list {path} does not exist")
    records = []
    for line, text in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not text.strip():
            continue
        parts = [p.strip() for p in text.split(",")]
        if len(parts) < 2 or not parts[1].lstrip("-").isdigit():
            raise ValueError(f"{path}:{line}: expected 'path, fine id, coarse id', got {text!r}")
        fine = int(parts[1])
        if fine not in classes:
            raise ValueError(f"{path}:{line}: class id {fine} is not in classes.csv")
        image = base / parts[0]
        if not image.is_file():
            raise FileNotFoundError(f"{path}:{line}: image {image} does not exist")
        meta = {"coarse_id": int(classes[fine]["coarse_id"]), "coarse_name": classes[fine]["coarse_name"]}
        records.append(Record(str(image), fine, split=split, name=classes[fine]["name"], meta=meta))
    return records


def split_lists(base: Path) -> list[str]:
    """Names of the split lists (``NAME.txt``) in the dataset folder."""
    return sorted(p.stem for p in base.glob("*.txt") if p.is_file())


def read_grocery(root: str | Path, title: str = "GroceryStore", query: str = "query") -> dict[str, list[Record]]:
    """Splits train, ``query`` and gallery of the Grocery Store dataset (``root`` or ``root/dataset``).

    ``query`` names the query split and its list: ``query`` reads val.txt, another NAME reads NAME.txt.
    """
    root = require_dir(root, "Grocery Store root")
    base = root / "dataset" if (root / "dataset" / "classes.csv").is_file() else root
    classes = read_classes(base / "classes.csv")
    query_list = DEFAULT_QUERY_LIST if query == "query" else query
    lists = split_lists(base)
    if query_list not in lists:
        raise ValueError(
            f"{base}: data.query_split={query!r} needs the list {query_list}.txt, which is not there; the lists "
            f"here are {', '.join(f'{n}.txt' for n in lists)} (query = val.txt; name another list to use it)"
        )
    splits = {"train": read_list(base / "train.txt", base, "train", classes)}
    splits[query] = read_list(base / f"{query_list}.txt", base, query, classes)
    log.info("%s: query split %r from %s.txt (lists here: %s)", base, query, query_list, ", ".join(lists))
    gallery = []
    for cid, row in sorted(classes.items()):
        image = base / row["iconic"].lstrip("/")
        if not image.is_file():
            raise FileNotFoundError(f"{base / 'classes.csv'}: iconic image {image} of class {cid} does not exist")
        meta = {"coarse_id": int(row["coarse_id"]), "coarse_name": row["coarse_name"], "iconic": True}
        gallery.append(Record(str(image), cid, split="gallery", name=row["name"], meta=meta))
    splits["gallery"] = gallery
    splits["train"], _ = assign_labels(splits["train"])
    return finish_splits(splits, base, title)


def subdirs(folder: Path) -> list[Path]:
    """Visible sub-folders of ``folder``, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def read_folders(root: str | Path, title: str = "Folders") -> dict[str, list[Record]]:
    """Splits ``root/<split>/<class>/*.jpg``; the ``train`` split (if any) gets contiguous labels."""
    root = require_dir(root, "identity folders root")
    split_dirs = subdirs(root)
    if not split_dirs:
        raise ValueError(f"{root}: no split folders (expected root/<split>/<class name>/*.jpg)")
    class_dirs = {s.name: subdirs(s) for s in split_dirs}
    names = sorted({c.name for dirs in class_dirs.values() for c in dirs})
    identity = {name: i for i, name in enumerate(names)}
    splits, skipped = {}, defaultdict(list)
    for split, dirs in class_dirs.items():
        records = []
        for class_dir in dirs:
            images = list_images(class_dir)
            if not images:
                skipped["class folder without images"].append(str(class_dir.relative_to(root)))
            records += [Record(str(p), identity[class_dir.name], split=split, name=class_dir.name) for p in images]
        splits[split] = records
    if "train" in splits:
        splits["train"], _ = assign_labels(splits["train"])
    log_skips(root, skipped)
    return finish_splits(splits, root, title)
