"""launch/slurm.py without running a job: dry run, resources -> sbatch, and the bad-input errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from configs import config_kind, list_configs, load_config
from launch.executor import extra_sbatch_parameters, local_parameters, resolve_cluster, slurm_parameters
from launch.slurm import job_spec, main

REPO = Path(__file__).resolve().parents[1]


def test_dry_run_prints_the_sbatch_script_and_submits_nothing(tmp_path, capsys):
    args = ["--config", "retr_demo", "--cluster", "local", "--dry-run", f"output_dir={tmp_path}",
            "launch.cpu_tasks=4", "launch.cpus_per_task=1", "launch.partition=gpu", "launch.time_min=30",
            "launch.signal_delay_s=45", "launch.mem_gb=8",
            "launch.extra_sbatch=--exclusive,--mail-type=END"]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    for line in ("#SBATCH --ntasks-per-node=4", "#SBATCH --cpus-per-task=1", "#SBATCH --partition=gpu",
                 "#SBATCH --time=30", "#SBATCH --signal=USR2@45", "#SBATCH --mem=8GB", "#SBATCH --exclusive",
                 "#SBATCH --mail-type=END", "#SBATCH --requeue", "srun ", "-m submitit.core._submit"):  # fmt: skip
        assert line in out, line
    assert "trainers.retrieval.run(" in out and "resume=None" in out
    assert not any(tmp_path.iterdir()), "a dry run must not create job folders"


def test_dry_run_as_a_script_from_another_directory(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "launch" / "slurm.py"), "--config", "retr_demo", "--dry-run"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "#SBATCH --job-name=retr_demo" in proc.stdout


def test_one_task_per_gpu_on_slurm():
    params = slurm_parameters(load_config("retr_demo", ["launch.gpus_per_node=4", "launch.nodes=2"]).launch, "x")
    assert params["ntasks_per_node"] == 4 and params["gpus_per_node"] == 4 and params["nodes"] == 2


def test_unknown_config_lists_the_available_ones(capsys):
    assert main(["--config", "no_such_config", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "unknown config 'no_such_config'" in err and "retr_demo" in err


@pytest.mark.parametrize(
    "override, message",
    [
        ("launch.nodes=0", "launch.nodes=0 must be >= 1"),
        ("launch.gpus_per_node=-1", "launch.gpus_per_node=-1 must be >= 0"),
        ("launch.cpu_tasks=0", "launch.cpu_tasks=0 must be >= 1"),
        ("launch.extra_sbatch=exclusive", "launch.extra_sbatch entry 'exclusive'"),
        ("launch.bogus=1", "unknown config key 'launch.bogus'"),
    ],
)
def test_impossible_resources_are_rejected(override, message, capsys):
    assert main(["--config", "retr_demo", "--dry-run", override]) == 2
    assert message in capsys.readouterr().err


def test_local_executor_refuses_what_it_cannot_run():
    with pytest.raises(ValueError, match="launch.nodes=2: the local executor runs one node"):
        local_parameters(load_config("retr_demo", ["launch.nodes=2"]).launch)
    import torch

    if torch.cuda.device_count() == 0:
        with pytest.raises(ValueError, match="launch.gpus_per_node=1 but this machine has 0 CUDA"):
            local_parameters(load_config("retr_demo", ["launch.gpus_per_node=1"]).launch)


def test_cluster_choice_follows_sbatch_on_path(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here
    assert resolve_cluster("auto") == "local"
    with pytest.raises(ValueError, match="needs SLURM, but `sbatch` is not on PATH"):
        resolve_cluster("slurm")
    # previewing the sbatch script is what a dry run is for: it works where SLURM is absent (a laptop)
    assert main(["--config", "retr_swinb", "--cluster", "slurm", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "cluster=slurm" in out and "#SBATCH --job-name=retr_swinb" in out and "srun " in out
    assert main(["--config", "retr_demo", "--cluster", "slurm", f"output_dir={tmp_path}"]) == 2  # a real submit
    assert "`sbatch` is not on PATH" in capsys.readouterr().err
    fake = tmp_path / "sbatch"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    assert resolve_cluster("auto") == "slurm"


def test_extra_sbatch_lines_parse():
    assert extra_sbatch_parameters(("--exclusive", "#SBATCH --mail-type=END")) == {
        "exclusive": True,
        "mail-type": "END",
    }


def test_status_of_an_unknown_job_is_an_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert main(["--status", "123456", "--runs", str(tmp_path)]) == 2
    assert "no job folder" in capsys.readouterr().err


def test_mmengine_configs_take_launch_overrides_and_pass_the_rest_as_cfg_options():
    names = [n for n in list_configs() if config_kind(n) == "mmengine"]
    if not names:
        pytest.skip("no mmengine (detection) config in configs/")
    cfg, launch, options = job_spec(names[0], ["launch.cpu_tasks=2", "train_cfg.max_epochs=1"])
    assert cfg is None and launch.cpu_tasks == 2 and options == ("train_cfg.max_epochs=1",)


@pytest.mark.parametrize(
    "use_gpu, visible, expected, deepspeed",
    [(False, "", None, False), (True, "4,6", "6", False), (True, "", "1", False), (False, "", None, True)],
)
def test_task_environment_comes_from_submitit(tmp_path, use_gpu, visible, expected, deepspeed):
    """TrainJob in a (simulated) local submitit task 1 of 2: rank env for Accelerate, one GPU per task; on CPU
    Accelerate is told so, except under DeepSpeed (told "CPU", Accelerate would drop DeepSpeed)."""
    overrides = ["train.deepspeed_config=configs/deepspeed/zero2.json"] if deepspeed else []
    code = (
        "import json; from configs import load_config; from launch.job import TrainJob; "
        f"job = TrainJob(load_config('retr_demo', {overrides!r}), 'retr_demo', 'tests.launch_helpers', {use_gpu}); "
        "print(json.dumps(job()))"
    )
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "SUBMITIT_EXECUTOR": "local",
           "SUBMITIT_FOLDER": str(tmp_path / "%j"), "SUBMITIT_LOCAL_JOB_ID": "77", "SUBMITIT_LOCAL_NTASKS": "2",
           "SUBMITIT_LOCAL_LOCALID": "1", "SUBMITIT_LOCAL_GLOBALID": "1", "CUDA_VISIBLE_DEVICES": visible}  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["run_dir"] == str(tmp_path / "77") and result["resume"] is None
    task_env = result["env"]
    assert (task_env["RANK"], task_env["WORLD_SIZE"], task_env["LOCAL_RANK"]) == ("1", "2", "1")
    assert task_env["MASTER_ADDR"] and task_env["MASTER_PORT"]
    assert task_env["ACCELERATE_USE_CPU"] == (None if use_gpu or deepspeed else "1")
    if use_gpu:
        assert task_env["CUDA_VISIBLE_DEVICES"] == expected


def test_job_folders_that_others_can_write_are_refused(tmp_path, capsys):
    """The job unpickles submitit's call from its folder: a folder others can write would let them run code."""
    shared = tmp_path / "runs" / "retr_demo"
    shared.mkdir(parents=True)
    shared.chmod(0o777)
    args = ["--config", "retr_demo", "--cluster", "local", f"output_dir={tmp_path / 'runs'}"]
    assert main(args) == 2
    assert f"job folder parent {shared} can be written by other users (mode 777" in capsys.readouterr().err
    assert list(shared.iterdir()) == []


