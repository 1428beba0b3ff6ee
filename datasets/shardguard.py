"""Guards of a shards folder: one writer at a time, no reading while it is written, no silent replacement.

The writer lock is ``flock`` on ``SHARDS/.prepare.lock``; the kernel releases it when the writer exits, even
by ``kill -9``, so a crash never leaves a stale lock. The holder writes who it is into the file, so that a
second writer and a reader (each waits up to its bound, then fails) can say which process is still writing.
A reader first waits until it can take the lock shared, which proves that no writer is at work, and lets it
go at once, so a reader never delays a writer; the lock is not held while the manifest is read. A prepare that
starts after that removes the manifest first and rewrites every shard: the training stream checks each shard's
sha256 against the manifest once per process when it starts, which catches a prepare that got in between. On NFS,
Linux maps ``flock`` onto byte-range locks, which the server arbitrates across hosts.

Every manifest records its ``source`` (reader and absolute root); writing another source into a folder that
holds a complete set is refused unless the caller asks for it (``--replace``).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

log = logging.getLogger(__name__)

LOCK_NAME = ".prepare.lock"
POLL_S = 0.5
SAY_EVERY_S = 30.0
_HELD: set[str] = set()  # folders whose lock this process holds (flock conflicts with a second open file)


class ShardsBusy(RuntimeError):
    """Another process is writing the shards folder."""


def _me() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname()}


def _holder_info(folder: Path) -> dict:
    try:
        return json.loads((folder / LOCK_NAME).read_text() or "{}")
    except (OSError, ValueError):
        return {}


def holder(folder: str | Path) -> str:
    """Who holds the lock of ``folder``, as written by the holder (best effort: it may be mid-write)."""
    info = _holder_info(Path(folder))
    if not info:
        return "another process"
    return f"pid {info.get('pid')} on {info.get('host')} ({info.get('command', '?')}, since {info.get('since', '?')})"


def _poll(fd: int, folder: Path, wait_s: float, mode: int, busy, waiting: str) -> float:
    """Take ``flock(fd, mode)``, polling while a writer holds the lock: say ``waiting`` every 30 s, and past
    ``wait_s`` raise ``ShardsBusy(busy(waited))``. Returns the seconds waited."""
    start, next_say = time.monotonic(), 0.0
    while True:
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
            return time.monotonic() - start
        except BlockingIOError:
            waited = time.monotonic() - start
            if waited >= wait_s:
                raise ShardsBusy(busy(waited)) from None
            if waited >= next_say:
                log.warning(waiting, folder, holder(folder), wait_s)
                next_say = waited + SAY_EVERY_S
            time.sleep(POLL_S)


def _acquire(fd: int, folder: Path, wait_s: float) -> None:
    def busy(waited: float) -> str:
        return (
            f"shards folder {folder} is being written by {holder(folder)}"
            + (f"; waited {wait_s:.0f} s" if wait_s else "")
            + ". Wait for it to finish (datasets.prepare --wait SECONDS) or write elsewhere (data.shards=...)"
        )

    _poll(fd, folder, wait_s, fcntl.LOCK_EX, busy, "shards folder %s is being written by %s; waiting up to %.0f s")


@contextlib.contextmanager
def writer_lock(folder: str | Path, wait_s: float = 0.0, command: str = "datasets.prepare") -> Iterator[None]:
    """Hold the exclusive writer lock of ``folder`` (created if needed) for the ``with`` block; re-entrant.

    Another writer holding it: wait up to ``wait_s`` seconds (saying so every 30 s), then ``ShardsBusy``.
    """
    folder = Path(folder).resolve()
    if str(folder) in _HELD:
        yield
        return
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        _acquire(fd, folder, wait_s)
        info = {**_me(), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": command}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        _HELD.add(str(folder))
        try:
            yield
        finally:
            _HELD.discard(str(folder))
    finally:
        os.close(fd)  # closing releases the lock


WAIT_KEY = "data.shards_wait_s"


def await_writer(folder: str | Path, wait_s: float = 0.0) -> None:
    """Return once no other process holds the writer lock of ``folder`` (readers call this first).

    While one does, wait for it to finish up to ``wait_s`` seconds, saying so with the folder and the writer
    every 30 s; past that ``ShardsBusy`` names both. A folder without a lock file has never been written by a
    prepare (or is not ours to lock): nothing to wait for. The shared lock is let go at once, so a reader never
    delays a writer; a prepare that starts after this removes the manifest first and rewrites every shard, which
    the reader's sha256 check of each shard catches.
    """
    folder = Path(folder).resolve()
    if str(folder) in _HELD:
        return
    try:
        fd = os.open(folder / LOCK_NAME, os.O_RDONLY)
    except OSError:
        return
    try:
        _share(fd, folder, wait_s)
    finally:
        os.close(fd)  # closing releases the shared lock


def _share(fd: int, folder: Path, wait_s: float) -> None:
    def busy(waited: float) -> str:
        return (
            f"shards folder {folder} is still being written by {holder(folder)}"
            + (f"; waited {waited:.0f} s ({WAIT_KEY}={wait_s:g})" if wait_s else "")
            + f". Start once it has finished (its manifest is written last), or raise {WAIT_KEY}"
        )

    waiting = f"shards folder %s is being written by %s; waiting for it to finish (up to %.0f s, {WAIT_KEY})"
    waited = _poll(fd, folder, wait_s, fcntl.LOCK_SH, busy, waiting)
    if waited >= POLL_S:
        log.info("shards folder %s is complete after %.0f s; going on", folder, waited)


def describe(source: Mapping) -> str:
    return " ".join(f"{k}={v}" for k, v in sorted(source.items()))


def recorded_source(manifest: Mapping) -> dict:
    """The source of a manifest; older manifests recorded only ``settings.root``."""
    if "source" in manifest:
        return dict(manifest["source"])
    root = manifest.get("settings", {}).get("root")
    return {"root": os.path.abspath(root)} if root else {}


def check_source(folder: str | Path, manifest: Mapping | None, source: Mapping, replace: bool) -> None:
    """Refuse to write ``source`` over a complete set of another source in ``folder`` unless ``replace``."""
    if manifest is None or not source:
        return
    old = recorded_source(manifest)
    differs = {k: (old[k], source[k]) for k in old.keys() & source.keys() if old[k] != source[k]}
    if not differs:
        return
    if replace:
        log.warning("replacing the shards of %s in %s with %s (asked for)", describe(old), folder, describe(source))
        return
    raise FileExistsError(
        f"shards folder {folder} holds a complete set from {describe(old)}; this run's source is "
        f"{describe(source)}. Write it elsewhere (data.shards=...) or pass --replace to overwrite that set"
    )
