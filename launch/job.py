"""The callable that submitit runs in every task: distributed env from submitit, then the trainer.

It is ``Checkpointable``: on preemption or at the time limit the trainer writes its resumable state
and exits, and the job is requeued with ``resume="auto"`` so it continues from that state.
"""

from __future__ import annotations

import importlib
import logging
import os
import signal
import subprocess
import traceback
from pathlib import Path
from typing import Any

import submitit

from configs import ExperimentConfig, save_config
from launch import ranks
from launch.result import clear_result, write_result

log = logging.getLogger(__name__)


def trainer_module(cfg: ExperimentConfig | None) -> str:
    """Module whose ``run`` trains the config: the one training loop for every registered trainer
    (``cfg.trainer`` picks what it trains); mmengine configs -> detection."""
    return "trainers.detection" if cfg is None else "trainers.retrieval"


class TrainJob(submitit.helpers.Checkpointable):
    """Run ``<trainer>.run(...)`` in a submitit task with the job folder as the run directory.

    ``cfg`` is the resolved dataclass config, or None for an mmengine (detection) config, which is then
    named by ``config_name`` and adjusted by ``options`` (``key=value`` strings, mmengine cfg-options).
    """

    def __init__(
        self,
        cfg: ExperimentConfig | None,
        config_name: str,
        trainer: str,
        use_gpu: bool,
        cpus_per_task: int = 1,
        options: tuple[str, ...] = (),
        resume: str | None = None,
        requeue_on_failure: int = 0,
    ) -> None:
        self.cfg = cfg
        self.config_name = config_name
        self.trainer = trainer
        self.use_gpu = use_gpu
        self.cpus_per_task = cpus_per_task
        self.options = tuple(options)
        self.resume = resume
        self.requeue_on_failure = requeue_on_failure
        self._requeued: list[int] = []  # signals on which this attempt requeued the job

    def __call__(self) -> Any:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        env = submitit.JobEnvironment()
        dist = submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        if self.use_gpu:
            # one GPU per task: the local_rank-th of the GPUs SLURM (or the local executor) gave this node
            visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d]
            os.environ["CUDA_VISIBLE_DEVICES"] = visible[dist.local_rank] if visible else str(dist.local_rank)
        elif not getattr(getattr(self.cfg, "train", None), "deepspeed_config", ""):
            # Accelerate only builds a multi-process CPU (gloo) state when told it is on CPU; DeepSpeed is the
            # exception: told "CPU", Accelerate drops it (the trainer starts DeepSpeed's gloo group instead)
            os.environ["ACCELERATE_USE_CPU"] = "1"
        os.environ.setdefault("OMP_NUM_THREADS", str(self.cpus_per_task))
        run_dir = Path(env.paths.folder).resolve()
        log.info(
            "task rank %d/%d (local %d) on %s, master %s:%d, run dir %s, resume=%s",
            dist.rank, dist.world_size, dist.local_rank, env.hostname, dist.master_addr, dist.master_port,
            run_dir, self.resume,
        )  # fmt: skip
        if dist.rank == 0:
            _remove_literal_folder()
            clear_result(run_dir)
            if self.cfg is not None:
                save_config(self.cfg, run_dir / "config.json")
        restart = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
        if self.resume is None and restart > 0:
            # SLURM requeued this job (preemption with PreemptMode=REQUEUE, a node failure, or a failure requeue
            # below): continue from its state
            self.resume = "auto"
        beat = ranks.Heartbeat(run_dir, dist.rank, env.hostname, restart)
        try:
            if dist.rank != 0:
                return self._run_requeueing(run_dir, dist.rank, env.cluster)
            return self._run_recording(run_dir, env.cluster)
        except Exception as exc:
            if dist.world_size > 1 and lost_peer(exc):
                self._on_lost_rank(run_dir, str(env.job_id), beat.info, exc, env.cluster)
            raise
        finally:
            beat.stop()

    def _on_lost_rank(self, run_dir: Path, job_id: str, me: ranks.RankInfo, exc: Exception, cluster: str) -> None:
        """A collective failed because a rank is gone: say which, then requeue or end (``requeue_on_failure``)."""
        record, first = ranks.record_failure(run_dir, job_id, me.restart, me, f"{type(exc).__name__}: {exc}")
        log.error("%s", ranks.failure_line(record))
        if not first or cluster != "slurm":
            return  # another survivor decides; the local executor cannot requeue
        used = len(ranks.read_failures(run_dir))
        if used <= self.requeue_on_failure:
            log.error("requeueing job %s to resume from its last state (failure %d of launch.requeue_on_failure=%d)",
                      job_id, used, self.requeue_on_failure)  # fmt: skip
            subprocess.run(["scontrol", "requeue", job_id], check=False)
        else:
            # SLURM itself requeues a requeueable job whose node failed: that would exceed the budget
            log.error("not requeued: launch.requeue_on_failure=%d requeue(s) used; the job ends",
                      self.requeue_on_failure)  # fmt: skip
            subprocess.run(["scontrol", "update", f"JobId={job_id}", "Requeue=0"], check=False)

    def _run_recording(self, run_dir: Path, cluster: str) -> Any:
        """Rank 0: run, and record the outcome as ``result.json`` (what --status and the waiting launcher read)."""
        try:
            result = self._run_requeueing(run_dir, 0, cluster)
        except SystemExit as exc:
            if not self._requeued:  # a stop that requeues is no outcome: the job goes on
                write_result(run_dir, "error", error=f"SystemExit: exit code {exc.code}", exit_code=exc.code)
            raise
        except BaseException as exc:
            write_result(run_dir, "error", error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
            raise
        write_result(run_dir, "success", result=result)
        return result

    def _run_requeueing(self, run_dir: Path, rank: int, cluster: str) -> Any:
        """Run the trainer; when it stops on the preemption signal, let submitit checkpoint and requeue."""
        sig = submitit.JobEnvironment._usr_sig()
        submitit_handler = signal.getsignal(sig)  # checkpoint() + requeue + exit on rank 0
        requeued = []

        def requeue(signum: int, frame: Any) -> None:
            requeued.append(signum)
            submitit_handler(signum, frame)

        self._requeued = requeued
        signal.signal(sig, requeue)  # still submitit's behaviour when the trainer does not catch the signal
        # SLURM signals every process of the step; forked helpers (DataLoader workers) must not die of it.
        os.register_at_fork(after_in_child=lambda: signal.signal(sig, signal.SIG_IGN))
        try:
            result, code = self._run_trainer(run_dir)
            if not code:
                return result
        except SystemExit as exc:  # the detection trainer stops by raising SystemExit(128 + signal)
            code = exc.code
        # After SIGUSR2/SIGTERM the trainers save their state at the next step boundary and stop with the exit
        # code 128 + signal. On SLURM only the time-limit signal requeues: SIGTERM is also what `scancel` sends,
        # and a cancelled job must stay cancelled (a SLURM preemption requeues the job itself; it then resumes
        # through SLURM_RESTART_COUNT above). The local executor cancels with SIGINT, so there a SIGTERM to the
        # tasks is a preemption.
        log.info("rank %d: the trainer stopped with exit code %s", rank, code)
        codes = {128 + sig} if cluster == "slurm" else {128 + sig, 128 + signal.SIGTERM}
        if code in codes and rank == 0 and not requeued:
            log.info("trainer stopped on a signal with its state saved; requeueing with resume=auto")
            requeue(sig, None)
        raise SystemExit(code)

    def _run_trainer(self, run_dir: Path) -> tuple[Any, int]:
        """The trainer's result and the exit code its module maps it to (``exit_code``; 0 when it has none)."""
        module = importlib.import_module(self.trainer)
        if self.cfg is None:  # mmengine config: trainers.detection.run(name, run_dir, resume, cfg_options)
            options = list(self.options) or None
            resume = self.resume or False
            result = module.run(self.config_name, run_dir=str(run_dir), resume=resume, cfg_options=options)
        else:
            result = module.run(self.cfg, run_dir=str(run_dir), resume=self.resume)
        return result, module.exit_code(result) if hasattr(module, "exit_code") else 0

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        """Called by submitit on preemption / time limit: requeue the same job resuming from its state."""
        resumed = TrainJob(
            self.cfg, self.config_name, self.trainer, self.use_gpu, self.cpus_per_task, self.options, resume="auto",
            requeue_on_failure=self.requeue_on_failure,
        )  # fmt: skip
        return submitit.helpers.DelayedSubmission(resumed)

    def describe(self) -> str:
        """The call each task makes, for ``--dry-run``."""
        if self.cfg is None:
            cfg = f"{self.config_name!r}, cfg_options={list(self.options) or None}"
        else:
            cfg = f"load_config({self.config_name!r}, <overrides>)"
        return f"{self.trainer}.run({cfg}, run_dir='<job folder>', resume={self.resume!r})"


# What a collective raises when a peer process is gone (gloo, NCCL, the TCP store) or stopped answering.
LOST_PEER = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Timed out", "timed out",
             "DistNetworkError", "NCCL communicator was aborted", "Connection refused")  # fmt: skip


def lost_peer(exc: BaseException) -> bool:
    """Whether ``exc`` (or an exception it chains) is a collective that lost its peer."""
    for _ in range(10):  # the chain is short; the bound guards against a cycle
        if exc is None:
            return False
        if type(exc).__name__ in ("DistNetworkError", "DistBackendError") or any(m in str(exc) for m in LOST_PEER):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _remove_literal_folder() -> None:
    """submitit's local controller also creates the folder pattern itself (``.../%j``): drop it if empty."""
    pattern = Path(os.environ.get("SUBMITIT_FOLDER", ""))
    if "%j" in pattern.name and pattern.is_dir() and not any(pattern.iterdir()):
        pattern.rmdir()
