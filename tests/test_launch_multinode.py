"""retr_demo on two SLURM nodes (network namespaces, tests/slurm/up.sh --nodes 2): one rank per node over gloo.

- the 2-node run ends with the same weights as 2 processes on one node;
- a node killed mid-run: the survivor names the lost rank and node, the job requeues (launch.requeue_on_failure)
  and resumes from its last state; the second loss exceeds the budget and the job ends, saying why;
- the time-limit signal reaches both nodes, the state is written once, the job requeues and resumes.
Minutes each on 2 CPU cores: marker ``slurm``.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch

from launch import jobs, ranks
from launch.result import read_result
from launch.slurm import main
from tests.conftest import REPO
from tests.launch_helpers import log_ints, logged_steps, preempt, release_requeued, wait_for
from trainers import checkpoint as ckpt

pytestmark = pytest.mark.slurm
EVERY = 4
NODE_SH = REPO / "tests" / "slurm" / "node.sh"


def _nodes() -> list[str]:
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N"], capture_output=True, text=True).stdout
    return sorted(set(out.split()))


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> list[str]:
    if shutil.which("sbatch") is None or len([n for n in _nodes() if n.startswith("detretr-n")]) < 2:
        pytest.skip("needs the two-node test cluster: bash tests/slurm/up.sh --nodes 2")
    from datasets.prepare import main as prepare

    root = tmp_path_factory.mktemp("retr_demo_2n")
    data = [f"data.root={root / 'sample'}", f"data.shards={root / 'shards'}"]
    prepare(["--config", "retr_demo", *data])
    return [*data, f"output_dir={root / 'runs'}", "launch.cpus_per_task=1", "launch.time_min=15", "eval.every=0",
            "train.log_every=1", f"checkpoint.every_steps={EVERY}", "train.dist_timeout_s=60"]  # fmt: skip


@pytest.fixture
def node2():
    """Node 2 is running again after the test, whatever the test did to it."""
    yield "detretr-n2"
    subprocess.run(["bash", str(NODE_SH), "start", "2"], check=True)
    wait_for(lambda: "detretr-n2 idle" in _states() or "detretr-n2 mix" in _states(), 90, "node 2 back")


def _states() -> str:
    return subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True).stdout


def submit(overrides: list[str], capsys) -> tuple[object, Path]:
    assert main(["--config", "retr_demo", "--cluster", "slurm", "--wait", "0", *overrides]) == 0
    out = capsys.readouterr().out
    found = re.search(r"submitted job (\d+) \(slurm, (\d+) task\(s\)\) -> (\S+)", out)
    assert found, out
    job, _ = jobs.load_job(found.group(1), Path(found.group(3)).parent.parent)
    return job, Path(found.group(3))


def final_weights(folder: Path) -> dict:
    return ckpt.load_state(ckpt.list_states(folder / "checkpoints")[-1])["model"]


def cancel_on_exit(job) -> None:
    if not job.done(force_check=True):
        job.cancel(check=False)


def test_two_nodes_train_like_two_processes_on_one_node(demo, capsys):
    runs = {}
    for layout in (["launch.nodes=2", "launch.cpu_tasks=1"], ["launch.nodes=1", "launch.cpu_tasks=2"]):
        job, folder = submit([*demo, "schedule.epochs=2", *layout], capsys)
        try:
            assert jobs.wait_done(job, 1500), f"job {job.job_id} ({layout}) did not finish in 25 minutes"
        finally:
            cancel_on_exit(job)
        text = (folder / f"{job.job_id}_0_log.err").read_text()
        assert "Job completed successfully" in text, text[-3000:]
        runs[layout[0]] = (job, folder)
    job, folder = runs["launch.nodes=2"]
    hosts = {int(r): h for r, h in re.findall(r"task rank (\d)/2 \(local 0\) on (\S+),", _task_logs(folder, job))}
    assert hosts == {0: "detretr-n1", 1: "detretr-n2"}, hosts
    # one run directory: both nodes' logs, one TensorBoard writer, one set of checkpoints, the best weights
    assert {p.name for p in folder.glob("*_log.err")} == {f"{job.job_id}_0_log.err", f"{job.job_id}_1_log.err"}
    writers = {tuple(p.name.split(".")[4:6]) for p in (folder / "tb").rglob("events.out.tfevents.*")}
    assert len(writers) == 1 and next(iter(writers))[0] == "detretr-n1", writers  # (host, pid) of rank 0 only
    assert len(list(folder.glob("mAP*.pth"))) == 1 and (folder / "train.log").is_file()
    assert "2 process(es)" in (folder / "train.log").read_text()
    two_nodes, one_node = final_weights(folder), final_weights(runs["launch.nodes=1"][1])
    for key, value in two_nodes.items():
        assert torch.equal(value, one_node[key]), f"2 nodes and 1 node x 2 processes differ at {key}"
    assert _global_step(folder) == _global_step(runs["launch.nodes=1"][1]) > 0


def _global_step(folder: Path) -> int:
    record = read_result(folder)
    assert record and record["state"] == "success", record
    return record["result"]["global_step"]


def _task_logs(folder: Path, job) -> str:
    return "".join(p.read_text(errors="replace") for p in sorted(folder.glob(f"{job.job_id}_*_log.err")))


def _step(state: Path) -> int:
    return int(state.stem.split("-")[1])


def _kill_node2_after_state(folder: Path, newer_than: int = 0) -> tuple[float, int]:
    """Kill node 2 once a state after step ``newer_than`` exists: (time of the kill, newest state's step)."""
    wait_for(lambda: any(_step(p) > newer_than for p in ckpt.list_states(folder / "checkpoints")), 600,
             f"a resumable state after step {newer_than}")  # fmt: skip
    subprocess.run(["bash", str(NODE_SH), "kill", "2"], check=True)
    return time.monotonic(), max(_step(p) for p in ckpt.list_states(folder / "checkpoints"))


def test_lost_node_is_named_and_requeued_once(demo, node2, capsys):
    job, folder = submit([*demo, "schedule.epochs=12", "launch.nodes=2", "launch.cpu_tasks=1",
                          "launch.requeue_on_failure=1"], capsys)  # fmt: skip
    try:
        killed, saved = _kill_node2_after_state(folder)
        wait_for(lambda: ranks.read_failures(folder), 90, "the survivor's failure record")
        (record,) = ranks.read_failures(folder)
        assert [(s["rank"], s["host"]) for s in record["lost"]] == [(1, "detretr-n2")], record
        assert record["reported_by"]["rank"] == 0 and record["restart"] == 0
        release_requeued(job.job_id, after=0)  # the survivor requeued the job
        noticed = time.monotonic() - killed
        subprocess.run(["bash", str(NODE_SH), "start", "2"], check=True)  # the node comes back
        wait_for(lambda: "resumed from" in (folder / "train.log").read_text(), 300, "the resumed run")
        (resumed,) = log_ints(folder / "train.log", r"resumed from .*\(global step (\d+)\)")
        assert resumed >= saved  # from the last state: at most checkpoint.every_steps steps are done again
        # second loss: the budget (1) is used, the job ends in bounded time instead of requeueing again
        killed, _ = _kill_node2_after_state(folder, newer_than=resumed)
        assert jobs.wait_done(job, 120), "the job did not end within 2 minutes of losing its node again"
        ended = time.monotonic() - killed
    finally:
        cancel_on_exit(job)
    # TensorBoard: the steps a killed allocation had flushed, then the resumed ones; none missing, and none done
    # twice beyond the checkpoint interval
    steps = logged_steps(folder)
    assert sorted(set(steps)) == list(range(1, max(steps) + 1)), f"steps missing: {steps}"
    redone = sorted(s for s in set(steps) if steps.count(s) > 1)
    assert all(resumed < s <= resumed + EVERY for s in redone), f"lost more than a checkpoint interval: {redone}"
    failures = ranks.read_failures(folder)
    assert [r["restart"] for r in failures] == [0, 1] and failures[1]["lost"][0]["host"] == "detretr-n2"
    text = _task_logs(folder, job)
    assert "requeueing job" in text and "not requeued: launch.requeue_on_failure=1" in text
    wait_for(lambda: not jobs.job_state(job, "slurm").startswith(("RUNNING", "COMPLETING")), 60, "the final state")
    state = jobs.job_state(job, "slurm")
    assert state.startswith(("NODE_FAIL", "FAILED")), state
    capsys.readouterr()
    assert main(["--status", job.job_id, "--runs", str(folder.parents[1])]) == 0
    out = capsys.readouterr().out
    assert "lost:   rank 1 on detretr-n2" in out and "detretr-n2" in out.split("lost:", 2)[-1], out
    with capsys.disabled():
        print(f"\nnode lost: requeued after {noticed:.0f} s, resumed from step {resumed}; second loss ended the "
              f"job ({state}) in {ended:.0f} s")  # fmt: skip


def test_time_limit_signal_reaches_both_nodes_and_the_job_resumes(demo, capsys):
    job, folder = submit([*demo, "schedule.epochs=3", "launch.nodes=2", "launch.cpu_tasks=1"], capsys)
    try:
        wait_for(lambda: ckpt.list_states(folder / "checkpoints"), 300, "the first resumable state")
        preempt(job)  # USR2 to every task on both nodes, as at the time limit; then release the requeued job
        assert jobs.wait_done(job, 1500), f"job {job.job_id} did not finish within 25 minutes"
    finally:
        cancel_on_exit(job)
    text = _task_logs(folder, job)
    assert "Job completed successfully" in text, text[-3000:]
    # each rank received the signal itself (a rank that only learnt of it from the other would exit with 143):
    # rank 0 says so; for rank 1 (which logs warnings only) srun reports its exit code, 128 + SIGUSR2
    assert "rank 0: the trainer stopped with exit code 140" in text
    # (or srun ends it while the requeue tears the step down, when rank 0 got there first)
    assert re.search(r"srun: error: detretr-n2: task 1: (Exited with exit code 140|Terminated)", text), text[-4000:]
    train_log = (folder / "train.log").read_text()
    (stopped,) = log_ints(folder / "train.log", r"stopped by SIGUSR2 at .*\(global step (\d+)\)")
    (resumed,) = log_ints(folder / "train.log", r"resumed from .*\(global step (\d+)\)")
    assert resumed == stopped and train_log.count("stopped by SIGUSR2") == 1
    steps = logged_steps(folder)
    assert sorted(set(steps)) == list(range(1, max(steps) + 1)) and len(steps) == len(set(steps)), steps
    assert _global_step(folder) == max(steps)
