"""submitit executors built from the config's launch section: SLURM (sbatch) or the local executor."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import submitit
from submitit.slurm.slurm import _make_sbatch_string

from configs import LaunchConfig

CLUSTERS = ("auto", "slurm", "local")


def resolve_cluster(choice: str) -> str:
    """``auto`` -> ``slurm`` when ``sbatch`` is on PATH, else ``local``; ``slurm`` requires ``sbatch``."""
    if choice not in CLUSTERS:
        raise ValueError(f"--cluster {choice!r} is not valid; choose one of {list(CLUSTERS)}")
    has_sbatch = shutil.which("sbatch") is not None
    if choice == "auto":
        return "slurm" if has_sbatch else "local"
    if choice == "slurm" and not has_sbatch:
        raise ValueError(
            "--cluster slurm (launch.cluster=slurm) needs SLURM, but `sbatch` is not on PATH; "
            "run on a SLURM login node, or use --cluster local (or auto) to run here"
        )
    return choice


def tasks_per_node(launch: LaunchConfig) -> int:
    """One task per GPU; on CPU, ``launch.cpu_tasks`` processes."""
    return launch.gpus_per_node if launch.gpus_per_node > 0 else launch.cpu_tasks


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


def slurm_parameters(launch: LaunchConfig, job_name: str) -> dict[str, Any]:
    """Parameters of ``submitit.SlurmExecutor`` (sbatch names) for the launch section."""
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
    if launch.gpus_per_node > 0:
        params["gpus_per_node"] = launch.gpus_per_node
    if launch.mem_gb > 0:
        params["mem"] = f"{launch.mem_gb}GB"
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(launch, key):
            params[key] = getattr(launch, key)
    return params


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


def make_executor(cluster: str, launch: LaunchConfig, folder: Path, job_name: str) -> submitit.Executor:
    """A SLURM or local executor writing its files into ``folder`` (which contains ``%j``)."""
    if cluster == "slurm":
        executor = submitit.SlurmExecutor(folder=folder)
        executor.update_parameters(**slurm_parameters(launch, job_name))
    else:
        executor = submitit.LocalExecutor(folder=folder)
        executor.update_parameters(**local_parameters(launch))
    return executor


def sbatch_script(launch: LaunchConfig, folder: Path, job_name: str, command: str) -> str:
    """The sbatch file submitit writes for this launch section (also without SLURM, for --dry-run)."""
    return _make_sbatch_string(command=command, folder=folder, **slurm_parameters(launch, job_name))
