"""Reader for MARS-style video ReID trees: ``bbox_{train,test}/PPPP/PPPPCcTttttFfff.jpg`` as image records.

Split rule (deterministic, image-based): train = every image of ``bbox_train``. In ``bbox_test``, for each
(identity, camera) the first frame of its lowest-numbered tracklet is a query; every other image is
gallery. Junk (pid -1, folder ``00-1``) is dropped everywhere; distractors (pid 0) are gallery only.
Cameras are 0-based; meta holds ``tracklet`` and ``frame``.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

from datasets.records import Record, assign_labels, finish_splits, list_images, log_skips, require_dir

NAME_RE = re.compile(r"^(?P<pid>00-1|-?\d+)C(?P<cam>\d)T(?P<tracklet>\d+)F(?P<frame>\d+)$")
JUNK, DISTRACTOR = -1, 0


def parse_name(path: Path) -> tuple[int, int, int, int]:
    """(pid, 0-based camera, tracklet, frame) from a MARS file name; ValueError naming the file."""
    match = NAME_RE.match(path.stem)
    if match is None or int(match["cam"]) < 1:
        raise ValueError(f"{path}: file name does not follow PPPPCcTttttFfff.jpg (MARS, camera >= 1)")
    pid = JUNK if match["pid"] == "00-1" else int(match["pid"])  # MARS writes junk as 00-1
    return pid, int(match["cam"]) - 1, int(match["tracklet"]), int(match["frame"])


def read_tree(folder: Path, split: str, skipped: dict[str, list[str]]) -> list[Record]:
    """Records of all ``folder/PPPP/*.jpg``, sorted by (pid, camera, tracklet, frame); junk dropped, counted."""
    records = []
    for pid_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        for path in list_images(pid_dir):
            pid, cam, tracklet, frame = parse_name(path)
            if not path.name.startswith(pid_dir.name + "C"):
                raise ValueError(f"{path}: the pid in the file name does not match its folder {pid_dir.name}")
            if pid == JUNK:
                skipped["junk (pid -1)"].append(path.name)
                continue
            meta = {"tracklet": tracklet, "frame": frame}
            records.append(Record(path=str(path), identity=pid, camera=cam, split=split, meta=meta))
    records.sort(key=lambda r: (r.identity, r.camera, r.meta["tracklet"], r.meta["frame"]))
    return records


def split_query_gallery(test: list[Record]) -> tuple[list[Record], list[Record]]:
    """The documented rule: first frame of the first tracklet per (identity, camera) is the query."""
    query, gallery, seen = [], [], set()
    for rec in test:  # sorted by (pid, camera, tracklet, frame)
        key = (rec.identity, rec.camera)
        if rec.identity != DISTRACTOR and key not in seen:
            seen.add(key)
            query.append(replace(rec, split="query"))
        else:
            gallery.append(replace(rec, split="gallery"))
    return query, gallery


def read_mars(root: str | Path, title: str = "MARS") -> dict[str, list[Record]]:
    """Splits train/query/gallery of a MARS-style tree under ``root``."""
    root = require_dir(root, "MARS root")
    skipped: dict[str, list[str]] = defaultdict(list)
    train = read_tree(require_dir(root / "bbox_train", "MARS train split"), "train", skipped)
    for rec in train:
        if rec.identity == DISTRACTOR:
            skipped["distractor (pid 0) in bbox_train"].append(Path(rec.path).name)
    train, _ = assign_labels([r for r in train if r.identity != DISTRACTOR])
    test = read_tree(require_dir(root / "bbox_test", "MARS test split"), "gallery", skipped)
    query, gallery = split_query_gallery(test)
    log_skips(root, skipped)
    return finish_splits({"train": train, "query": query, "gallery": gallery}, root, title)
