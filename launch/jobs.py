"""Submitted jobs: the record in each job folder, status, cancel, and waiting with a deadline."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import submitit

from configs import LaunchConfig
from launch import ranks, task_exit
from launch.cluster import pending_reason
from launch.executor import task_count
from launch.progress import ProgressReporter
from launch.result import read_result

RECORD = "launch.json"
POLL_S = 2.0


def write_record(job: submitit.Job, cluster: str, config: str, launch: LaunchConfig) -> Path:
    """Write ``launch.json`` in the job folder: what --status / --cancel need to find the job again."""
    folder = Path(job.paths.folder)
    folder.mkdir(parents=True, exist_ok=True)
    record = {
        "job_id": str(job.job_id),
        "cluster": cluster,
        "config": config,
        "num_tasks": job.num_tasks,
        "tasks": task_count(launch),  # in words; a range when launch.min_nodes lets the job run on fewer nodes
        "time_min": launch.time_min,
        "submitted": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    path = folder / RECORD
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def find_record(job_id: str, runs: str | Path) -> tuple[Path, dict[str, Any]] | None:
    """(job folder, record) of ``job_id`` under ``runs/*/JOBID``, or None."""
    for path in sorted(Path(runs).glob(f"*/{job_id}/{RECORD}")):
        return path.parent, json.loads(path.read_text())
    return None


def load_job(job_id: str, runs: str | Path) -> tuple[submitit.Job, str]:
    """The submitit job for ``job_id`` and its cluster; jobs without a folder are looked up in SLURM."""
    found = find_record(job_id, runs)
    if found is None:
        if not submitit.SlurmExecutor.affinity() > 0:
            raise ValueError(f"no job folder {Path(runs) / '*' / str(job_id)} (with {RECORD}) and no SLURM here")
        job = submitit.SlurmJob(folder=Path(runs) / "unknown" / "%j", job_id=str(job_id))
        if job_state(job, "slurm") == "UNKNOWN":
            raise ValueError(f"no job folder {Path(runs) / '*' / str(job_id)} and SLURM knows no job {job_id}")
        return job, "slurm"
    folder, record = found
    tasks = list(range(record["num_tasks"]))
    if record["cluster"] == "slurm":
        return submitit.SlurmJob(folder=folder, job_id=str(job_id), tasks=tasks), "slurm"
    return submitit.local.local.LocalJob(folder=folder, job_id=str(job_id), tasks=tasks), "local"


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs (an exited child that was not reaped yet, a zombie, does not)."""
    stat = Path(f"/proc/{pid}/stat")
    if stat.parent.is_dir():
        try:
            return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _controller_alive(job: submitit.Job) -> bool:
    """Whether the local job's controller (its pid is the job id) still runs. Pids are reused, so where /proc
    shows command lines the process must also be submitit's controller of this job folder: a stale job id must
    never make --cancel signal an unrelated process."""
    pid = int(job.job_id)
    if not _pid_alive(pid):
        return False
    cmdline = Path(f"/proc/{pid}/cmdline")
    if not cmdline.parent.is_dir():
        return True
    try:
        args = cmdline.read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return False
    folder = str(Path(job.paths.folder).parent)
    return "submitit.local._local" in args and any(a.startswith(folder + os.sep) for a in args)


def job_state(job: submitit.Job, cluster: str) -> str:
    """SLURM's state (through sacct), or for a local job: RUNNING / FINISHED / FAILED / CANCELLED / DIED."""
    if cluster == "slurm":
        return slurm_state(job)
    record_path = Path(job.paths.folder) / RECORD
    if record_path.is_file() and json.loads(record_path.read_text()).get("cancelled"):
        return "CANCELLED"
    if _controller_alive(job):
        return "RUNNING"
    outcome = read_result(job.paths.folder)
    if outcome is None:
        return "DIED"
    return "FINISHED" if outcome["state"] == "success" else "FAILED"


def slurm_state(job: submitit.Job) -> str:
    """The job's current state: squeue's while SLURM holds the job (sacct may not list a job submitted a moment
    ago, and for a requeued job it also lists the earlier allocations' REQUEUED records), else sacct's."""
    queued = subprocess.run(["squeue", "-h", "-j", str(job.job_id), "-o", "%T"], capture_output=True, text=True)
    return queued.stdout.strip() or job.watcher.get_state(job.job_id, mode="force")


def outcome_line(outcome: dict[str, Any]) -> str:
    """One line for a ``result.json`` record: the metrics, or the error."""
    if outcome["state"] == "success":
        return format_result(outcome.get("result"))
    return str(outcome.get("error", "failed"))


def print_status(job_id: str, runs: str | Path) -> int:
    job, cluster = load_job(job_id, runs)
    state = job_state(job, cluster)
    print(f"job {job_id} ({cluster}): {state}")
    print(f"  folder: {job.paths.folder}")
    print(f"  log:    {job.paths.stdout} {job.paths.stderr}")
    for line in lost_ranks(Path(job.paths.folder), job_id):
        print(f"  {line}")
    reason = pending_reason(job_id) if cluster == "slurm" else None
    if reason:
        print(f"  pending: {reason}")
    outcome = read_result(job.paths.folder)  # JSON only: submitit's result pickle is never loaded here
    if outcome is not None:
        print(f"  result: {outcome_line(outcome)}")
    return 0


