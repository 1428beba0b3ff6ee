"""A gallery bank on disk as numbered versions: ``BANK/v000001/{bank.pt, items.json, meta.json}`` and a
``BANK/CURRENT`` pointer.

A change writes a complete new version into a hidden temporary folder, fsyncs it, renames it into place,
and only then replaces ``CURRENT`` (atomic rename). A reader therefore always sees a complete version: the
previous one until the new one is whole, even when the writer is killed. Leftover temporary folders of
killed writers are removed by the next writer; writers take turns (``writer_lock``). The newest ``keep``
versions are kept.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from inference.bank import GalleryBank
from inference.retriever import Fingerprint

log = logging.getLogger(__name__)

CURRENT = "CURRENT"
FILES = ("bank.pt", "items.json", "meta.json")
ITEM_KEYS = ("identity", "name", "source", "box", "view")


@dataclass
class BankVersion:
    """One complete version: the searchable bank, one item dict per row (ITEM_KEYS), and what made it."""

    bank: GalleryBank
    items: list[dict]
    meta: dict
    version: int = 0
    path: Path | None = None

    @property
    def fingerprint(self) -> Fingerprint:
        return Fingerprint(**self.meta["fingerprint"])

    def check_retriever(self, fingerprint: Fingerprint) -> None:
        """ValueError unless the bank was built by the same checkpoint, config and embedding size."""
        mine = self.fingerprint
        if mine != fingerprint:
            raise ValueError(
                f"gallery bank {self.path} was built by another model ({mine.describe()}); the retriever is "
                f"{fingerprint.describe()}. Rebuild it with `python -m inference.gallery build` for this model"
            )

    def skus(self) -> dict[int, str]:
        return {int(it["identity"]): str(it["name"]) for it in self.items}


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, obj) -> None:
    with open(path, "w") as fh:
        json.dump(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())


def list_versions(root: str | Path) -> list[int]:
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(int(p.name[1:]) for p in root.iterdir() if p.is_dir() and p.name[:1] == "v" and p.name[1:].isdigit())


def current_version(root: str | Path) -> int:
    pointer = Path(root) / CURRENT
    if not pointer.is_file():
        raise FileNotFoundError(f"{root} is not a gallery bank (no {CURRENT}); build one with inference.gallery build")
    text = pointer.read_text().strip()
    if not (text[:1] == "v" and text[1:].isdigit()):
        raise ValueError(f"{pointer}: expected a version name like v000003, got {text!r}")
    return int(text[1:])


def version_dir(root: str | Path, version: int) -> Path:
    return Path(root) / f"v{version:06d}"


@contextmanager
def writer_lock(root: str | Path) -> Iterator[None]:
    """One writer at a time (an exclusive ``flock`` on ``BANK/.lock``, released by the OS if the writer dies):
    a second ``add`` would otherwise start from the same version and drop the first one's change."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"gallery bank {root} is being changed by another process; retry later") from None
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def write_version(root: str | Path, entry: BankVersion, keep: int = 5) -> int:
    """Write ``entry`` as the next version and point CURRENT at it; returns its number."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    if len(entry.items) != len(entry.bank):
        raise ValueError(f"{len(entry.items)} items for a bank of {len(entry.bank)} rows")
    if not len(entry.bank):
        raise ValueError(f"refusing to write an empty gallery bank to {root}")
    for stale in root.glob(".tmp-v*"):  # a writer killed before its rename
        shutil.rmtree(stale, ignore_errors=True)
    number = max(list_versions(root), default=0) + 1
    tmp = root / f".tmp-v{number:06d}-{os.getpid()}"
    tmp.mkdir()
    meta = dict(entry.meta, version=number, count=len(entry.bank))
    entry.bank.save(tmp / "bank.pt")
    _write_json(tmp / "items.json", entry.items)
    _write_json(tmp / "meta.json", meta)
    _fsync_dir(tmp)
    final = version_dir(root, number)
    os.rename(tmp, final)  # fails if another writer took this number: nothing is overwritten
    pointer = root / f".{CURRENT}.tmp{os.getpid()}"
    pointer.write_text(final.name + "\n")
    with open(pointer) as fh:
        os.fsync(fh.fileno())
    os.replace(pointer, root / CURRENT)
    _fsync_dir(root)
    for old in list_versions(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(version_dir(root, old), ignore_errors=True)
    entry.meta, entry.version, entry.path = meta, number, final
    log.info("gallery bank %s: version %d written (%d items)", root, number, len(entry.bank))
    return number


def read_version(root: str | Path, version: int | None = None) -> BankVersion:
    """The CURRENT (or the given) version; errors name the folder and what is wrong."""
    number = current_version(root) if version is None else version
    path = version_dir(root, number)
    missing = [f for f in FILES if not (path / f).is_file()]
    if missing:
        raise FileNotFoundError(f"gallery bank version {path} is incomplete or absent (missing {missing})")
    bank = GalleryBank.load(path / "bank.pt")
    items = json.loads((path / "items.json").read_text())
    meta = json.loads((path / "meta.json").read_text())
    if len(items) != len(bank):
        raise ValueError(f"{path}: items.json has {len(items)} entries but bank.pt has {len(bank)} rows")
    if not len(bank):
        raise ValueError(f"gallery bank {path} is empty: add SKUs before searching it")
    if "fingerprint" not in meta:
        raise ValueError(f"{path}/meta.json records no model fingerprint: not a bank made by inference.gallery")
    return BankVersion(bank, items, meta, number, path)


def index_note(kind: str) -> str:
    """What ``info`` says about changing a bank with this index."""
    return {
        "flat": "exact search; add appends, remove deletes rows in place",
        "ivf": "approximate (IVF); add appends to the trained lists, remove re-fills the lists from the stored "
        "embeddings (no retraining)",
        "hnsw": "approximate (HNSW graph); faiss HNSW cannot delete, so remove rebuilds the graph from the stored "
        "embeddings (time grows with the bank)",
    }[kind]


def add_rows(bank: GalleryBank, features, labels, identities, sources) -> GalleryBank:
    """A new bank: ``bank`` plus raw rows post-processed with the bank's own (already fitted) chain."""
    import torch

    new = GalleryBank.build(features, labels, identities, None, sources, bank.postprocess)
    out = GalleryBank(
        torch.cat([bank.features, new.features]),
        torch.cat([bank.labels, new.labels]),
        torch.cat([bank.identities, new.identities]),
        torch.cat([bank.cameras, new.cameras]),
        list(bank.sources) + list(new.sources),
        bank.postprocess,
    )
    if bank.index is not None:
        out.index = bank.index
        out.index.add(np.ascontiguousarray(new.features.numpy(), dtype=np.float32))
    return out


def keep_rows(bank: GalleryBank, keep: np.ndarray, kind: str) -> GalleryBank:
    """A new bank of the rows where ``keep`` is True; the index follows the rules of ``index_note``."""
    import torch

    mask = torch.from_numpy(keep)
    out = GalleryBank(
        bank.features[mask].contiguous(),
        bank.labels[mask],
        bank.identities[mask],
        bank.cameras[mask],
        [s for s, k in zip(bank.sources, keep) if k],
        bank.postprocess,
    )
    if bank.index is None:
        return out
    if kind == "flat":
        out.index = bank.index
        out.index.remove_ids(faiss.IDSelectorBatch(np.flatnonzero(~keep).astype(np.int64)))
    elif kind == "ivf":
        out.index = bank.index
        out.index.reset()  # keeps the trained centroids
        out.index.add(np.ascontiguousarray(out.features.numpy(), dtype=np.float32))
    else:
        out.build_index("hnsw")
    return out
