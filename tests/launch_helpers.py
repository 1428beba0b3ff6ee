"""Helpers shared by the launcher tests: logged steps, preempting a job, waiting for files."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import submitit
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def logged_steps(run_dir: Path, tag: str = "train/loss") -> list[int]:
    """Every step of ``tag`` in the run's TensorBoard event files, in file order (duplicates kept)."""
    steps: list[int] = []
    for path in sorted((run_dir / "tb").rglob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime):
        acc = EventAccumulator(str(path), size_guidance={"scalars": 0})
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            steps += [event.step for event in acc.Scalars(tag)]
    return steps


def wait_for(predicate, deadline_s: float, what: str, poll_s: float = 0.5) -> None:
    end = time.monotonic() + deadline_s
    while not predicate():
        if time.monotonic() > end:
            raise TimeoutError(f"waited {deadline_s:.0f} s for {what}")
        time.sleep(poll_s)


def wait_for_first_state(job: submitit.Job, folder: Path, deadline_s: float = 240) -> None:
    """Wait for the job's first resumable state, whichever step it is by now (older states are pruned), and
    check that the job is still running: a test that signals it next needs it alive."""
    from launch import jobs
    from trainers import checkpoint as ckpt

    wait_for(
        lambda: ckpt.list_states(folder / "checkpoints") or jobs.job_done(job), deadline_s, "the first state", 0.05
    )
    assert not jobs.job_done(job), (folder / f"{job.job_id}_0_log.err").read_text()[-3000:]


def preempt(job: submitit.Job) -> None:
    """Send the preemption / time-limit signal to every task; on SLURM also release the requeued job.

    submitit's LocalJob._interrupt signals the local controller, not the tasks, so local tasks (the
    controller's children) are signalled directly.
    """
    if isinstance(job, submitit.SlurmJob):
        # USR2 only, as at a time limit (SLURM's preemption SIGTERM also reaches DataLoader workers, which
        # torch makes exit on SIGTERM unless the loader's worker_init_fn ignores it).
        before = restarts(job.job_id)
        job._interrupt(timeout=True)
        release_requeued(job.job_id, after=before)
        return
    pid = int(job.job_id)
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    for sig in (signal.SIGTERM, signal.SIGUSR2):
        for child in children:
            os.kill(int(child), sig)


def restarts(job_id: str) -> int:
    """How often SLURM requeued the job (``Restarts=`` of ``scontrol show job``)."""
    out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout
    found = re.search(r"Restarts=(\d+)", out)
    return int(found.group(1)) if found else 0


def release_requeued(job_id: str, deadline_s: float = 120.0, after: int | None = None) -> None:
    """A requeued SLURM job is often held ~120 s (BeginTime); start it now once it is pending again.

    ``after``: the restart count before the requeue; a job that already started again then counts as released.
    """

    def requeued() -> bool:
        out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True).stdout
        if out.strip() == "PENDING":
            return True
        return after is not None and restarts(job_id) > after and out.strip() == "RUNNING"

    wait_for(requeued, deadline_s, f"job {job_id} to be requeued")
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=False)


def log_ints(path: Path, pattern: str) -> list[int]:
    """Integers captured by ``pattern`` (one group) in a log file."""
    return [int(m) for m in re.findall(pattern, path.read_text())]


ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "CUDA_VISIBLE_DEVICES",
            "ACCELERATE_USE_CPU")  # fmt: skip


def run(cfg, run_dir: str | None = None, resume: str | None = None) -> dict:
    """A trainer entry point that reports the environment a task gets (see test_launch_cli)."""
    return {"env": {k: os.environ.get(k) for k in ENV_KEYS}, "run_dir": run_dir, "resume": resume}
