"""The shard format: deterministic webdataset tar writer, manifest.json, and shard verification/reading.

A shard folder holds ``{split}-{index:05d}.tar`` files (``KEY.jpg`` + ``KEY.json`` per sample, samples in
index order) and ``manifest.json``, which is written last and atomically; see ``datasets.prepare``.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import secrets
import tarfile
from collections.abc import Iterator
from pathlib import Path

import webdataset as wds
from webdataset.tariterators import group_by_keys, tar_file_expander

from datasets.shardguard import await_writer

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
SPLIT_KEYS = ("count", "num_classes", "classes", "class_counts", "labels", "shards", "skipped")


def shard_name(split: str, index: int) -> str:
    """File name of shard ``index`` of ``split``."""
    return f"{split}-{index:05d}.tar"


def sample_key(split: str, index: int) -> str:
    """Tar key of a sample (no dots: webdataset splits the extension at the first dot)."""
    return f"{split}_{index:08d}"


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def temp_name(name: str) -> str:
    """A hidden temporary name for ``name`` that no other writer uses (pid + random), removed by remove_stale."""
    return f".{name}.{os.getpid()}-{secrets.token_hex(4)}.tmp"


def write_json_atomic(path: Path, data: dict) -> None:
    """Write JSON to ``path`` through a temporary file, fsync and an atomic rename."""
    tmp = path.with_name(temp_name(path.name))
    try:
        with open(tmp, "w") as fh:
            fh.write(json.dumps(data, indent=1, sort_keys=True) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class ShardSink:
    """Writes one split's samples into fixed-size shards; each shard is renamed into place only when complete."""

    def __init__(self, out_dir: Path, split: str, shard_size: int) -> None:
        self.out_dir, self.split, self.shard_size = out_dir, split, shard_size
        self.shards: list[dict] = []
        self.count = 0
        self._writer: wds.TarWriter | None = None
        self._file = None
        self._tmp: Path | None = None
        self._in_shard = 0

    def write(self, jpg: bytes, meta: dict) -> None:
        """Append one sample; ``meta["index"]`` must be the running sample count."""
        if self._writer is None:
            self._tmp = self.out_dir / temp_name(shard_name(self.split, len(self.shards)))
            self._file = open(self._tmp, "wb")  # noqa: SIM115 - closed in _close_shard
            # fixed owner, mode, int mtime (a float adds a PAX header per member): byte-identical tars on re-runs
            self._writer = wds.TarWriter(self._file, user="detretr", group="detretr", mode=0o444, mtime=0)
        body = json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()
        try:
            self._writer.write({"__key__": sample_key(self.split, meta["index"]), "jpg": jpg, "json": body})
        except BaseException:
            self.abort()
            raise
        self.count += 1
        self._in_shard += 1
        if self._in_shard == self.shard_size:
            self._close_shard()

    def abort(self) -> None:
        """Drop the shard being written after a failed write (a full disk): close it and remove its temp file."""
        try:
            self._writer.close()
        except (OSError, ValueError):  # a full disk fails the tar's end blocks as well; the file goes anyway
            pass
        self._file.close()
        self._tmp.unlink(missing_ok=True)
        self._writer, self._file, self._in_shard = None, None, 0

    def _close_shard(self) -> None:
        self._writer.close()
        self._file.close()
        name = shard_name(self.split, len(self.shards))
        final = self.out_dir / name
        os.replace(self._tmp, final)
        first = self.count - self._in_shard
        members = index_members(final, self.split, first, self._in_shard)
        entry = {"file": name, "count": self._in_shard, "first_index": first, "sha256": sha256_file(final)}
        self.shards.append({**entry, "members": members})
        self._writer, self._file, self._in_shard = None, None, 0

    def close(self) -> list[dict]:
        """Finish the last shard and return the shard entries of the manifest."""
        if self._writer is not None:
            self._close_shard()
        return self.shards


def index_members(path: str | Path, split: str, first: int, count: int) -> list[list[int]]:
    """Where each sample's members lie in a shard: ``[jpg offset, jpg size, json offset, json size]`` in bytes.

    Read from the tar headers (Python's ``tarfile``), so random access by sample index needs no scan at training
    time; a shard whose members are not the samples ``first .. first + count - 1`` in order is a ValueError.
    """
    members: dict[str, dict[str, tuple[int, int]]] = {}
    with tarfile.open(path, "r:") as tar:
        for info in tar:
            key, _, ext = info.name.partition(".")
            members.setdefault(key, {})[ext] = (info.offset_data, info.size)
    expected = [sample_key(split, first + i) for i in range(count)]
    if list(members) != expected or any(set(m) != {"jpg", "json"} for m in members.values()):
        raise ValueError(f"shard {path}: members are not the samples {expected[:1]}..{expected[-1:]} as jpg + json")
    return [[*members[k]["jpg"], *members[k]["json"]] for k in expected]


