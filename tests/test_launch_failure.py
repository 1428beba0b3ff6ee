"""A rank that stops answering: the process-group timeout from the config, naming the lost rank, the record."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

from launch import ranks
from launch.job import lost_peer
from tests.conftest import REPO

GLOO_RESET = (
    "[../gloo/transport/tcp/pair.cc:545] Read error [10.213.77.12]:40665: Connection reset by peer. "
    "This is typically caused by a remote worker hanging"
)


def test_lost_peer_errors_are_told_from_other_errors():
    assert lost_peer(RuntimeError(GLOO_RESET))
    assert lost_peer(RuntimeError("[../gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 5000ms for recv"))
    try:
        try:
            raise RuntimeError("Connection closed by peer [10.0.0.2]:1234")
        except RuntimeError as inner:
            raise ValueError("while reducing") from inner
    except ValueError as chained:
        assert lost_peer(chained)
    assert not lost_peer(ValueError("data.batch_size=30 is not divisible by the 4 processes"))


def _rank_file(folder, rank, host, address, age_s=0.0, restart=0):
    path = folder / "tasks" / f"rank-{rank}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"rank": rank, "host": host, "address": address, "pid": 100 + rank, "restart": restart}))
    past = time.time() - age_s
    os.utime(path, (past, past))


def test_the_lost_rank_is_named_by_its_address_or_its_silent_heartbeat(tmp_path):
    _rank_file(tmp_path, 0, "n1", "10.213.77.11")
    _rank_file(tmp_path, 1, "n2", "10.213.77.12")
    _rank_file(tmp_path, 2, "n3", "10.213.77.13", age_s=60)
    _rank_file(tmp_path, 3, "n4", "10.213.77.14", age_s=60, restart=1)  # another allocation's file
    by_address = ranks.suspects(tmp_path, GLOO_RESET, me=0, restart=0, wait_s=0)
    assert [(s["rank"], s["host"]) for s in by_address] == [(1, "n2")]
    by_heartbeat = ranks.suspects(tmp_path, "Timed out waiting 600000ms", me=0, restart=0, wait_s=0)
    assert [(s["rank"], s["host"]) for s in by_heartbeat] == [(2, "n3")]
    me = ranks.RankInfo(0, "n1", "10.213.77.11", 100, 0)
    record, first = ranks.record_failure(tmp_path, "42", 0, me, f"RuntimeError: {GLOO_RESET}")
    again, second = ranks.record_failure(tmp_path, "42", 0, ranks.RankInfo(2, "n3", "", 102, 0), "RuntimeError: x")
    assert first and not second  # one record per allocation: the first survivor's
    (line,) = [ranks.failure_line(r) for r in ranks.read_failures(tmp_path)]
    assert line.startswith("rank 1 on n2 (10.213.77.12, pid 101) stopped answering (allocation 0") and "n1" in line


SCRIPT = textwrap.dedent(
    """
    import sys, time, torch
    from configs import load_config
    from launch.job import lost_peer
    from trainers.setup import make_accelerator

    cfg = load_config("retr_demo", ["train.dist_timeout_s=3"])
    acc = make_accelerator(cfg)
    acc.wait_for_everyone()
    if acc.process_index == 1:
        time.sleep(12)  # alive but not answering, like a stopped process
        sys.exit(0)
    start = time.monotonic()
    try:
        acc.reduce(torch.ones(1), "sum")
    except Exception as exc:
        print(f"failed after {time.monotonic() - start:.1f} s, lost_peer={lost_peer(exc)}", flush=True)
        sys.exit(3)
    """
)


@pytest.mark.slow
def test_a_silent_rank_fails_the_collective_after_the_configured_timeout(tmp_path):
    script = tmp_path / "silent.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), ACCELERATE_USE_CPU="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    proc = subprocess.run([*cmd, str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    found = [line for line in proc.stdout.splitlines() if line.startswith("failed after")]
    assert found, proc.stdout[-2000:] + proc.stderr[-2000:]
    seconds = float(found[0].split()[2])
    assert seconds < 20 and "lost_peer=True" in found[0], found  # 3 s configured; gloo's default is 30 min
