"""How a rank of a local job ended: each task's exit record (signal or exit code), read by the launcher."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from launch import jobs
from launch.slurm import main, submit
from launch.task_exit import exit_lines, read_exits
from tests.conftest import REPO
from tests.launch_helpers import wait_for
from tests.test_launch_local import OVERRIDES, shards  # noqa: F401  (the module's shards fixture)

ENDINGS = {0: "import sys; sys.exit(3)", 1: "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"}


def _as_task(folder: Path, rank: int, code: str) -> subprocess.CompletedProcess:
    """What submitit's local controller runs for task ``rank``: the wrapper, then the task."""
    env = dict(os.environ, PYTHONPATH=str(REPO), SUBMITIT_EXECUTOR="local", SUBMITIT_LOCAL_JOB_ID="4242",
               SUBMITIT_LOCAL_GLOBALID=str(rank))  # fmt: skip
    cmd = [sys.executable, "-m", "launch.task_exit", sys.executable, "-c", code, str(folder / "%j")]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)


def test_the_wrapper_records_a_signal_and_an_exit_code_and_ends_the_same_way(tmp_path):
    done = {rank: _as_task(tmp_path, rank, code) for rank, code in ENDINGS.items()}
    assert done[0].returncode == 3 and done[1].returncode == -signal.SIGKILL  # what the controller sees, as before
    records = {r["rank"]: r for r in read_exits(tmp_path / "4242")}
    assert records[0]["returncode"] == 3 and records[1]["returncode"] == -signal.SIGKILL
    lines = exit_lines(tmp_path / "4242")
    assert lines[0].startswith(f"rank 0 (pid {records[0]['pid']}) exited with code 3 at ") and "first" in lines[0]
    assert lines[1].startswith(f"rank 1 (pid {records[1]['pid']}) was killed by SIGKILL"), lines
    assert "was killed by SIGKILL" in done[1].stderr  # also in the task's own log
    again = _as_task(tmp_path, 1, "pass")  # a requeued attempt replaces the earlier end
    assert again.returncode == 0 and [r["rank"] for r in read_exits(tmp_path / "4242") if r["returncode"]] == [0]


@pytest.mark.slow  # a 2-task local job up to its first steps: about 30 s on 2 busy cores
def test_a_local_rank_killed_mid_run_is_named_with_its_signal(tmp_path, shards, capsys):  # noqa: F811
    job = submit("retr_demo", [*OVERRIDES, *shards, "schedule.epochs=1000", f"output_dir={tmp_path}"],
                 cluster="local")  # fmt: skip
    folder = Path(job.paths.folder)
    state = folder / "checkpoints" / "state-000000005.pt"
    wait_for(lambda: state.exists() or jobs.job_done(job), 240, "the step-5 state")
    assert state.exists(), (folder / f"{job.job_id}_0_log.err").read_text()[-3000:]
    victim = json.loads((folder / "tasks" / "rank-1.json").read_text())["pid"]
    os.kill(victim, signal.SIGKILL)
    assert jobs.wait_and_report(job, 120) == 1
    said = capsys.readouterr().out
    assert f"ended:  rank 1 (pid {victim}) was killed by SIGKILL" in said, said
    assert "lost:   rank 1 on" in said and "stopped answering" in said, said  # the survivor's account
    assert main(["--status", job.job_id, "--runs", str(tmp_path)]) == 0
    status = capsys.readouterr().out
    with capsys.disabled():
        print(f"\nlauncher, after rank 1 was killed:\n{said}--status:\n{status}")
    assert f"ended:  rank 1 (pid {victim}) was killed by SIGKILL" in status and "(the first to end)" in status