def remove_stale(out_dir: Path, keep: set[str], splits: list[str]) -> None:
    """Delete shards of the written splits that the new manifest does not list, and leftover temp files."""
    for path in sorted(out_dir.iterdir()):
        stale_shard = path.suffix == ".tar" and path.name.rsplit("-", 1)[0] in splits and path.name not in keep
        if stale_shard or path.name.endswith(".tmp"):
            log.info("removing stale %s", path)
            path.unlink()


def read_manifest(shards_dir: str | Path, wait_s: float = 0.0) -> dict:
    """Load and validate ``shards_dir/manifest.json``; a clear error when it is missing or malformed.

    A prepare still writing the folder is awaited up to ``wait_s`` seconds (``data.shards_wait_s``), then
    ``ShardsBusy`` names the folder and the writer.
    """
    await_writer(shards_dir, wait_s)
    path = Path(shards_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"no shard manifest at {path}: run `python -m datasets.prepare --config NAME` to write the shards "
            "(an interrupted run leaves no manifest)"
        )
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
    if manifest.get("version") != FORMAT_VERSION or not isinstance(manifest.get("splits"), dict):
        raise ValueError(f"{path}: unsupported manifest (version {manifest.get('version')!r}, need {FORMAT_VERSION})")
    for split, entry in manifest["splits"].items():
        missing = [k for k in SPLIT_KEYS if k not in entry]
        if missing:
            raise ValueError(f"{path}: split {split!r} lacks keys {missing}")
        if sum(s["count"] for s in entry["shards"]) != entry["count"] or len(entry["labels"]) != entry["count"]:
            raise ValueError(f"{path}: split {split!r} shard counts/labels do not add up to count={entry['count']}")
    return manifest


def split_entry(manifest: dict, split: str, shards_dir: str | Path) -> dict:
    """The manifest entry of ``split``, or a clear error listing the splits there are."""
    if split not in manifest["splits"]:
        raise ValueError(
            f"split {split!r} is not in {Path(shards_dir) / MANIFEST}; it has {sorted(manifest['splits'])}"
        )
    return manifest["splits"][split]


def verify_shards(shards_dir: str | Path, split: str | None = None) -> int:
    """Check every shard (of ``split``, or all) exists and matches its manifest sha256; return shards checked."""
    manifest = read_manifest(shards_dir)
    splits = [split] if split else sorted(manifest["splits"])
    checked = 0
    for name in splits:
        for shard in split_entry(manifest, name, shards_dir)["shards"]:
            path = Path(shards_dir) / shard["file"]
            if not path.is_file():
                raise FileNotFoundError(f"shard {path} listed in the manifest is missing")
            digest = sha256_file(path)
            if digest != shard["sha256"]:
                raise ValueError(f"shard {path} is corrupt: sha256 {digest} != manifest {shard['sha256']}")
            checked += 1
    return checked


def open_verified(path: Path, shard: dict) -> io.BytesIO:
    """Read a whole shard into memory and check its sha256 against the manifest (cheap next to decoding)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"shard {path} listed in the manifest is missing") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != shard["sha256"]:
        raise ValueError(
            f"shard {path} is corrupt or truncated: sha256 {digest[:12]}... != manifest {shard['sha256'][:12]}... "
            f"({len(data)} bytes); re-run datasets.prepare"
        )
    return io.BytesIO(data)


def iter_shard(shards_dir: str | Path, shard: dict, verify: bool = True) -> Iterator[dict]:
    """Samples ``{"__key__", "jpg": bytes, "json": bytes}`` of one shard, through webdataset's tar iterators.

    A shard that is truncated, corrupt or holds a different number of samples than the manifest says is a
    ValueError naming the shard.
    """
    path = Path(shards_dir) / shard["file"]
    stream = open_verified(path, shard) if verify else open(path, "rb")  # noqa: SIM115 - closed below

    def fail(exn: Exception) -> bool:
        raise ValueError(f"tar shard {path} is corrupt or truncated: {exn.args[0] if exn.args else exn!r}") from exn

    try:
        files = tar_file_expander([{"url": str(path), "stream": stream}], handler=fail)
        count = 0
        for sample in group_by_keys(files, handler=fail):
            if "jpg" not in sample or "json" not in sample:
                raise ValueError(f"shard {path}: sample {sample['__key__']!r} lacks its .jpg or .json member")
            count += 1
            yield sample
        if count != shard["count"]:
            raise ValueError(f"shard {path} is truncated: {count} samples, manifest says {shard['count']}")
    finally:
        stream.close()
