"""The plain record every reader returns, the seed's dataset statistics table, and the checks readers share
(directory present, no empty split, skipped records reported)."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


@dataclass(frozen=True)
class Record:
    """One object to crop: an image file, an optional box, and who/what it shows."""

    path: str
    """image file (absolute, or relative to the reader root)"""
    identity: int
    """original person id / product category id (-1 = junk, 0 = distractor in Market-1501)"""
    camera: int = -1
    """camera index, -1 when unknown"""
    box: tuple[float, float, float, float] | None = None
    """[x, y, w, h] in pixels; None = the whole image"""
    split: str = "train"
    """split name: train, query, gallery, ..."""
    label: int = -1
    """contiguous class index within the split's label space (-1 = not a training class)"""
    name: str = ""
    """human-readable class name, when the source has one"""
    meta: Mapping[str, object] = field(default_factory=dict)
    """extra source fields kept in the shard json (image id, annotation id, tracklet, ...)"""

    def __post_init__(self) -> None:
        # identities and cameras become int64 tensors in the data loader: check here, where the file is known
        for key in ("identity", "camera", "label"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or not INT64_MIN <= value <= INT64_MAX:
                raise ValueError(f"{self.path}: {key} {value!r} is not an integer that fits in 64 bits")


def assign_labels(records: Sequence[Record]) -> tuple[list[Record], list[int]]:
    """Give records contiguous labels by sorted identity; return them and the label -> identity list."""
    identities = sorted({r.identity for r in records})
    index = {pid: i for i, pid in enumerate(identities)}
    from dataclasses import replace

    return [replace(r, label=index[r.identity]) for r in records], identities


def split_stats(records: Iterable[Record]) -> tuple[int, int, int]:
    """(# identities, # images, # cameras) of a split; images count distinct (path, box) samples."""
    recs = list(records)
    ids = {r.identity for r in recs}
    cams = {r.camera for r in recs if r.camera >= 0}
    return len(ids), len(recs), len(cams)


def stats_table(splits: Mapping[str, Sequence[Record]], title: str = "") -> str:
    """The seed's statistics table: subset | # ids | # images | # cameras."""
    rule = "  " + "-" * 40
    lines = [f"=> {title} loaded" if title else "", "Dataset statistics:", rule]
    lines.append("  subset   | # ids | # images | # cameras")
    lines.append(rule)
    for name, recs in splits.items():
        n_ids, n_img, n_cam = split_stats(recs)
        lines.append(f"  {name:<8} | {n_ids:5d} | {n_img:8d} | {n_cam:9d}")
    lines.append(rule)
    return "\n".join(line for line in lines if line or title)


def require_dir(path: str | Path, what: str) -> Path:
    """``path`` as an absolute Path, or FileNotFoundError saying which dataset part is missing."""
    path = Path(os.path.abspath(path))
    if not path.is_dir():
        raise FileNotFoundError(f"{what}: directory {path} does not exist")
    return path


def list_images(folder: Path) -> list[Path]:
    """Image files directly in ``folder``, sorted by name (other files such as Thumbs.db are ignored)."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def finish_splits(splits: Mapping[str, Sequence[Record]], source: str | Path, title: str) -> dict[str, list[Record]]:
    """Check that no split is empty (ValueError naming ``source`` and the split), log the stats table."""
    for name, recs in splits.items():
        if not recs:
            raise ValueError(f"{source}: split {name!r} is empty (no usable records)")
    log.info("%s", stats_table(splits, title=title))
    return {name: list(recs) for name, recs in splits.items()}


def log_skips(source: str | Path, skipped: Mapping[str, Sequence[str]]) -> None:
    """Report records left out on purpose (junk ids, degenerate boxes ...): counts plus a few examples."""
    for reason, items in skipped.items():
        if items:
            examples = ", ".join(items[:3]) + (" ..." if len(items) > 3 else "")
            log.warning("%s: skipped %d record(s): %s (e.g. %s)", source, len(items), reason, examples)