def cancel(job_id: str, runs: str | Path, deadline_s: float = 60.0) -> int:
    """Cancel the job and wait (with a deadline) until it is no longer running."""
    job, cluster = load_job(job_id, runs)
    state = job_state(job, cluster)
    if not _active(state, cluster, job):
        print(f"job {job_id} ({cluster}): already {state}; nothing to cancel")
        return 0
    if cluster == "slurm":
        job.cancel(check=True)
    else:
        if _controller_alive(job):
            os.kill(int(job.job_id), signal.SIGINT)  # the local controller stops its tasks on SIGINT
        record_path = Path(job.paths.folder) / RECORD
        record = json.loads(record_path.read_text())
        record["cancelled"] = time.strftime("%Y-%m-%d %H:%M:%S")
        record_path.write_text(json.dumps(record, indent=2) + "\n")
    end = time.monotonic() + deadline_s
    state = job_state(job, cluster)
    while _active(state, cluster, job) and time.monotonic() < end:
        time.sleep(POLL_S)
        state = job_state(job, cluster)
    print(f"job {job_id} ({cluster}): cancel requested; state now {state}")
    return 0 if not _active(state, cluster, job) else 1


def _active(state: str, cluster: str, job: submitit.Job) -> bool:
    if cluster == "local":
        return _controller_alive(job)
    return state.split()[0] in ("RUNNING", "PENDING", "REQUEUED", "REQUEUE_HOLD", "CONFIGURING", "COMPLETING",
                                "SUSPENDED", "RESIZING", "SIGNALING", "STAGE_OUT")  # fmt: skip


def record_wait_s(job: submitit.Job) -> float:
    """Default wait for a local job: its time limit plus two minutes."""
    record = json.loads((Path(job.paths.folder) / RECORD).read_text())
    return 60.0 * record["time_min"] + 120.0


def job_done(job: submitit.Job) -> bool:
    """Whether the job ended; a local job found again by --status (no process handle) is checked by pid."""
    if isinstance(job, submitit.local.local.LocalJob) and job._process is None:
        return not _controller_alive(job)
    if isinstance(job, submitit.SlurmJob):
        return not _active(slurm_state(job), "slurm", job)
    return job.done(force_check=True)


def wait_done(
    job: submitit.Job, deadline_s: float, poll_s: float = POLL_S, report: Callable[[], None] | None = None
) -> bool:
    """Poll ``job.done()`` until it is done or ``deadline_s`` passed (never ``job.result()`` blindly);
    ``report()`` is called at each poll (the progress display)."""
    end = time.monotonic() + deadline_s
    while not job_done(job):
        if time.monotonic() >= end:
            return False
        if report is not None:
            report()
        time.sleep(poll_s)
    return True


def wait_and_report(job: submitit.Job, deadline_s: float) -> int:
    """Wait for the job with a deadline and print its result; 0 on success."""
    reporter = ProgressReporter(job.paths.folder, str(job.job_id))
    finished = wait_done(job, deadline_s, report=reporter)
    reporter.close()
    if not finished:
        print(f"job {job.job_id} still running after {deadline_s:.0f} s; it goes on (see the commands above)")
        return 0
    outcome = read_result(job.paths.folder)
    if outcome is None or outcome["state"] != "success":
        what = "ended without a result (killed?)" if outcome is None else f"failed: {outcome_line(outcome)}"
        print(f"job {job.job_id} {what}\n  full traceback: {job.paths.stderr}")
        for line in lost_ranks(Path(job.paths.folder), job.job_id):
            print(f"  {line}")
        return 1
    print(f"job {job.job_id} finished: {outcome_line(outcome)}")
    return 0


# srun's own account of how tasks ended ("srun: error: NODE: task 1: Killed", "Node failure on NODE") and
# slurmstepd's cancel reason, in the batch script's stderr (the first task's log file).
SRUN_LINES = re.compile(r"^(srun: error: .*|slurmstepd.*\*\*\* .*)$", re.MULTILINE)


def lost_ranks(folder: Path, job_id: str) -> list[str]:
    """Why ranks of the job stopped: the survivors' failure records, then how tasks ended (a local job's exit
    records, SLURM's lines)."""
    lines = [f"lost:   {ranks.failure_line(record)}" for record in ranks.read_failures(folder)]
    lines += [f"ended:  {line}" for line in task_exit.exit_lines(folder, job_id)]
    log = folder / f"{job_id}_0_log.err"
    if log.is_file():
        lines += [f"slurm:  {m.strip()}" for m in SRUN_LINES.findall(log.read_text(errors="replace"))]
    return lines


def format_result(result: Any) -> str:
    if isinstance(result, dict):
        return ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items())
    return repr(result)


def sbatch_error(exc: Exception) -> str:
    """The useful lines of a failed sbatch call (SLURM's own message)."""
    lines = [line for line in str(exc).splitlines() if "error" in line.lower()]
    return "\n".join(lines) if lines else str(exc)
