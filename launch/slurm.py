"""Launch a config's trainer through submitit, on SLURM or locally; follow, query and cancel jobs.

``python launch/slurm.py --config NAME [--cluster auto|slurm|local] [--dry-run] [--wait S] [overrides]``,
``python launch/slurm.py --status JOBID`` and ``python launch/slurm.py --cancel JOBID``.
"""

# ruff: noqa: E402  (the repository root goes on sys.path before the project imports when run as a script)
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import submitit

from configs import ExperimentConfig, LaunchConfig, apply_overrides, config_kind, load_config, parse_overrides
from launch import jobs
from launch.cluster import check_request
from launch.executor import make_executor, resolve_cluster, sbatch_script, tasks_per_node, world_sizes
from launch.job import TrainJob, trainer_module

REPO = Path(__file__).resolve().parents[1]


def job_spec(name: str, overrides: list[str]) -> tuple[ExperimentConfig | None, LaunchConfig, tuple[str, ...]]:
    """(dataclass config or None, launch section, mmengine cfg-options) for config ``name``.

    mmengine (detection) configs have no launch section: ``launch.*`` overrides go to a default
    ``LaunchConfig`` and the other ``key=value`` overrides become mmengine cfg-options.
    """
    if config_kind(name) == "dataclass":
        cfg = load_config(name, overrides)
        return cfg, cfg.launch, ()
    pairs = parse_overrides(overrides)
    launch = apply_overrides(LaunchConfig(), [(k[len("launch.") :], v) for k, v in pairs if k.startswith("launch.")])
    options = tuple(f"{k}={v}" for k, v in pairs if not k.startswith("launch."))
    return None, launch, options


def submit(
    name: str,
    overrides: list[str],
    cluster: str | None = None,
    dry_run: bool = False,
    trainer: str | None = None,
) -> submitit.Job | None:
    """Submit config ``name``; returns the job (None for a dry run). ``trainer`` overrides the module."""
    cfg, launch, options = job_spec(name, overrides)
    if cfg is not None:
        check_world_sizes(cfg, launch)  # before queueing: a requeue onto another node count must not fail there
    cluster = resolve_cluster(cluster or launch.cluster, preview=dry_run)
    job_name = cfg.name if cfg is not None else name
    output_dir = Path(cfg.output_dir if cfg is not None else "runs").resolve()
    folder = output_dir / job_name / "%j"
    task = TrainJob(cfg, name, trainer or trainer_module(cfg), launch.gpus_per_node > 0, launch.cpus_per_task, options,
                    requeue_on_failure=launch.requeue_on_failure)  # fmt: skip
    shared = {"repository": REPO, "python": Path(sys.executable), "output_dir": output_dir}
    if cfg is not None:
        shared["data.shards"] = Path(cfg.data.shards).resolve()
    if dry_run:
        print_dry_run(task, launch, cluster, folder, job_name, shared)
        return None
    private_job_folders(folder.parent)
    if cfg is not None and trainer is None:
        from datasets.prepare import ensure_shards

        ensure_shards(cfg)  # prepare the embedded sample, or fail here (not minutes later in the job) without shards
    # the tasks import this repository (also when it is not pip-installed)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    if cluster == "slurm":
        check_request(launch, tasks_per_node(launch))  # refuse what would stay PENDING for ever
    output_dir.mkdir(parents=True, exist_ok=True)
    executor = make_executor(cluster, launch, folder, job_name, shared)
    try:
        job = executor.submit(task)
    except submitit.core.utils.FailedJobError as exc:
        raise RuntimeError(f"SLURM rejected the job ({cluster} executor):\n{jobs.sbatch_error(exc)}") from None
    jobs.write_record(job, cluster, name, launch)
    return job


def check_world_sizes(cfg, launch: LaunchConfig) -> None:
    """Refuse before queueing a job whose global batch does not divide on every process count it may run with
    (with ``launch.min_nodes``, a start or a requeue may get any node count from MIN to MAX)."""
    for world in world_sizes(launch):
        if cfg.data.batch_size % (world * cfg.optim.grad_accum):
            nodes = world // tasks_per_node(launch)
            raise ValueError(
                f"data.batch_size={cfg.data.batch_size} is not divisible by {world} process(es) x "
                f"optim.grad_accum={cfg.optim.grad_accum}, which the job runs with on {nodes} node(s) "
                f"(launch.min_nodes={launch.min_nodes}, launch.nodes={launch.nodes}): choose a batch size that every "
                f"node count divides, or narrow launch.min_nodes"
            )


