"""Requests checked against the partition before sbatch, and pending reasons in words."""

from __future__ import annotations

import re
import shlex
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from configs import LaunchConfig
from launch import jobs
from launch.cluster import Node, explain_pending, gpu_count, minutes, problems, request_of, what_fits
from launch.executor import sbatch_script, slurm_parameters, task_count, world_sizes
from launch.slurm import main

CPU_NODES = [Node(f"n{i}", "debug", 2, 24105, 0, "idle", 0) for i in (1, 2)]
GPU_NODES = [Node(f"g{i}", "gpu", 64, 512000, 8, "idle", 2880) for i in range(4)]


def test_sinfo_fields():
    assert [gpu_count(g) for g in ("(null)", "gpu:8", "gpu:a100:4(S:0-1)", "gpu:a100:4,gpu:v100:2", "mps:100")] == [
        0, 8, 4, 6, 0,
    ]  # fmt: skip
    assert [minutes(t) for t in ("infinite", "30", "2:00:00", "1-00:00:00", "45:00", "2-12")] == [
        0, 30, 120, 1440, 45, 3600,
    ]  # fmt: skip


def test_two_tasks_of_two_cpus_on_a_two_cpu_node_are_refused_saying_what_fits():
    req = request_of(LaunchConfig(cpu_tasks=2, cpus_per_task=2), tasks_per_node=2)
    (problem,) = problems(req, "debug", CPU_NODES)
    assert "4 CPUs per node" in problem and "no node has more than 2 CPUs" in problem
    assert "launch.cpu_tasks=1 launch.cpus_per_task=2" in what_fits(CPU_NODES, req, gpu=False)
    assert problems(request_of(LaunchConfig(cpu_tasks=2, cpus_per_task=1), 2), "debug", CPU_NODES) == []


def test_gpu_nodes_memory_and_time():
    ok = LaunchConfig(nodes=4, gpus_per_node=8, cpus_per_task=8, mem_gb=400, time_min=2880)
    assert problems(request_of(ok, 8), "gpu", GPU_NODES) == []
    too_many = request_of(LaunchConfig(nodes=5, gpus_per_node=8, cpus_per_task=8), 8)
    assert problems(too_many, "gpu", GPU_NODES) == ["launch.nodes=5 needs 5 node(s) like that; partition gpu has 4"]
    assert problems(too_many, "gpu", GPU_NODES, min_nodes=4) == []  # may start on fewer
    big = request_of(LaunchConfig(gpus_per_node=16, mem_gb=1000, time_min=3000, cpus_per_task=4), 16)
    found = " | ".join(problems(big, "gpu", GPU_NODES))
    assert "no node has more than 8 GPU(s)" in found and "500 GB" in found and "time limit of 2880 min" in found
    assert "launch.gpus_per_node<=8" in what_fits(GPU_NODES, big, gpu=True)
    assert "no GPUs in this partition" in what_fits(CPU_NODES, big, gpu=True)


def test_pending_reasons_name_the_setting():
    assert "launch.cpu_tasks" in explain_pending("PartitionConfig", "7")
    assert "launch.min_nodes" in explain_pending("ReqNodeNotAvail, UnavailableNodes:detretr-n2", "7")
    assert "JobId=7 StartTime=now" in explain_pending("BeginTime", "7")
    assert "scontrol show job 7" in explain_pending("SomethingNew", "7")


@pytest.mark.slurm
def test_unsatisfiable_request_is_refused_and_pending_reason_explained(tmp_path, capsys):
    if shutil.which("sbatch") is None:
        pytest.skip("no SLURM here (`sbatch` not on PATH); start one with tests/slurm/up.sh")
    runs = [f"output_dir={tmp_path}", f"data.root={tmp_path / 'sample'}", f"data.shards={tmp_path / 'shards'}"]
    too_many = ["launch.cpu_tasks=64", "data.batch_size=64"]  # a batch 64 processes divide: the CPUs are the fault
    assert main(["--config", "retr_demo", "--cluster", "slurm", *too_many, *runs]) == 2
    assert "cannot run this job" in capsys.readouterr().err
    # a job held until later: --status says why it waits and what releases it
    held = [*runs, "launch.extra_sbatch=--begin=now+3600", "launch.cpus_per_task=1"]
    assert main(["--config", "retr_demo", "--cluster", "slurm", "--wait", "0", *held]) == 0
    job_id = re.search(r"submitted job (\d+)", capsys.readouterr().out).group(1)
    try:
        assert main(["--status", job_id, "--runs", str(tmp_path)]) == 0
        out = capsys.readouterr().out
        assert "pending: BeginTime" in out and f"JobId={job_id} StartTime=now" in out, out
    finally:
        assert jobs.cancel(job_id, tmp_path) == 0
        queued = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True).stdout
        assert queued.strip() in ("", "CANCELLED"), f"job {job_id} is still {queued.strip()}"


