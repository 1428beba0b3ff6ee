"""How a rank of a local job ended: each task's exit record (signal or exit code), read by the launcher."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import pytest

from launch import jobs, task_exit
from launch.slurm import main, submit
from launch.task_exit import exit_lines, read_exits
from tests.conftest import REPO
from tests.launch_helpers import wait_for, wait_for_first_state
from tests.test_launch_local import OVERRIDES, shards  # noqa: F401  (the module's shards fixture)

ENDINGS = {0: "import sys; sys.exit(3)", 1: "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"}


def _task(folder: Path, rank: int, code: str, **env: str) -> tuple[list[str], dict]:
    """What submitit's local controller runs for task ``rank``: the wrapper, then the task (command, env)."""
    env = dict(os.environ, PYTHONPATH=str(REPO), SUBMITIT_EXECUTOR="local", SUBMITIT_LOCAL_JOB_ID="4242",
               SUBMITIT_LOCAL_GLOBALID=str(rank), **env)  # fmt: skip
    return [sys.executable, "-m", "launch.task_exit", sys.executable, "-c", code, str(folder / "%j")], env


def _as_task(folder: Path, rank: int, code: str, **env: str) -> subprocess.CompletedProcess:
    cmd, env = _task(folder, rank, code, **env)
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


# the task checks that it starts with no signal blocked, then ends with a code whose signal (180 - 128 = 52) is a
# realtime one: a valid signal number that is not a member of signal.Signals
REALTIME_END = (
    "import sys; blocked = [l for l in open('/proc/self/status') if l.startswith('SigBlk')][0].split()[1]; "
    "sys.exit(180 if int(blocked, 16) == 0 else 9)"
)


def test_an_exit_code_above_128_of_a_realtime_signal_reaches_the_controller(tmp_path):
    done = _as_task(tmp_path, 0, REALTIME_END)
    assert done.returncode == 180 and "Traceback" not in done.stderr, done.stderr
    assert f"exited with code 180 (stopped on SIGRTMIN+{52 - signal.SIGRTMIN})" in done.stderr
    assert [r["returncode"] for r in read_exits(tmp_path / "4242", "4242")] == [180]


def test_a_local_requeue_reads_as_a_requeue_not_a_signal():
    said = task_exit.describe({"rank": 0, "pid": 7, "returncode": 144})
    assert said == "rank 0 (pid 7) exited with code 144 (requeued)"


def test_an_unwritable_job_folder_does_not_change_how_the_task_ended(tmp_path):
    (tmp_path / "4242").mkdir()
    (tmp_path / "4242" / "tasks").write_text("a file where the records folder should be")
    done = _as_task(tmp_path, 0, "import sys; sys.exit(3)")
    assert done.returncode == 3 and "Traceback" not in done.stderr, done.stderr
    assert "could not record the end of rank 0" in done.stderr


# the wrapper as submitit starts it, but a SIGTERM reaches it right after the task started and before any
# handler could be installed (the window a preemption can hit)
EARLY_SIGTERM = """
import os, signal, subprocess, sys
from launch import task_exit
start = subprocess.Popen
def popen(*args, **kwargs):
    child = start(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGTERM)
    return child
subprocess.Popen = popen
task_exit._restore(task_exit.run_task(sys.argv[1:]))
"""


