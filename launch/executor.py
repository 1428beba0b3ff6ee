"""submitit executors built from the config's launch section: SLURM (sbatch) or the local executor."""

from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path
from typing import Any

import submitit
from submitit.slurm.slurm import _make_sbatch_string

from configs import LaunchConfig
from launch.task_exit import wrapper_command

CLUSTERS = ("auto", "slurm", "local")


def resolve_cluster(choice: str, preview: bool = False) -> str:
    """``auto`` -> ``slurm`` when ``sbatch`` is on PATH, else ``local``; ``slurm`` requires ``sbatch``, except for a
    ``preview`` (a dry run prints the sbatch script anywhere, e.g. on a laptop)."""
    if choice not in CLUSTERS:
        raise ValueError(f"--cluster {choice!r} is not valid; choose one of {list(CLUSTERS)}")
    has_sbatch = shutil.which("sbatch") is not None
    if choice == "auto":
        return "slurm" if has_sbatch else "local"
    if choice == "slurm" and not has_sbatch and not preview:
        raise ValueError(
            "--cluster slurm (launch.cluster=slurm) needs SLURM, but `sbatch` is not on PATH; "
            "run on a SLURM login node, or use --cluster local (or auto) to run here"
        )
    return choice


def tasks_per_node(launch: LaunchConfig) -> int:
    """One task per GPU; on CPU, ``launch.cpu_tasks`` processes."""
    return launch.gpus_per_node if launch.gpus_per_node > 0 else launch.cpu_tasks


def task_count(launch: LaunchConfig) -> str:
    """Tasks of the job in words: ``"4"``, or ``"2-4"`` when ``launch.min_nodes`` lets it run on fewer nodes."""
    per_node = tasks_per_node(launch)
    if 0 < launch.min_nodes < launch.nodes:
        return f"{launch.min_nodes * per_node}-{launch.nodes * per_node}"
    return str(launch.nodes * per_node)


def world_sizes(launch: LaunchConfig) -> range:
    """The process counts the job may run with: one per node count from ``launch.min_nodes`` to ``launch.nodes``."""
    per_node, low = tasks_per_node(launch), launch.min_nodes or launch.nodes
    return range(low * per_node, launch.nodes * per_node + 1, per_node)


def extra_sbatch_parameters(lines: tuple[str, ...]) -> dict[str, Any]:
    """``("--exclusive", "--mail-type=END")`` -> ``{"exclusive": True, "mail-type": "END"}``."""
    params: dict[str, Any] = {}
    for line in lines:
        text = line.strip()
        if text.startswith("#SBATCH"):
            text = text[len("#SBATCH") :].strip()
        if not text.startswith("--") or len(text) < 3:
            raise ValueError(f"launch.extra_sbatch entry {line!r} must look like '--option' or '--option=value'")
        key, _, value = text[2:].partition("=")
        params[key] = value if value else True
    return params


def task_environment(launch: LaunchConfig) -> list[str]:
    """``export`` lines for the sbatch script: the network interface for NCCL/gloo and ``launch.env``."""
    pairs = [tuple(item.split("=", 1)) for item in launch.env]
    if launch.network_interface:
        pairs = [("NCCL_SOCKET_IFNAME", launch.network_interface), ("GLOO_SOCKET_IFNAME", launch.network_interface)]
        pairs += [tuple(item.split("=", 1)) for item in launch.env]
    return [f"export {name}={shlex.quote(value)}" for name, value in pairs]


def shared_filesystem_check(paths: dict[str, Path]) -> list[str]:
    """sbatch lines: one step per node checks that every path is there, so a path that only the login node
    sees fails in seconds with the node's name, not as an import or file error deep in every task."""
    tests = " && ".join(f"test -e {shlex.quote(str(p))}" for p in paths.values())
    names = re.sub(r'(["$`\\])', r"\\\1", ", ".join(f"{key}={p}" for key, p in paths.items()))
    message = f"not visible on node $(hostname): {names}; they must be on a filesystem every node mounts"
    check = f'{tests} || {{ echo "{message}" >&2; exit 1; }}'
    return [
        "# the paths the tasks need exist on every node (a shared filesystem)",
        f"srun --ntasks-per-node=1 --ntasks=$SLURM_JOB_NUM_NODES bash -c {shlex.quote(check)} || exit 1",
    ]


