"""How each task of a local job ended: a small parent process per task that records its exit status.

submitit's local controller starts every task and sees how it ended, but keeps that to itself; a task killed by
SIGKILL cannot say so either. So each local task runs under ``python -m launch.task_exit PYTHON ARGS...`` (the
executor's ``python`` command, submitit's public hook for wrappers such as containers): it starts the task as its
child, passes signals on, and writes ``tasks/rank-R.exit.json`` in the job folder (the rank, the task's pid, and
its exit code or the signal that killed it). It then ends the same way, so the controller sees what it saw
before; nothing in recording or describing the end may change that code. The launcher and ``--status`` read
these records (``exit_lines``), skipping malformed ones and those of an earlier job whose controller had the
same pid (a local job id is that pid, so its folder is the same).
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
from functools import partial
from pathlib import Path

import submitit
from submitit.core.utils import JobPaths
from submitit.local.local import LOCAL_REQUEUE_RETURN_CODE

from launch.ranks import write_json

log = logging.getLogger(__name__)

# the usual ways a task is asked to stop; submitit's preemption signal is added by ``forwarded_signals``
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)
_PR_SET_PDEATHSIG = 1
_ORPHANED = 1  # the task's exit code when its wrapper died before it could be tied to it
_REQUIRED = {"rank": int, "pid": int, "returncode": int, "time": (int, float)}


def forwarded_signals() -> tuple[int, ...]:
    """``FORWARDED`` and the preemption signal submitit uses (``SUBMITIT_PREEMPT_SIGNAL``, read as submitit
    reads it: ``signal.SIG<name>``, USR2 by default); an unknown name is left to submitit to refuse."""
    extra = getattr(signal, "SIG" + submitit.JobEnvironment.USR_SIG, None)
    unstoppable = (signal.SIGKILL, signal.SIGSTOP)
    return FORWARDED + ((extra,) if isinstance(extra, int) and extra not in FORWARDED + unstoppable else ())


def wrapper_command() -> str:
    """The ``python`` of ``submitit.LocalExecutor``: this module, then the interpreter that runs the task."""
    import shlex

    exe = shlex.quote(sys.executable)
    return f"{exe} -m launch.task_exit {exe}"


def exit_path(folder: Path, rank: int) -> Path:
    return folder / "tasks" / f"rank-{rank}.exit.json"


def _in_child(wrapper: int, mask: set) -> None:
    """In the child before exec: a SIGKILL of this wrapper (submitit's last resort) also ends the task (Linux),
    and the task starts with the signal mask the wrapper had before it blocked the forwarded signals."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass
    if os.getppid() != wrapper:  # the wrapper died before prctl took effect: nobody would end this task
        os._exit(_ORPHANED)
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def _controller() -> dict:
    """Who started this wrapper: submitit's local controller, as its pid and start time (clock ticks after boot),
    which tells a reused pid (hence a reused local job id) from the job that had it before."""
    ppid = os.getppid()
    try:
        started = int(Path(f"/proc/{ppid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        started = None
    return {"pid": ppid, "started": started}


def _forget_earlier(folder: Path, rank: int, controller: dict) -> None:
    """Remove this rank's record of an earlier attempt, and every record of an earlier job with this job id."""
    try:
        exit_path(folder, rank).unlink(missing_ok=True)
        for path in (folder / "tasks").glob("rank-*.exit.json"):
            record = _load(path)
            if record is not None and record.get("controller", controller) != controller:
                path.unlink(missing_ok=True)
    except OSError as exc:  # not fatal: the readers also skip records of other jobs
        log.warning("could not remove earlier exit records in %s: %s", folder / "tasks", exc)


def _start(command: list[str], signals: tuple[int, ...]) -> subprocess.Popen:
    """Start the task with the forwarding handlers in place before any forwarded signal can be handled: a
    SIGTERM between the start and the handlers would kill the wrapper, and the task with it (PDEATHSIG)."""
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        # its own session: a terminal's Ctrl-C reaches the task once, through the forwarding below
        child = subprocess.Popen(command, preexec_fn=partial(_in_child, os.getpid(), mask), start_new_session=True)
        for sig in signals:
            signal.signal(sig, lambda signum, frame: child.send_signal(signum))
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # a signal that came meanwhile is handled now
    return child


def run_task(command: list[str]) -> int:
    """Run ``command`` as this task, record how it ended, and return its ``returncode`` (negative: a signal)."""
    env = submitit.JobEnvironment()
    rank = env.global_rank
    # the task's last argument is the job folder pattern (``.../%j``), which the task itself resolves
    folder = JobPaths(command[-1], job_id=env.job_id, task_id=rank).folder.resolve()
    controller = _controller()
    _forget_earlier(folder, rank, controller)
    child = _start(command, forwarded_signals())
    code = child.wait()
    try:  # nothing here may change the code this wrapper ends with
        record = {"rank": rank, "pid": child.pid, "host": socket.gethostname(), "returncode": code,
                  "time": time.time(), "job_id": str(env.job_id), "controller": controller}  # fmt: skip
        _record(exit_path(folder, rank), record)
        if code:
            print(f"task_exit: {describe(record)}", file=sys.stderr, flush=True)
    except Exception:
        log.exception("could not report the end of rank %d (exit code %d)", rank, code)
    return code


def _record(path: Path, record: dict) -> None:
    try:
        write_json(path, record)
    except OSError as exc:  # the task's end must reach the controller even when the folder cannot be written
        log.warning("could not record the end of rank %d in %s: %s", record["rank"], path, exc)


def signal_name(num: int) -> str:
    """``SIGKILL``; a realtime signal (not a member of ``signal.Signals``) as ``SIGRTMIN+3``."""
    try:
        return signal.Signals(num).name
    except ValueError:
        if signal.SIGRTMIN <= num <= signal.SIGRTMAX:
            return f"SIGRTMIN+{num - signal.SIGRTMIN}"
        return f"signal {num}"


def describe(record: dict) -> str:
    """``rank 1 (pid 123) was killed by SIGKILL`` / ``... exited with code 3``."""
    code = record["returncode"]
    who = f"rank {record['rank']} (pid {record['pid']})"
    if code < 0:
        why = " (kill -9 or the kernel's out-of-memory killer)" if -code == signal.SIGKILL else ""
        return f"{who} was killed by {signal_name(-code)}{why}"
    if code == LOCAL_REQUEUE_RETURN_CODE:  # submitit's local requeue, not a signal
        return f"{who} exited with code {code} (requeued)"
    if code > 128 and code - 128 in signal.valid_signals():
        return f"{who} exited with code {code} (stopped on {signal_name(code - 128)})"
    return f"{who} exited with code {code}"


def _load(path: Path) -> dict | None:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _problem(record: dict | None) -> str:
    """Why ``record`` is not a usable exit record ("" when it is)."""
    if record is None:
        return "not a JSON object"
    for key, kind in _REQUIRED.items():
        if key not in record:
            return f"no {key!r}"
        if not isinstance(record[key], kind) or isinstance(record[key], bool):
            return f"{key!r} is {record[key]!r}"
    return ""


def read_exits(folder: Path, job_id: str | None = None) -> list[dict]:
    """Every task's exit record of the job in the folder, in the order the tasks ended.

    Malformed records are skipped with one warning that counts and names them. Records of another job (with
    ``job_id`` given) or of an earlier job whose controller had the same pid (a local job id is that pid) are
    left out: only the controller of the newest record counts."""
    records, bad = [], []
    for path in sorted((folder / "tasks").glob("rank-*.exit.json")):
        record = _load(path)
        problem = _problem(record)
        if problem:
            bad.append(f"{path.name} ({problem})")
        elif job_id is None or record.get("job_id", job_id) == str(job_id):
            records.append(record)
    if bad:
        log.warning("skipped %d malformed exit record(s) in %s: %s", len(bad), folder / "tasks", ", ".join(bad))
    records.sort(key=lambda r: r["time"])
    if records and "controller" in records[-1]:
        records = [r for r in records if r.get("controller") == records[-1]["controller"]]
    return records


def exit_lines(folder: Path, job_id: str | None = None) -> list[str]:
    """How the tasks that did not end well ended, first one first (a requeue is not an end)."""
    bad = [r for r in read_exits(folder, job_id) if r["returncode"] not in (0, LOCAL_REQUEUE_RETURN_CODE)]
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
