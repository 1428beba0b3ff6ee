"""What the SLURM partition offers: refuse a request no node can satisfy, and explain why a job is pending.

Node sizes come from ``sinfo`` (CPUs, memory, GPUs as generic resources, time limit of the partition), so a
request is checked against the cluster before ``sbatch``, instead of sitting PENDING for ever.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass

from configs import LaunchConfig

SINFO_FORMAT = "%N|%P|%c|%m|%G|%t|%l"


@dataclass
class Node:
    name: str
    partition: str
    cpus: int
    mem_mb: int
    gpus: int
    state: str
    time_limit_min: int  # of the partition; 0 = unlimited


def gpu_count(gres: str) -> int:
    """GPUs in a ``sinfo %G`` field: ``gpu:8``, ``gpu:a100:4(S:0-1)``, ``gpu:a100:4,gpu:v100:2``; else 0."""
    total = 0
    for item in gres.split(","):
        item = re.sub(r"\(.*?\)", "", item).strip()
        if item.startswith("gpu"):
            count = item.rsplit(":", 1)[-1]
            total += int(count) if count.isdigit() else 1
    return total


def minutes(limit: str) -> int:
    """SLURM time limit (``infinite``, ``MM``, ``HH:MM:SS``, ``D-HH:MM:SS``) in minutes; 0 = unlimited."""
    if limit in ("infinite", "UNLIMITED", "n/a", ""):
        return 0
    days, _, rest = limit.rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    if days:  # D-HH, D-HH:MM, D-HH:MM:SS
        return int(days) * 1440 + parts[0] * 60 + (parts[1] if len(parts) > 1 else 0)
    if len(parts) == 3:  # HH:MM:SS
        return parts[0] * 60 + parts[1]
    return parts[0]  # MM or MM:SS


def partition_nodes(partition: str = "") -> tuple[str, list[Node]]:
    """(partition name, its nodes); the default partition (``*`` in sinfo) when ``partition`` is empty."""
    cmd = ["sinfo", "-h", "-N", "-o", SINFO_FORMAT] + (["-p", partition] if partition else [])
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=True).stdout
    nodes = []
    for line in out.splitlines():
        name, part, cpus, mem, gres, state, limit = line.split("|")
        is_default = part.endswith("*")
        part = part.rstrip("*")
        if partition and part != partition or not partition and not is_default:
            continue
        mem_mb = int(re.sub(r"\D.*", "", mem) or 0)
        nodes.append(Node(name, part, int(cpus), mem_mb, gpu_count(gres), state.rstrip("*~#"), minutes(limit)))
    return (nodes[0].partition if nodes else partition), nodes


@dataclass
class Request:
    nodes: int
    tasks: int  # per node
    cpus: int  # per node
    gpus: int  # per node
    mem_mb: int  # per node; 0 = the cluster's default
    time_min: int


def request_of(launch: LaunchConfig, tasks_per_node: int) -> Request:
    return Request(launch.nodes, tasks_per_node, tasks_per_node * launch.cpus_per_task, launch.gpus_per_node,
                   launch.mem_gb * 1024, launch.time_min)  # fmt: skip


def fits(node: Node, req: Request) -> bool:
    return node.cpus >= req.cpus and node.gpus >= req.gpus and (req.mem_mb == 0 or node.mem_mb >= req.mem_mb)


def problems(req: Request, partition: str, nodes: list[Node], min_nodes: int = 0) -> list[str]:
    """What in the request no node (or not enough nodes) of the partition can satisfy; empty = it fits."""
    out = []
    biggest = max(nodes, key=lambda n: (n.gpus, n.cpus, n.mem_mb))
    if req.gpus > max(n.gpus for n in nodes):
        out.append(f"launch.gpus_per_node={req.gpus}, but no node has more than {max(n.gpus for n in nodes)} GPU(s)")
    if req.cpus > max(n.cpus for n in nodes):
        out.append(
            f"{req.tasks} task(s) per node x launch.cpus_per_task={req.cpus // req.tasks} = {req.cpus} CPUs per node, "
            f"but no node has more than {max(n.cpus for n in nodes)} CPUs"
        )
    if req.mem_mb > max(n.mem_mb for n in nodes):
        out.append(f"launch.mem_gb={req.mem_mb // 1024}, but no node has more than {biggest.mem_mb // 1024} GB")
    able = [n for n in nodes if fits(n, req)]
    needed = min(req.nodes, min_nodes) if min_nodes else req.nodes
    if not out and len(able) < needed:
        out.append(f"launch.nodes={req.nodes} needs {needed} node(s) like that; partition {partition} has {len(able)}")
    limit = nodes[0].time_limit_min
    if limit and req.time_min > limit:
        out.append(f"launch.time_min={req.time_min} exceeds the partition's time limit of {limit} min")
    return out


def what_fits(nodes: list[Node], req: Request, gpu: bool) -> str:
    """A request that would fit, in launch.* settings, from the largest node."""
    big = max(nodes, key=lambda n: (n.gpus, n.cpus))
    count = sum(n.cpus >= big.cpus and n.gpus >= big.gpus for n in nodes)
    if gpu and big.gpus == 0:
        return "no GPUs in this partition: launch.gpus_per_node=0 (CPU), " + what_fits(nodes, req, gpu=False)
    if gpu:
        tasks = min(req.tasks, big.gpus) or 1
        return (f"launch.nodes<={count} launch.gpus_per_node<={big.gpus} launch.cpus_per_task<={big.cpus // tasks} "
                f"(largest node: {big.name}, {big.gpus} GPU(s), {big.cpus} CPUs, {big.mem_mb // 1024} GB)")  # fmt: skip
    per_task = max(1, min(req.cpus // req.tasks, big.cpus))
    tasks = max(1, big.cpus // per_task)
    return (f"launch.nodes<={count} with launch.cpu_tasks={tasks} launch.cpus_per_task={per_task} "
            f"(largest node: {big.name}, {big.cpus} CPUs, {big.mem_mb // 1024} GB, {big.gpus} GPU(s))")  # fmt: skip


def check_request(launch: LaunchConfig, tasks_per_node: int) -> None:
    """Raise ValueError when the partition cannot run the request (it would stay PENDING for ever)."""
    if shutil.which("sinfo") is None:
        return
    req = request_of(launch, tasks_per_node)
    partition, nodes = partition_nodes(launch.partition)
    if not nodes:
        return  # an unknown partition: sbatch's own message says so
    found = problems(req, partition, nodes, launch.min_nodes)
    if found:
        hint = f"\n  what fits: {what_fits(nodes, req, launch.gpus_per_node > 0)}"
        raise ValueError(f"partition {partition or '(default)'} cannot run this job:\n  " + "\n  ".join(found) + hint)


# squeue's pending reasons, in words, with the setting that changes them
PENDING_REASONS = {
    "Resources": "waiting for nodes to free up (the request fits the cluster; other jobs use it now)",
    "Priority": "other jobs have priority; it starts when they do",
    "BeginTime": "held until its start time (a requeued job waits about 2 minutes; "
    "`scontrol update JobId=ID StartTime=now` releases it)",
    "PartitionConfig": "the partition cannot run this request as configured: lower launch.cpu_tasks, "
    "launch.cpus_per_task, launch.gpus_per_node, launch.mem_gb or launch.nodes, or choose launch.partition",
    "PartitionNodeLimit": "more nodes than the partition allows per job: lower launch.nodes (or set launch.min_nodes)",
    "PartitionTimeLimit": "longer than the partition's time limit: lower launch.time_min",
    "ReqNodeNotAvail": "some nodes it needs are down, drained or reserved: wait, lower launch.nodes, "
    "or let it start on fewer with launch.min_nodes",
    "NodeDown": "a node it needs is down: wait for it, or lower launch.nodes / set launch.min_nodes",
    "Dependency": "waits for another job it depends on",
    "JobHeldUser": "held by its owner: `scontrol release ID`",
    "JobHeldAdmin": "held by an administrator",
    "QOSMaxCpuPerUserLimit": "your QOS caps the CPUs you may use at once: lower launch.cpu_tasks/cpus_per_task "
    "or choose launch.qos",
    "AssocGrpGRES": "your account's GPU quota is in use: lower launch.gpus_per_node/launch.nodes or wait",
    "InvalidAccount": "the account is not valid on this cluster: set launch.account",
    "InvalidQOS": "the QOS is not valid: set launch.qos",
}


def pending_reason(job_id: str) -> str | None:
    """Why a pending job waits, in words with the setting to change; None when it is not pending."""
    if shutil.which("squeue") is None:
        return None
    out = subprocess.run(["squeue", "-h", "-j", str(job_id), "-o", "%T|%r"], capture_output=True, text=True).stdout
    state, _, reason = out.strip().partition("|")
    return explain_pending(reason, job_id) if state == "PENDING" else None


def explain_pending(reason: str, job_id: str) -> str:
    """``squeue %r`` (e.g. ``PartitionConfig``, ``ReqNodeNotAvail, UnavailableNodes:n2``) in words."""
    key = reason.split(",")[0].strip("() ")
    words = PENDING_REASONS.get(key, f"see `scontrol show job {job_id}`").replace("JobId=ID", f"JobId={job_id}")
    return f"{reason}: {words}"