def test_waiting_shows_the_jobs_progress_from_its_log(tmp_path):
    """The launcher polls a running job: epoch, step, loss and the last evaluation, from the job's log."""
    import io

    from launch import jobs
    from launch.progress import ProgressReporter, read_progress

    assert read_progress(tmp_path) is None
    log = tmp_path / "train.log"
    log.write_text(
        "INFO Epoch[1] Iteration[10/27] Loss: 3.101, Acc: 0.050, Base Lr: 3.50e-04, 40.1 images/s\n"
        "INFO Validation Results - Epoch: 2  mAP: 61.5%  rank1: 80.0%\n"
        "INFO Epoch[3] Iteration[20/27] Loss: 1.234, Acc: 0.600, Base Lr: 3.50e-04, 41.0 images/s\n"
    )
    progress = read_progress(tmp_path)
    assert (progress.epoch, progress.step, progress.steps, progress.loss) == (3, 20, 27, "1.234")
    assert progress.line() == "epoch 3, step 20/27, loss 1.234, last eval mAP 61.5%"
    det = tmp_path / "det"
    (det / "20261130_070707").mkdir(parents=True)
    (det / "20261130_070707" / "20261130_070707.log").write_text(
        "Epoch(train) [2][ 4/8]  lr: 1.0e-03  eta: 0:00:10  time: 0.5  loss: 2.5000  loss_rpn_cls: 0.6\n"
    )
    assert read_progress(det).line() == "epoch 2, step 4/8, loss 2.5000"

    class Running:  # a job that finishes on the third poll
        polls = 0

        def done(self, force_check=False):
            self.polls += 1
            return self.polls >= 3

    out = io.StringIO()
    reporter = ProgressReporter(tmp_path, "42", every_s=0.0, out=out)
    assert jobs.wait_done(Running(), 10, poll_s=0.01, report=reporter)
    lines = out.getvalue().splitlines()
    assert len(lines) == 1, "an unchanged state is shown once"
    assert lines[0].startswith("job 42 [0:00] epoch 3, step 20/27")


def test_a_stale_local_job_id_never_signals_an_unrelated_process(tmp_path, capsys):
    """A local job id is its controller's pid, and pids are reused: --cancel must not signal whoever has it now."""
    other = subprocess.Popen(["sleep", "60"])
    try:
        folder = tmp_path / "retr_demo" / str(other.pid)
        folder.mkdir(parents=True)
        record = {"job_id": str(other.pid), "cluster": "local", "config": "retr_demo", "num_tasks": 1, "time_min": 5}
        (folder / "launch.json").write_text(json.dumps(record))
        assert main(["--cancel", str(other.pid), "--runs", str(tmp_path)]) == 0
        assert "already DIED; nothing to cancel" in capsys.readouterr().out
        assert other.poll() is None, "an unrelated process was signalled"
    finally:
        other.kill()
        other.wait()


def test_a_batch_the_processes_cannot_divide_is_refused_even_in_a_dry_run(tmp_path, capsys):
    args = ["--config", "retr_demo", "--cluster", "local", "--dry-run", f"output_dir={tmp_path}", "launch.cpu_tasks=3"]
    assert main(args) == 2  # 32 samples a step over 3 processes: every task would fail at its start
    assert "data.batch_size=32 is not divisible by 3 process(es)" in capsys.readouterr().err
