"""Reader for the Market-1501 tree (and DukeMTMC-reID, same layout): pid and camera from each file name.

Official protocol: junk images (pid -1) are dropped everywhere; distractors (pid 0) are dropped from
train and query but kept in the gallery, where they are valid non-matching items. Train pids are
relabelled contiguously; query/gallery keep label -1 (evaluation compares identities and cameras).
Cameras are 0-based (``c1`` -> 0).
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

from datasets.records import Record, assign_labels, finish_splits, list_images, log_skips, require_dir

# Market-1501: 0002_c1s1_069056_02.jpg (pid, camera, sequence, frame, box); DukeMTMC-reID: 0005_c2_f0046985.jpg
NAME_RE = re.compile(r"^(?P<pid>-?\d+)_c(?P<cam>\d+)(?:s(?P<seq>\d+))?_f?(?P<frame>\d+)(?:_(?P<box>\d+))?$")
SPLIT_DIRS = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}
JUNK, DISTRACTOR = -1, 0
MARKET_CAMERAS, DUKE_CAMERAS = 6, 8
"""cameras of each dataset; the name pattern tells them apart (Market names carry a sequence ``sS``)"""


def parse_name(path: Path) -> tuple[int, int, dict[str, int]]:
    """(pid, 0-based camera, meta) from a Market-1501 / DukeMTMC-reID file name; ValueError naming the file."""
    match = NAME_RE.match(path.stem)
    if match is None:
        raise ValueError(
            f"{path}: file name does not follow PPPP_cCsS_FFFFFF_NN.jpg (Market-1501) or PPPP_cC_fFFFFFFF.jpg (Duke)"
        )
    cam = int(match["cam"])
    dataset, cameras = ("Market-1501", MARKET_CAMERAS) if match["seq"] is not None else ("DukeMTMC-reID", DUKE_CAMERAS)
    if not 1 <= cam <= cameras:
        raise ValueError(f"{path}: camera c{cam} does not exist in {dataset}, which has cameras c1..c{cameras}")
    meta = {"frame": int(match["frame"])}
    if match["seq"] is not None:
        meta["sequence"] = int(match["seq"])
    return int(match["pid"]), cam - 1, meta


def read_split(folder: Path, split: str, skipped: dict[str, list[str]]) -> list[Record]:
    """Records of one split folder, applying the protocol's junk/distractor rule (drops are counted)."""
    records = []
    for path in list_images(folder):
        pid, cam, meta = parse_name(path)
        if pid == JUNK:
            skipped["junk (pid -1)"].append(path.name)
            continue
        if pid == DISTRACTOR and split != "gallery":
            skipped[f"distractor (pid 0) outside the gallery ({split})"].append(path.name)
            continue
        records.append(Record(path=str(path), identity=pid, camera=cam, split=split, meta=meta))
    return records


def read_market1501(root: str | Path, title: str = "Market1501") -> dict[str, list[Record]]:
    """Splits train/query/gallery of a Market-1501-style tree under ``root``."""
    root = require_dir(root, "Market-1501 root")
    skipped: dict[str, list[str]] = defaultdict(list)
    splits = {}
    for split, sub in SPLIT_DIRS.items():
        folder = require_dir(root / sub, f"Market-1501 {split} split")
        splits[split] = read_split(folder, split, skipped)
    splits["train"], _ = assign_labels(splits["train"])
    log_skips(root, skipped)
    return finish_splits(splits, root, title)