def slurm_parameters(launch: LaunchConfig, job_name: str, shared: dict[str, Path] | None = None) -> dict[str, Any]:
    """Parameters of ``submitit.SlurmExecutor`` (sbatch names) for the launch section.

    ``shared``: paths (by config key) that every node must see, checked on every node before the tasks start.
    """
    setup = task_environment(launch) + (shared_filesystem_check(shared) if shared else [])
    params: dict[str, Any] = {
        "job_name": job_name,
        "nodes": launch.nodes,
        "ntasks_per_node": tasks_per_node(launch),
        "cpus_per_task": launch.cpus_per_task,
        "time": launch.time_min,
        "signal_delay_s": launch.signal_delay_s,
        # requeueable even where the cluster's JobRequeue default is 0 (preemption / time limit resume)
        "additional_parameters": {"requeue": True, **extra_sbatch_parameters(launch.extra_sbatch)},
    }
    if 0 < launch.min_nodes < launch.nodes:
        elastic_nodes(params, launch)
    if setup:
        params["setup"] = setup
    if launch.gpus_per_node > 0:
        params["gpus_per_node"] = launch.gpus_per_node
    if launch.mem_gb > 0:
        params["mem"] = f"{launch.mem_gb}GB"
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(launch, key):
            params[key] = getattr(launch, key)
    return params


def elastic_nodes(params: dict[str, Any], launch: LaunchConfig) -> None:
    """sbatch ``--nodes=MIN-MAX``: the job starts (or restarts, requeued) on as many nodes as are free, at least MIN.

    The tasks per node then go to srun, not sbatch: ``#SBATCH --ntasks-per-node=T`` makes the job's task count
    MIN x T, and SLURM sizes the job to its tasks, so it got MIN nodes even with MAX idle (measured with SLURM
    22.05, select/cons_tres). The one task per node that the allocation then implies holds the CPUs of all T.
    """
    tasks = params.pop("ntasks_per_node")
    params["cpus_per_task"] = tasks * launch.cpus_per_task
    params["srun_args"] = [f"--ntasks-per-node={tasks}", f"--cpus-per-task={launch.cpus_per_task}"]
    params["additional_parameters"]["nodes"] = f"{launch.min_nodes}-{launch.nodes}"


def local_parameters(launch: LaunchConfig) -> dict[str, Any]:
    """Parameters of ``submitit.LocalExecutor``; it runs one node only."""
    if launch.nodes != 1:
        raise ValueError(f"launch.nodes={launch.nodes}: the local executor runs one node; use SLURM for more")
    if launch.gpus_per_node > 0:
        import torch

        found = torch.cuda.device_count()
        if launch.gpus_per_node > found:
            raise ValueError(
                f"launch.gpus_per_node={launch.gpus_per_node} but this machine has {found} CUDA device(s); "
                "use launch.gpus_per_node=0 to train on CPU (launch.cpu_tasks processes)"
            )
    params: dict[str, Any] = {
        "tasks_per_node": tasks_per_node(launch),
        "timeout_min": launch.time_min,
        "signal_delay_s": launch.signal_delay_s,
    }
    if launch.gpus_per_node > 0:
        params["gpus_per_node"] = launch.gpus_per_node
    return params


def make_executor(
    cluster: str, launch: LaunchConfig, folder: Path, job_name: str, shared: dict[str, Path] | None = None
) -> submitit.Executor:
    """A SLURM or local executor writing its files into ``folder`` (which contains ``%j``)."""
    if cluster == "slurm":
        executor = submitit.SlurmExecutor(folder=folder)
        executor.update_parameters(**slurm_parameters(launch, job_name, shared))
    else:
        # each task under launch.task_exit, which records how it ended (a signal, an exit code)
        executor = submitit.LocalExecutor(folder=folder, python=wrapper_command())
        executor.update_parameters(**local_parameters(launch))
    return executor


def sbatch_script(
    launch: LaunchConfig, folder: Path, job_name: str, command: str, shared: dict[str, Path] | None = None
) -> str:
    """The sbatch file submitit writes for this launch section (also without SLURM, for --dry-run)."""
    return _make_sbatch_string(command=command, folder=folder, **slurm_parameters(launch, job_name, shared))
