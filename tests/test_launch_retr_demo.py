"""The real retr_demo through launch/slurm.py with 2 tasks: train + evaluate, preempt -> requeue -> resume, cancel.

Runs on a real SLURM (marker ``slurm``, started by tests/slurm/up.sh) and on submitit's local executor
(marker ``slow``: about a minute and a half on 2 CPU cores).
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import pytest

from launch import jobs
from launch.slurm import main
from tests.launch_helpers import log_ints, logged_steps, preempt, wait_for

EPOCHS, EVERY = 8, 5
CLUSTERS = [
    pytest.param("local", marks=pytest.mark.slow),
    pytest.param("slurm", marks=pytest.mark.slurm),
]


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> list[str]:
    """retr_demo overrides: shards of the embedded sample in a temporary folder, 2 CPU tasks, short schedule."""
    from datasets.prepare import main as prepare

    root = tmp_path_factory.mktemp("retr_demo")
    data = [f"data.root={root / 'sample'}", f"data.shards={root / 'shards'}"]
    prepare(["--config", "retr_demo", *data])
    return [*data, f"output_dir={root / 'runs'}", "launch.cpu_tasks=2", "launch.cpus_per_task=1",
            "launch.time_min=10", f"schedule.epochs={EPOCHS}", "eval.every=0", "train.log_every=1",
            f"checkpoint.every_steps={EVERY}"]  # fmt: skip


def need(cluster: str) -> None:
    if cluster == "slurm" and shutil.which("sbatch") is None:
        pytest.skip("no SLURM here (`sbatch` not on PATH); start one with tests/slurm/up.sh")


def launch(cluster: str, overrides: list[str], capsys) -> tuple[object, Path]:
    """Submit through the command line (no waiting) and find the job again from its id, as a user would."""
    assert main(["--config", "retr_demo", "--cluster", cluster, "--wait", "0", *overrides]) == 0
    out = capsys.readouterr().out
    job_id = re.search(r"submitted job (\S+) \((\w+), 2 task\(s\)\) -> (\S+)", out)
    assert job_id and job_id.group(2) == cluster, out
    runs = Path(job_id.group(3)).parent.parent
    job, found = jobs.load_job(job_id.group(1), runs)
    assert found == cluster
    return job, Path(job_id.group(3))


@pytest.mark.parametrize("cluster", CLUSTERS)
def test_retr_demo_is_preempted_resumes_and_evaluates(cluster, demo, capsys):
    need(cluster)
    job, folder = launch(cluster, demo, capsys)
    wait_for(lambda: any((folder / "checkpoints").glob("state-*.pt")), 240, "the first resumable state")
    preempt(job)
    # generous: on a loaded 2-core machine the requeued job restarts, trains and evaluates slowly (7 min was too
    # short once, with other jobs running beside CI); a job that overruns is cancelled, not left holding the node
    done = jobs.wait_done(job, 1200)
    if not done:
        job.cancel(check=False)
    assert done, f"job {job.job_id} did not finish within 20 minutes"
    log = folder / f"{job.job_id}_0_log.err"
    text = log.read_text()
    assert "Job completed successfully" in text, text[-3000:]
    (stopped_at,) = log_ints(log, r"stopped by SIG\w+ at epoch \d+ step \d+ \(global step (\d+)\)")
    (resumed_from,) = log_ints(log, r"resumed from .*: epoch \d+, step \d+ \(global step (\d+)\)")
    with capsys.disabled():  # shown in the test output: the step the job resumed from
        print(f"\n{cluster} job {job.job_id} preempted: state saved at step {stopped_at}, resumed from {resumed_from}")
    assert "Requeued job" in text
    assert resumed_from >= stopped_at - EVERY and resumed_from == stopped_at
    steps = logged_steps(folder)
    total = steps[-1]
    assert total >= EPOCHS and sorted(set(steps)) == list(range(1, total + 1)), f"steps missing: {steps}"
    redone = sorted(s for s in set(steps) if steps.count(s) > 1)
    assert all(resumed_from < s <= resumed_from + EVERY for s in redone), f"steps trained twice: {redone}"
    # the job evaluated at the end and its folder holds what it should
    result = job.results()[0]
    assert 0.0 <= result["mAP"] <= 1.0 and result["global_step"] == total
    for name in ("config.json", "launch.json", "train.log", f"{job.job_id}_1_log.err"):
        assert (folder / name).is_file(), name
    assert list(folder.glob("mAP*.pth")) and list((folder / "checkpoints").glob("state-*.pt"))
    assert json.loads((folder / "config.json").read_text())["schedule"]["epochs"] == EPOCHS
    final = "COMPLETED" if cluster == "slurm" else "FINISHED"
    wait_for(lambda: jobs.job_state(job, cluster) == final, 60, f"state {final}")  # sacct lags the result files
    capsys.readouterr()
    assert main(["--status", job.job_id, "--runs", str(folder.parents[1])]) == 0
    out = capsys.readouterr().out
    assert f"job {job.job_id} ({cluster}): {final}" in out and "mAP=" in out


@pytest.mark.parametrize("cluster", CLUSTERS)
def test_cancelled_job_is_reported_without_hanging(cluster, demo, capsys):
    need(cluster)
    job, folder = launch(cluster, [*demo, "schedule.epochs=200"], capsys)
    try:
        if cluster == "slurm":
            wait_for(lambda: jobs.job_state(job, cluster) == "RUNNING", 120, "the job to start")
        start = time.monotonic()
        assert main(["--cancel", job.job_id, "--runs", str(folder.parents[1])]) == 0
        assert time.monotonic() - start < 60
        assert "CANCELLED" in capsys.readouterr().out
        assert jobs.wait_done(job, 30)
        if cluster == "slurm":  # the trainer's SIGTERM exit must not requeue a cancelled job
            time.sleep(5)
            assert not jobs.job_state(job, cluster).startswith(("PENDING", "REQUEUED", "RUNNING"))
    finally:
        if cluster == "slurm" and not job.done():
            job.cancel(check=False)  # never leave a 200-epoch job holding the test node


@pytest.mark.slurm
def test_unknown_partition_passes_slurms_message_on(demo, capsys):
    need("slurm")
    assert main(["--config", "retr_demo", "--cluster", "slurm", "launch.partition=no_such_partition", *demo]) == 2
    err = capsys.readouterr().err
    assert "SLURM rejected the job" in err and "invalid partition" in err.lower(), err