def test_a_signal_between_the_start_and_the_handlers_is_passed_on_not_fatal(tmp_path):
    cmd, env = _task(tmp_path, 0, "import time; time.sleep(30)")
    began = time.monotonic()
    done = subprocess.run([sys.executable, "-c", EARLY_SIGTERM, *cmd[3:]], env=env, capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert done.returncode == -signal.SIGTERM and time.monotonic() - began < 25, done.stderr
    # the task got the SIGTERM (a task would checkpoint on it) and its end was recorded
    assert [r["returncode"] for r in read_exits(tmp_path / "4242")] == [-signal.SIGTERM], done.stderr


def test_the_preemption_signal_submitit_is_told_to_use_is_passed_on(tmp_path):
    ready = tmp_path / "ready"
    code = (f"import pathlib, signal, sys, time; signal.signal(signal.SIGPWR, lambda *a: sys.exit(5)); "
            f"pathlib.Path({str(ready)!r}).touch(); time.sleep(30)")  # fmt: skip
    cmd, env = _task(tmp_path, 0, code, SUBMITIT_PREEMPT_SIGNAL="PWR")
    wrapper = subprocess.Popen(cmd, env=env)
    try:
        wait_for(ready.exists, 30, "the task to start")
        wrapper.send_signal(signal.SIGPWR)
        assert wrapper.wait(timeout=30) == 5  # not the wrapper killed by SIGPWR's default action
    finally:
        wrapper.kill()
        wrapper.wait()


def test_a_task_whose_wrapper_died_before_it_was_tied_to_it_does_not_run():
    gone = os.getpid() + 4_000_000  # the parent pid the child was told it has is not its parent: orphaned
    child = subprocess.Popen(["sleep", "30"], preexec_fn=partial(task_exit._in_child, gone, set()))
    assert child.wait(timeout=10) == task_exit._ORPHANED


def _write(folder: Path, name: str, text: str) -> None:
    (folder / "tasks").mkdir(parents=True, exist_ok=True)
    (folder / "tasks" / name).write_text(text)


def test_malformed_exit_records_are_skipped_counted_and_named(tmp_path, caplog):
    ok = {"rank": 1, "pid": 5, "host": "h", "returncode": -9, "time": time.time()}
    _write(tmp_path, "rank-0.exit.json", json.dumps({"returncode": 1}))
    _write(tmp_path, "rank-1.exit.json", json.dumps(ok))
    _write(tmp_path, "rank-2.exit.json", "[]")
    _write(tmp_path, "rank-3.exit.json", json.dumps({**ok, "rank": 3, "time": "noon"}))
    with caplog.at_level(logging.WARNING, logger="launch.task_exit"):
        lines = jobs.lost_ranks(tmp_path, "4242")
    assert lines == [f"ended:  rank 1 (pid 5) was killed by SIGKILL (kill -9 or the kernel's out-of-memory killer) "
                     f"at {time.strftime('%H:%M:%S', time.localtime(ok['time']))}"]  # fmt: skip
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1 and "skipped 3 malformed exit record(s)" in warned[0], warned
    assert "rank-0.exit.json (no 'rank')" in warned[0] and "rank-2.exit.json" in warned[0] and "'noon'" in warned[0]


def test_records_of_an_earlier_job_with_the_same_id_are_not_read_as_deaths(tmp_path):
    # an earlier local job whose controller had the same pid (so the same job id and folder) ran 4 tasks
    earlier = {"pid": 4242, "started": 1}
    for rank in range(4):
        _write(tmp_path / "4242", f"rank-{rank}.exit.json", json.dumps(
            {"rank": rank, "pid": 9, "host": "h", "returncode": -9, "time": 1.0, "job_id": "4242",
             "controller": earlier}))  # fmt: skip
    assert _as_task(tmp_path, 0, "import sys; sys.exit(3)").returncode == 3
    assert [(r["rank"], r["returncode"]) for r in read_exits(tmp_path / "4242", "4242")] == [(0, 3)]
    assert sorted(p.name for p in (tmp_path / "4242" / "tasks").iterdir()) == ["rank-0.exit.json"]
    # a record the starting job could not remove still does not count
    _write(
        tmp_path / "4242",
        "rank-3.exit.json",
        json.dumps(
            {"rank": 3, "pid": 9, "host": "h", "returncode": -9, "time": 2.0, "job_id": "4242", "controller": earlier}
        ),
    )
    assert [r["rank"] for r in read_exits(tmp_path / "4242", "4242")] == [0]
    assert read_exits(tmp_path / "4242", "777") == []  # another job id


@pytest.mark.slow  # a 2-task local job up to its first steps: about 30 s on 2 busy cores
def test_a_local_rank_killed_mid_run_is_named_with_its_signal(tmp_path, shards, capsys):  # noqa: F811
    job = submit("retr_demo", [*OVERRIDES, *shards, "schedule.epochs=1000", f"output_dir={tmp_path}"],
                 cluster="local")  # fmt: skip
    folder = Path(job.paths.folder)
    wait_for_first_state(job, folder)
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
