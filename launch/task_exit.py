"""How each task of a local job ended: a small parent process per task that records its exit status.

submitit's local controller starts every task and sees how it ended, but keeps that to itself; a task killed by
SIGKILL cannot say so either. So each local task runs under ``python -m launch.task_exit PYTHON ARGS...`` (the
executor's ``python`` command, submitit's public hook for wrappers such as containers): it starts the task as its
child, passes signals on, and writes ``tasks/rank-R.exit.json`` in the job folder (the rank, the task's pid, and
its exit code or the signal that killed it). It then ends the same way, so the controller sees what it saw
before. The launcher and ``--status`` read these records (``exit_lines``).
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import submitit
from submitit.core.utils import JobPaths
from submitit.local.local import LOCAL_REQUEUE_RETURN_CODE

from launch.ranks import write_json

log = logging.getLogger(__name__)

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)
_PR_SET_PDEATHSIG = 1


def wrapper_command() -> str:
    """The ``python`` of ``submitit.LocalExecutor``: this module, then the interpreter that runs the task."""
    import shlex

    exe = shlex.quote(sys.executable)
    return f"{exe} -m launch.task_exit {exe}"


def exit_path(folder: Path, rank: int) -> Path:
    return folder / "tasks" / f"rank-{rank}.exit.json"


def _die_with_parent() -> None:
    """In the child before exec: a SIGKILL of this wrapper (submitit's last resort) also ends the task (Linux)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def run_task(command: list[str]) -> int:
    """Run ``command`` as this task, record how it ended, and return its ``returncode`` (negative: a signal)."""
    env = submitit.JobEnvironment()
    rank = env.global_rank
    # the task's last argument is the job folder pattern (``.../%j``), which the task itself resolves
    folder = JobPaths(command[-1], job_id=env.job_id, task_id=rank).folder.resolve()
    path = exit_path(folder, rank)
    path.unlink(missing_ok=True)  # a requeued attempt: the earlier one's end is no longer news
    # its own session: a terminal's Ctrl-C reaches the task once, through the forwarding below
    child = subprocess.Popen(command, preexec_fn=_die_with_parent, start_new_session=True)
    for sig in FORWARDED:
        signal.signal(sig, lambda signum, frame: child.send_signal(signum))
    code = child.wait()
    record = {"rank": rank, "pid": child.pid, "host": socket.gethostname(), "returncode": code,
              "time": time.time()}  # fmt: skip
    try:
        write_json(path, record)
    except OSError as exc:  # the task's end must reach the controller even when the folder cannot be written
        log.warning("could not record the end of rank %d in %s: %s", rank, path, exc)
    if code:
        print(f"task_exit: {describe(record)}", file=sys.stderr, flush=True)
    return code


def describe(record: dict) -> str:
    """``rank 1 (pid 123) was killed by SIGKILL`` / ``... exited with code 3``."""
    code = record["returncode"]
    who = f"rank {record['rank']} (pid {record['pid']})"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        why = " (kill -9 or the kernel's out-of-memory killer)" if -code == signal.SIGKILL else ""
        return f"{who} was killed by {name}{why}"
    if code > 128 and code - 128 in signal.valid_signals():
        return f"{who} exited with code {code} (stopped on {signal.Signals(code - 128).name})"
    return f"{who} exited with code {code}"


def read_exits(folder: Path) -> list[dict]:
    """Every task's exit record in the job folder, in the order the tasks ended."""
    records = []
    for path in (folder / "tasks").glob("rank-*.exit.json"):
        try:
            records.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    return sorted(records, key=lambda r: r.get("time", 0.0))


def exit_lines(folder: Path) -> list[str]:
    """How the tasks that did not end well ended, first one first (a requeue is not an end)."""
    bad = [r for r in read_exits(folder) if r.get("returncode") not in (0, LOCAL_REQUEUE_RETURN_CODE)]
    lines = []
    for i, record in enumerate(bad):
        when = time.strftime("%H:%M:%S", time.localtime(record["time"]))
        first = " (the first to end)" if i == 0 and len(bad) > 1 else ""
        lines.append(f"{describe(record)} at {when}{first}")
    return lines


def _restore(code: int) -> None:
    """End this process as the task ended: the same exit code, or the same signal."""
    if code >= 0:
        sys.exit(code)
    if -code != signal.SIGKILL:  # SIGKILL has no handler to reset
        signal.signal(-code, signal.SIG_DFL)
    os.kill(os.getpid(), -code)
    sys.exit(128 - code)  # a signal that does not end a process by default


if __name__ == "__main__":
    _restore(run_task(sys.argv[1:]))
