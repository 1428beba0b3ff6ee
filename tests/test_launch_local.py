"""Launcher end to end on submitit's local executor (no SLURM): submit 2 tasks, preempt, resume, status, cancel.

The real trainer (trainers/retrieval.py) runs a tiny model on the sample; tests/test_launch_retr_demo.py runs the
whole retr_demo recipe with evaluation (slow).
"""

from __future__ import annotations

import json
import pickle
import shutil
import time
from pathlib import Path

import pytest

from configs import from_dict, load_config
from launch import jobs
from launch.slurm import main, submit
from tests.launch_helpers import log_ints, logged_steps, preempt, wait_for_first_state

EPOCHS, ITERS, EVERY = 6, 20, 5
TINY = [
    "model.backbone=test_resnet",
    "data.height=32",
    "data.width=32",
    "data.batch_size=8",
    "data.num_workers=0",
    "eval.enabled=false",
    "train.log_every=1",
    "schedule.warmup_epochs=1",
    "schedule.milestones=2",
]
OVERRIDES = [
    *TINY,
    "launch.cpu_tasks=2",
    "launch.cpus_per_task=1",
    "launch.time_min=30",  # the time-limit signal (launch.signal_delay_s before it) must not come on its own
    f"schedule.epochs={EPOCHS}",
    f"schedule.iters_per_epoch={ITERS}",
    f"checkpoint.every_steps={EVERY}",
]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[str]:
    from datasets.prepare import main as prepare

    root = tmp_path_factory.mktemp("sample")
    data = [f"data.root={root / 'raw'}", f"data.shards={root / 'shards'}"]
    prepare(["--config", "retr_demo", "--no-progress", *data])
    return data


@pytest.fixture(scope="module")
def preempted(tmp_path_factory, shards):
    """A 2-task local job preempted once its first checkpoint is written, requeued, and finished.

    The signal comes as soon as a state exists, whatever the speed of the machine: the job must still be training
    when it arrives (its 120 steps leave over 100 after the first state), and the pruning of old states
    (checkpoint.keep_last) must not hide the state it waits for."""
    root = tmp_path_factory.mktemp("runs")
    job = submit("retr_demo", [*OVERRIDES, *shards, f"output_dir={root}"], cluster="local")
    folder = Path(job.paths.folder)
    wait_for_first_state(job, folder)
    preempt(job)
    assert jobs.wait_done(job, 300), "the preempted job did not finish within 300 s"
    return job, folder, root


def test_local_job_trains_with_two_synced_tasks(preempted, shards):
    job, folder, _ = preempted
    results = job.results()  # this test's own job: its result pickles are trusted here, never by the launcher
    assert [r["world_size"] for r in results] == [2, 2]
    record = json.loads((folder / "result.json").read_text())
    assert record["state"] == "success" and record["result"] == json.loads(json.dumps(results[0]))
    assert all(r["global_step"] == EPOCHS * ITERS and r["ended"] == "finished" for r in results)
    assert folder.name == job.job_id and folder.parent.name == "retr_demo"
    saved = json.loads((folder / "config.json").read_text())
    assert saved.pop("resolved")["world_size"] == 2  # what the trainer derived at run time
    saved = from_dict(saved)
    assert saved == load_config("retr_demo", [*OVERRIDES, *shards, f"output_dir={folder.parents[1]}"])
    for rank in (0, 1):
        assert (folder / f"{job.job_id}_{rank}_log.err").is_file()
    assert list((folder / "tb").rglob("events.out.tfevents.*"))
    assert json.loads((folder / "launch.json").read_text())["cluster"] == "local"


def test_local_preemption_requeues_and_resumes_without_losing_steps(preempted, capsys):
    job, folder, _ = preempted
    log = folder / f"{job.job_id}_0_log.err"
    (saved_at,) = log_ints(log, r"stopped by SIG\w+ at epoch \d+ step \d+ \(global step (\d+)\)")
    (resumed_from,) = log_ints(log, r"resumed from .*: epoch \d+, step \d+ \(global step (\d+)\)")
    with capsys.disabled():
        print(f"\nlocal tiny job preempted: state saved at step {saved_at}, resumed from step {resumed_from}")
    assert "Requeued job" in log.read_text()
    assert EVERY <= saved_at < EPOCHS * ITERS and resumed_from == saved_at
    steps = logged_steps(folder)
    assert sorted(set(steps)) == list(range(1, EPOCHS * ITERS + 1)), "a step is missing from the logs"
    redone = [s for s in set(steps) if steps.count(s) > 1]
    assert all(resumed_from < s <= resumed_from + EVERY for s in redone), f"steps trained twice: {redone}"


def test_status_reports_the_finished_job(preempted, capsys):
    job, _, root = preempted
    assert main(["--status", job.job_id, "--runs", str(root)]) == 0
    out = capsys.readouterr().out
    assert f"job {job.job_id} (local): FINISHED" in out and "world_size=2" in out


def test_cancel_stops_a_local_job_and_reports_it(tmp_path, shards, capsys):
    job = submit("retr_demo", [*OVERRIDES, *shards, "schedule.epochs=1000", f"output_dir={tmp_path}"], cluster="local")
    start = time.monotonic()
    assert main(["--cancel", job.job_id, "--runs", str(tmp_path)]) == 0
    assert time.monotonic() - start < 30
    assert jobs.wait_done(job, 10)
    assert "CANCELLED" in capsys.readouterr().out
    main(["--status", job.job_id, "--runs", str(tmp_path)])
    assert f"job {job.job_id} (local): CANCELLED" in capsys.readouterr().out


def test_a_job_that_fails_early_is_reported_without_hanging(tmp_path, capsys):
    job = submit("retr_demo", [f"output_dir={tmp_path}"], cluster="local", trainer="tests.no_such_trainer")
    assert jobs.wait_and_report(job, 60) == 1
    out = capsys.readouterr().out
    assert f"job {job.job_id} failed: ModuleNotFoundError: No module named 'tests.no_such_trainer'" in out
    assert str(job.paths.stderr) in out


class _PlantedPickle:
    """What another user could leave in a shared job folder: unpickling it creates a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_status_and_cancel_never_unpickle_files_in_the_job_folder(preempted, tmp_path, capsys):
    job, folder, _ = preempted
    runs = tmp_path / "runs"
    copy = shutil.copytree(folder, runs / "retr_demo" / job.job_id)
    marker = tmp_path / "code-ran"
    pickles = list(copy.glob("*.pkl"))
    assert pickles, "submitit wrote no result pickles"
    for path in pickles:
        path.write_bytes(pickle.dumps(("success", _PlantedPickle(marker))))
    assert main(["--status", job.job_id, "--runs", str(runs)]) == 0
    assert main(["--cancel", job.job_id, "--runs", str(runs)]) == 0
    assert not marker.exists(), "a planted pickle ran code"
    out = capsys.readouterr().out
    assert f"job {job.job_id} (local): FINISHED" in out and "world_size=2" in out
