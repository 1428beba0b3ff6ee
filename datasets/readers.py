"""``read_records(data)``: the reader named by ``data.reader`` (a key of ``READERS``) and its splits of records."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from datasets.coco import read_coco
from datasets.folders import read_folders, read_grocery
from datasets.market1501 import read_market1501
from datasets.mars import read_mars
from datasets.records import Record
from datasets.sample import ensure_sample

Splits = dict[str, list[Record]]

# data.reader picks one of these (the config schema validates against this dict); each takes the data config
# section and, for the COCO readers, a dict that receives the annotations left out on purpose
READERS: dict[str, Callable[[Any, dict | None], Splits]] = {
    "sample": lambda data, skipped: read_coco(ensure_sample(data.root), title="sample", skipped=skipped),
    "coco": lambda data, skipped: read_coco(data.root, skipped=skipped),
    "market1501": lambda data, skipped: read_market1501(data.root),
    "mars": lambda data, skipped: read_mars(data.root),
    "grocery": lambda data, skipped: read_grocery(data.root, query=data.query_split),
    "folders": lambda data, skipped: read_folders(data.root),
}


def read_records(data, skipped: dict[str, list[str]] | None = None) -> Splits:
    """Records of every split of ``data.root`` read by ``data.reader`` (a ``configs.DataConfig``).

    ``skipped`` (optional) receives the annotations the COCO readers leave out, by reason (boxes with no
    area inside their image, ...), so that ``datasets.prepare`` can record them in the manifest.
    """
    if data.reader not in READERS:
        raise ValueError(f"data.reader={data.reader!r} is not valid; choose one of {sorted(READERS)}")
    return READERS[data.reader](data, skipped)
