"""Which rank runs where, and who stopped: rank files with heartbeats, and the failure record of a job.

Every task writes ``tasks/rank-R.json`` (host, address, pid) in the job folder and touches it every few
seconds. When a collective fails (a peer's connection closed, or ``train.dist_timeout_s`` ran out), a
surviving task names the lost rank from the peer address in the error, or else from the heartbeats that
stopped, and writes ``failures/<job>-<restart>.json`` once per allocation (the first survivor wins). The
launcher's ``--status`` reads these records together with SLURM's own account of how each task ended.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger(__name__)

HEARTBEAT_S = 5.0
STALE_S = 3 * HEARTBEAT_S
_ADDRESS = re.compile(r"\[?(\d{1,3}(?:\.\d{1,3}){3})\]?:\d+")


@dataclass
class RankInfo:
    rank: int
    host: str
    address: str
    pid: int
    restart: int


def _address(host: str) -> str:
    try:
        return socket.gethostbyname(host)
    except OSError:
        return ""


def write_json(path: Path, data: dict, exclusive: bool = False) -> bool:
    """Write ``data`` atomically; with ``exclusive`` only if ``path`` does not exist yet (False then)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    if not exclusive:
        tmp.replace(path)
        return True
    try:
        os.link(tmp, path)  # atomic create-if-absent, also on NFS
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)


class Heartbeat:
    """This task's rank file, touched every ``HEARTBEAT_S`` by a daemon thread until ``stop()``."""

    def __init__(self, folder: Path, rank: int, host: str, restart: int) -> None:
        self.path = folder / "tasks" / f"rank-{rank}.json"
        self.info = RankInfo(rank, host, _address(host), os.getpid(), restart)
        write_json(self.path, asdict(self.info))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError as exc:  # a full or unmounted filesystem must not kill training
                log.warning("heartbeat %s: %s", self.path, exc)

    def stop(self) -> None:
        self._stop.set()


def read_ranks(folder: Path) -> list[tuple[RankInfo, float]]:
    """(rank info, seconds since its last heartbeat) of every rank file in the job folder."""
    out = []
    for path in sorted((folder / "tasks").glob("rank-*.json")):
        try:
            info = RankInfo(**json.loads(path.read_text()))
            age = time.time() - path.stat().st_mtime
        except (OSError, ValueError, TypeError):
            continue
        out.append((info, age))
    return sorted(out, key=lambda item: item[0].rank)


def suspects(folder: Path, error: str, me: int, restart: int, wait_s: float = STALE_S) -> list[dict]:
    """The ranks that stopped: named by peer address in ``error``, else by a heartbeat older than ``STALE_S``.

    Heartbeats are only conclusive after ``STALE_S``: wait up to ``wait_s`` for one to go stale.
    """
    peers = set(_ADDRESS.findall(error))
    end = time.monotonic() + wait_s
    while True:
        ranks = [(info, age) for info, age in read_ranks(folder) if info.restart == restart and info.rank != me]
        named = [(info, age) for info, age in ranks if info.address and info.address in peers]
        # one rank at the address in the error is the answer; several (one node, many GPUs) or none: heartbeats
        stale = [(info, age) for info, age in (named or ranks) if age > STALE_S]
        found = named if len(named) == 1 else stale
        if found or time.monotonic() >= end:
            found = found or named
            return [{**asdict(info), "heartbeat_age_s": round(age, 1)} for info, age in found]
        time.sleep(1.0)


def describe(suspect: dict) -> str:
    return f"rank {suspect['rank']} on {suspect['host']} ({suspect['address'] or 'no address'}, pid {suspect['pid']})"


def record_failure(folder: Path, job_id: str, restart: int, me: RankInfo, error: str) -> tuple[dict, bool]:
    """Write this allocation's failure record unless another survivor did; (record, written by us)."""
    lost = suspects(folder, error, me.rank, restart)
    record = {
        "job_id": job_id,
        "restart": restart,
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        "reported_by": asdict(me),
        "lost": lost,
        "error": error,
    }
    written = write_json(folder / "failures" / f"{job_id}-{restart}.json", record, exclusive=True)
    return record, written


def read_failures(folder: Path) -> list[dict]:
    """Every failure record of the job folder, oldest first."""
    records = []
    for path in sorted((folder / "failures").glob("*.json")):
        try:
            records.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    return sorted(records, key=lambda r: (r.get("restart", 0), r.get("time", "")))


def failure_line(record: dict) -> str:
    """One sentence: who was lost, who noticed, and the error it saw."""
    lost = ", ".join(describe(s) for s in record["lost"]) or "a rank that could not be identified"
    me = record["reported_by"]
    first = record["error"].strip().splitlines()[-1] if record["error"].strip() else "no error text"
    return (
        f"{lost} stopped answering (allocation {record['restart']}, {record['time']}); "
        f"rank {me['rank']} on {me['host']} reported: {first[:160]}"
    )
