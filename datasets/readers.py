"""`read_records(data)`: pick the reader named by ``data.reader`` and return its splits of plain records.

Also holds the small checks every reader shares (directory present, no empty split, statistics logged).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from datasets.records import Record, stats_table

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


def read_records(data, skipped: dict[str, list[str]] | None = None) -> dict[str, list[Record]]:
    """Records of every split of ``data.root`` read by ``data.reader`` (a ``configs.DataConfig``).

    ``skipped`` (optional) receives the annotations the COCO readers leave out, by reason (boxes with no
    area inside their image, ...), so that ``datasets.prepare`` can record them in the manifest.
    """
    root = data.root
    if data.reader == "sample":
        from datasets.coco import read_coco
        from datasets.sample import ensure_sample

        return read_coco(ensure_sample(root), title="sample", skipped=skipped)
    if data.reader == "coco":
        from datasets.coco import read_coco

        return read_coco(root, skipped=skipped)
    if data.reader == "market1501":
        from datasets.market1501 import read_market1501

        return read_market1501(root)
    if data.reader == "mars":
        from datasets.mars import read_mars

        return read_mars(root)
    if data.reader == "grocery":
        from datasets.folders import read_grocery

        return read_grocery(root, query=data.query_split)
    if data.reader == "folders":
        from datasets.folders import read_folders

        return read_folders(root)
    raise ValueError(f"data.reader={data.reader!r} is not valid; choose one of sample, coco, market1501, mars, ...")


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