def test_sbatch_carries_the_network_settings_and_checks_the_shared_filesystem(tmp_path):
    launch = LaunchConfig(nodes=4, gpus_per_node=8, network_interface="ib0", env=("NCCL_IB_HCA=mlx5",))
    params = slurm_parameters(launch, "job", {"data.shards": tmp_path, "output_dir": tmp_path / "absent dir"})
    assert params["ntasks_per_node"] == 8 and params["gpus_per_node"] == 8 and params["nodes"] == 4
    setup = params["setup"]
    assert setup[:3] == ["export NCCL_SOCKET_IFNAME=ib0", "export GLOO_SOCKET_IFNAME=ib0", "export NCCL_IB_HCA=mlx5"]
    srun = setup[-1]
    assert srun.startswith("srun --ntasks-per-node=1 --ntasks=$SLURM_JOB_NUM_NODES bash -c ")
    check = shlex.split(srun.removesuffix(" || exit 1"))[-1]  # what each node runs
    proc = subprocess.run(["bash", "-c", check], capture_output=True, text=True)
    assert proc.returncode == 1 and f"not visible on node {socket.gethostname()}" in proc.stderr, proc.stderr
    assert "output_dir=" in proc.stderr and "absent dir" in proc.stderr
    (tmp_path / "absent dir").mkdir()
    assert subprocess.run(["bash", "-c", check]).returncode == 0


def test_min_nodes_lets_the_job_start_on_fewer_nodes():
    params = slurm_parameters(LaunchConfig(nodes=4, min_nodes=2, gpus_per_node=8, cpus_per_task=6), "job")
    assert params["additional_parameters"]["nodes"] == "2-4" and params["nodes"] == 4
    # the tasks per node go to srun: in sbatch they would fix the job's task count, hence its size, at 2 nodes
    assert "ntasks_per_node" not in params and params["cpus_per_task"] == 48
    assert params["srun_args"] == ["--ntasks-per-node=8", "--cpus-per-task=6"] and params["gpus_per_node"] == 8
    script = sbatch_script(LaunchConfig(nodes=4, min_nodes=2, gpus_per_node=8, cpus_per_task=6), Path("f"), "j", "x")
    assert "#SBATCH --nodes=2-4" in script and "--ntasks-per-node" not in script.split("srun --unbuffered")[0]
    assert "--ntasks-per-node=8 --cpus-per-task=6 x" in script
    assert "nodes" not in slurm_parameters(LaunchConfig(nodes=4), "job")["additional_parameters"]
    with pytest.raises(ValueError, match="launch.min_nodes=3 must be <= launch.nodes=2"):
        LaunchConfig(nodes=2, min_nodes=3)


def test_a_batch_that_some_allowed_node_count_cannot_divide_is_refused_before_queueing(capsys):
    assert task_count(LaunchConfig(nodes=4, min_nodes=2, gpus_per_node=8)) == "16-32"
    assert task_count(LaunchConfig(nodes=2, cpu_tasks=2)) == "4"
    assert list(world_sizes(LaunchConfig(nodes=4, min_nodes=2, gpus_per_node=8))) == [16, 24, 32]
    # 3 nodes x 8 GPUs = 24 processes do not divide 256: a requeue onto 3 nodes would fail after waiting in the queue
    args = ["--config", "retr_demo", "--cluster", "slurm", "--dry-run", "launch.nodes=4", "launch.min_nodes=2",
            "launch.gpus_per_node=8", "data.batch_size=256"]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "data.batch_size=256 is not divisible by 24 process(es)" in err
    assert "on 3 node(s)" in err and "launch.min_nodes=2" in err
    assert main([*args[:-1], "data.batch_size=192"]) == 0  # 16, 24 and 32 all divide 192
