"""Random access into the tar shards by sample index, through the member offsets the manifest records.

``datasets.prepare`` records where each sample's ``.jpg`` and ``.json`` lie inside its shard. The training stream
reads a sample with one ``os.pread`` of that span, so its memory does not grow with the dataset: the OS page cache
keeps hot shards, and an optional per-process LRU (``data.cache_mb``) keeps recently read samples. Each shard's
sha256 is checked once per process before its first read. A manifest written before the index existed is rebuilt
in place with ``python -m datasets.shard_index SHARDS_DIR``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from datasets.shardguard import writer_lock
from datasets.shards import MANIFEST, index_members, read_manifest, sha256_file, write_json_atomic

log = logging.getLogger(__name__)

OPEN_FILES = 64  # shard files a reader keeps open (least recently used ones are closed)
_VERIFIED: set[tuple[str, str]] = set()  # (path, sha256) checked in this process (inherited by forked workers)


def member_table(entry: dict, split: str, shards_dir: str | Path) -> np.ndarray:
    """int64 ``[count, 5]``: shard number, jpg offset, jpg size, json offset, json size of every sample."""
    missing = [s["file"] for s in entry["shards"] if "members" not in s]
    if missing:
        raise ValueError(
            f"{Path(shards_dir) / MANIFEST}: split {split!r} has no sample index (written by an older version; "
            f"{len(missing)} shards, e.g. {missing[0]}): re-run `python -m datasets.prepare --config NAME`, or add "
            f"the index in place with `python -m datasets.shard_index {shards_dir}`"
        )
    table = np.empty((entry["count"], 5), dtype=np.int64)
    for number, shard in enumerate(entry["shards"]):
        rows = slice(shard["first_index"], shard["first_index"] + shard["count"])
        table[rows, 0] = number
        table[rows, 1:] = np.asarray(shard["members"], dtype=np.int64).reshape(shard["count"], 4)
    return table


def verify_once(shards_dir: str | Path, shards: Sequence[dict], threads: int = 4) -> int:
    """Check the sha256 of every shard not yet checked by this process; return how many were checked now."""
    todo = [(Path(shards_dir) / s["file"], s["sha256"]) for s in shards]
    todo = [(p, sha) for p, sha in todo if (str(p.resolve()), sha) not in _VERIFIED]

    def check(item: tuple[Path, str]) -> None:
        path, expected = item
        if not path.is_file():
            raise FileNotFoundError(f"shard {path} listed in the manifest is missing")
        digest = sha256_file(path)
        if digest != expected:
            raise ValueError(
                f"shard {path} is corrupt or truncated: sha256 {digest[:12]}... != manifest {expected[:12]}... "
                f"({path.stat().st_size} bytes); re-run datasets.prepare"
            )

    with ThreadPoolExecutor(max(1, min(threads, len(todo)))) as pool:  # hashlib releases the GIL on large blocks
        list(pool.map(check, todo))
    _VERIFIED.update((str(p.resolve()), sha) for p, sha in todo)
    return len(todo)


class SampleReader:
    """Reads samples ``(jpg bytes, metadata)`` by index from verified shards; open files and cache are bounded."""

    def __init__(self, shards_dir: str | Path, shards: Sequence[dict], table: np.ndarray, cache_mb: int = 0) -> None:
        self.paths = [str(Path(shards_dir) / s["file"]) for s in shards]
        self.table = table
        self.files: OrderedDict[int, int] = OrderedDict()  # shard number -> file descriptor
        self.cache: OrderedDict[int, tuple[bytes, dict]] = OrderedDict()
        self.cache_left = self.cache_limit = cache_mb * 2**20
        self.pid = os.getpid()

    def read(self, index: int) -> tuple[bytes, dict]:
        hit = self.cache.get(index)
        if hit is not None:
            self.cache.move_to_end(index)
            return hit
        shard, jpg_at, jpg_size, json_at, json_size = (int(v) for v in self.table[index])
        span = os.pread(self._fd(shard), json_at + json_size - jpg_at, jpg_at)  # jpg, json header, json: adjacent
        try:
            meta = json.loads(span[json_at - jpg_at :])
        except (json.JSONDecodeError, UnicodeDecodeError):
            meta = {}
        if len(span) != json_at + json_size - jpg_at or meta.get("index") != index:
            raise ValueError(
                f"shard {self.paths[shard]}: sample {index} is not where the manifest says (the shard changed after "
                "it was verified?); re-run datasets.prepare"
            )
        item = (span[:jpg_size], meta)
        self._keep(index, item)
        return item

    def _keep(self, index: int, item: tuple[bytes, dict]) -> None:
        size = len(item[0]) + 512  # the bytes plus about what the metadata dict costs
        if size > self.cache_limit:
            return
        while self.cache and size > self.cache_left:
            _, (jpg, _meta) = self.cache.popitem(last=False)
            self.cache_left += len(jpg) + 512
        self.cache[index] = item
        self.cache_left -= size

    def _fd(self, shard: int) -> int:
        if self.pid != os.getpid():  # a forked worker: the parent's descriptors stay the parent's to close
            self.files.clear()
            self.pid = os.getpid()
        fd = self.files.get(shard)
        if fd is not None:
            self.files.move_to_end(shard)
            return fd
        try:
            fd = os.open(self.paths[shard], os.O_RDONLY)
        except FileNotFoundError:
            raise FileNotFoundError(f"shard {self.paths[shard]} listed in the manifest is missing") from None
        self.files[shard] = fd
        if len(self.files) > OPEN_FILES:
            os.close(self.files.popitem(last=False)[1])
        return fd

    def close(self) -> None:
        if self.pid == os.getpid():
            for fd in self.files.values():
                os.close(fd)
        self.files.clear()


def add_index(shards_dir: str | Path) -> int:
    """Add the sample index to a manifest written without one (shards verified first); return shards indexed.

    The manifest is read, indexed and rewritten under the folder's writer lock, so a prepare cannot start in
    between and have its new manifest replaced by this old one.
    """
    with writer_lock(shards_dir, command="datasets.shard_index"):
        manifest = read_manifest(shards_dir)
        done = 0
        for split, entry in manifest["splits"].items():
            todo = [s for s in entry["shards"] if "members" not in s]
            verify_once(shards_dir, todo)
            for shard in todo:
                shard["members"] = index_members(
                    Path(shards_dir) / shard["file"], split, shard["first_index"], shard["count"]
                )
                done += 1
        if done:
            write_json_atomic(Path(shards_dir) / MANIFEST, manifest)
    return done


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m datasets.shard_index", description=add_index.__doc__)
    parser.add_argument("shards", help="shard folder holding manifest.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    done = add_index(args.shards)
    log.info("indexed %d shard(s) in %s", done, Path(args.shards) / MANIFEST)
    return done


if __name__ == "__main__":
    main()
