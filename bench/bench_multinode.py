"""Scaling of retr_demo from 1 to 2 SLURM nodes at the same global batch: throughput and efficiency.

``python bench/bench_multinode.py [--rounds 2] [--epochs 2]`` submits, in alternation, a 1-node job and a
2-node job (one rank per node, gloo) through ``launch/slurm.py`` and waits for each; the throughput of a
job is global batch x optimizer steps / seconds between the first and the last logged step (TensorBoard
wall times, so start-up and evaluation are left out). Efficiency = throughput(2 nodes) / (2 x throughput(1)).
Needs the namespace cluster: ``bash tests/slurm/up.sh --nodes 2``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from launch import jobs  # noqa: E402
from launch.slurm import main as launch  # noqa: E402


def throughput(folder: Path, batch: int, skip: int = 2) -> float:
    """Images per second between the ``skip``-th and the last logged step (wall times of train/loss)."""
    events = []
    for path in (folder / "tb").rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(path), size_guidance={"scalars": 0})
        acc.Reload()
        if "train/loss" in acc.Tags()["scalars"]:
            events += acc.Scalars("train/loss")
    events.sort(key=lambda e: e.step)
    first, last = events[skip], events[-1]
    return batch * (last.step - first.step) / (last.wall_time - first.wall_time)


def run_job(nodes: int, overrides: list[str]) -> Path:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = launch(
            ["--config", "retr_demo", "--cluster", "slurm", "--wait", "0", f"launch.nodes={nodes}", *overrides]
        )  # noqa: E501
    found = re.search(r"submitted job (\d+) \(slurm, \d+ task\(s\)\) -> (\S+)", out.getvalue())
    if code != 0 or not found:
        raise RuntimeError(f"submission failed: {out.getvalue()}")
    folder = Path(found.group(2))
    job, _ = jobs.load_job(found.group(1), folder.parent.parent)
    if not jobs.wait_done(job, 1800):
        job.cancel(check=False)
        raise RuntimeError(f"job {job.job_id} did not finish in 30 minutes")
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2, help="1-node / 2-node pairs, alternated")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("overrides", nargs="*", help="overrides for both jobs, e.g. launch.env=OMP_NUM_THREADS=1")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench_multinode_"))
    from datasets.prepare import main as prepare

    data = [f"data.root={root / 'sample'}", f"data.shards={root / 'shards'}"]
    with contextlib.redirect_stdout(io.StringIO()):
        prepare(["--config", "retr_demo", *data])
    batch = 32
    common = [*data, f"output_dir={root / 'runs'}", "launch.cpu_tasks=1", "launch.cpus_per_task=1",
              f"schedule.epochs={args.epochs}", "eval.enabled=false", "train.log_every=1",
              f"data.batch_size={batch}", "checkpoint.every_steps=1000", *args.overrides]  # fmt: skip
    rates: dict[int, list[float]] = {1: [], 2: []}
    for _ in range(args.rounds):
        for nodes in (1, 2):
            rates[nodes].append(throughput(run_job(nodes, common), batch))
            print(f"{nodes} node(s): {rates[nodes][-1]:.1f} images/s", flush=True)
    one, two = statistics.median(rates[1]), statistics.median(rates[2])
    print(f"| nodes x ranks | images/s (median of {args.rounds}) | speed-up | efficiency |")
    print("| --- | --- | --- | --- |")
    print(f"| 1 x 1 | {one:.1f} | 1.00 | 1.00 |")
    print(f"| 2 x 1 | {two:.1f} | {two / one:.2f} | {two / (2 * one):.2f} |")


if __name__ == "__main__":
    main()