def private_job_folders(parent: Path) -> None:
    """Job folders only their owner can write: the job unpickles submitit's ``*_submitted.pkl`` from there.

    New folders get no group/other write bit (the umask also reaches the job, which writes its requeue
    state there); an existing ``runs/NAME`` that others can write, or that someone else owns, is refused.
    """
    os.umask(os.umask(0) | 0o022)
    parent.mkdir(parents=True, exist_ok=True)
    st = parent.stat()
    if st.st_mode & 0o022 or st.st_uid != os.getuid():
        raise ValueError(
            f"job folder parent {parent} can be written by other users (mode {st.st_mode & 0o777:o}, owner uid "
            f"{st.st_uid}); the job loads submitit's pickled call from there, so that would let them run code "
            f"as you: `chmod go-w {parent}`, or choose another output_dir"
        )


def print_dry_run(
    task: TrainJob, launch: LaunchConfig, cluster: str, folder: Path, job_name: str, shared: dict[str, Path]
) -> None:
    command = f"{sys.executable} -u -m submitit.core._submit {folder}"
    ntasks = tasks_per_node(launch) * launch.nodes
    print(f"# dry run: nothing submitted; cluster={cluster}; job folder {folder} (%j = job id)")
    print("# sbatch script (what SLURM receives):")
    print(sbatch_script(launch, folder, job_name, command, shared))
    print(f"# each of the {ntasks} task(s) runs: {command}")
    print(f"#   which calls: {task.describe()}")


def print_follow(job: submitit.Job, cluster: str) -> None:
    folder = Path(job.paths.folder)
    me = "python launch/slurm.py" if Path.cwd().resolve() == REPO else f"python {Path(__file__).resolve()}"
    queue = f"squeue -j {job.job_id}" if cluster == "slurm" else f"ps -o pid,etime,args --ppid {job.job_id}"
    record = jobs.find_record(str(job.job_id), folder.parent)
    tasks = record[1].get("tasks", job.num_tasks) if record else job.num_tasks
    print(f"submitted job {job.job_id} ({cluster}, {tasks} task(s)) -> {folder}")
    print(f"  log:         tail -f {job.paths.stdout} {job.paths.stderr}")
    print(f"  queue:       {queue}")
    print(f"  tensorboard: tensorboard --logdir {folder / 'tb'} --host 127.0.0.1")
    print(f"  status:      {me} --status {job.job_id}")
    print(f"  cancel:      {me} --cancel {job.job_id}")


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="experiment config name (configs/NAME.py)")
    parser.add_argument("--cluster", choices=("auto", "slurm", "local"), help="default: the config's launch.cluster")
    parser.add_argument("--dry-run", action="store_true", help="print the sbatch script and command; submit nothing")
    parser.add_argument(
        "--wait", type=float, default=None,
        help="seconds to wait for the result (default: the time limit + 2 min for local jobs, 0 on SLURM)",
    )  # fmt: skip
    parser.add_argument("--status", metavar="JOBID", help="print the state (and result) of a job")
    parser.add_argument("--cancel", metavar="JOBID", help="cancel a job")
    parser.add_argument("--runs", default="runs", help="run root where --status/--cancel look for job folders")
    return parser.parse_known_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args, overrides = parse_args(argv)
    try:
        if args.status or args.cancel:
            if overrides or args.config:
                raise ValueError("--status/--cancel take a job id only (and --runs DIR)")
            return jobs.print_status(args.status, args.runs) if args.status else jobs.cancel(args.cancel, args.runs)
        if not args.config:
            raise ValueError("--config NAME is required (or --status/--cancel JOBID)")
        job = submit(args.config, overrides, cluster=args.cluster, dry_run=args.dry_run)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if job is None:
        return 0
    cluster = "slurm" if isinstance(job, submitit.SlurmJob) else "local"
    print_follow(job, cluster)
    wait = args.wait if args.wait is not None else (0.0 if cluster == "slurm" else jobs.record_wait_s(job))
    return jobs.wait_and_report(job, wait) if wait > 0 else 0


if __name__ == "__main__":
    sys.exit(main())
