"""Where a run is and what it has achieved, and its resumable state: written at step boundaries, read back.

The position is (epoch, step): ``step`` is the next global batch of ``epoch`` to train. The stream starts there
directly, and the trainer's random generators are seeded per step from (seed, epoch, step, rank), so a state
holds no generator states and a run may resume on another number of processes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from accelerate import Accelerator

from configs import ExperimentConfig, to_dict
from inference.serialization import require_private
from trainers import checkpoint as ckpt
from trainers.setup import Parts

log = logging.getLogger("trainers.retrieval")


@dataclass
class Progress:
    """The training position and the best evaluation so far."""

    epoch: int = 0
    step: int = 0
    """the next global batch of ``epoch`` to train"""
    global_step: int = 0
    """optimizer steps taken (or skipped) since the start of the run"""
    best_map: float = -1.0
    best_path: str = ""
    metrics: dict = field(default_factory=dict)


def collect_state(parts: Parts, prog: Progress, cfg: ExperimentConfig, accelerator: Accelerator, scaler) -> dict:
    return {
        "model": parts.raw_model.state_dict(),
        "optimizer": parts.optimizer.state_dict(),
        "criterion": parts.criterion.state_dict(),
        "aux_optimizer": parts.aux_optimizer.state_dict() if parts.aux_optimizer else {},
        "extra_optimizer": parts.extra_optimizer.state_dict() if parts.extra_optimizer else {},
        "scheduler": parts.scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else {},
        "epoch": prog.epoch,
        "step": prog.step,
        "global_step": prog.global_step,
        "best_map": prog.best_map,
        "best_path": prog.best_path,
        "world_size": accelerator.num_processes,
        "config": to_dict(cfg),
    }


def write_state(parts: Parts, prog: Progress, cfg: ExperimentConfig, accelerator: Accelerator, run_dir: Path,
                scaler=None) -> Path:  # fmt: skip
    """Write the state of this step boundary (a collective call: every rank calls it)."""
    state = collect_state(parts, prog, cfg, accelerator, scaler)
    path = ckpt.state_path(run_dir / "checkpoints", prog.global_step)
    if accelerator.state.deepspeed_plugin is not None:  # ZeRO shards the optimizer: every rank writes its part
        accelerator.save_state(str(path.with_suffix(".zero")))
        state["optimizer"] = {"zero": path.with_suffix(".zero").name}
    if accelerator.is_main_process:
        path = ckpt.save_state(state, run_dir / "checkpoints", prog.global_step, cfg.checkpoint.keep_last)
    accelerator.wait_for_everyone()
    return path


def restore_state(path: Path, parts: Parts, cfg: ExperimentConfig, accelerator: Accelerator, scaler=None) -> Progress:
    """Load a state written by ``write_state``; refuses a changed config or another model."""
    state = ckpt.load_state(path)
    changes = ckpt.config_changes(state["config"], to_dict(cfg))
    if changes:
        raise ValueError(f"--resume {path}: the config changed since that state was written: {'; '.join(changes)}")
    for key in ("step", "criterion"):
        if key not in state:
            raise ValueError(f"--resume {path}: a state of an older version of this trainer (no {key!r}); start anew")
    try:
        parts.raw_model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise ValueError(f"--resume {path}: the state holds another model than {cfg.model.backbone}: {exc}") from None
    accum = state["config"].get("optim", {}).get("grad_accum", cfg.optim.grad_accum)
    if "zero" in state["optimizer"]:
        if accum != cfg.optim.grad_accum:  # DeepSpeed keeps its own gradient_accumulation_steps with its shards
            raise ValueError(f"--resume {path}: optim.grad_accum changed ({accum} -> {cfg.optim.grad_accum}); a "
                             "DeepSpeed state resumes with the optim.grad_accum it was written with")  # fmt: skip
        zero = Path(path).with_name(state["optimizer"]["zero"])
        require_private(zero, "DeepSpeed state")  # DeepSpeed unpickles its shards fully: only our own files
        accelerator.load_state(str(zero))
    else:
        parts.optimizer.load_state_dict(state["optimizer"])
    parts.criterion.load_state_dict(state["criterion"])
    if parts.aux_optimizer is not None:
        parts.aux_optimizer.load_state_dict(state["aux_optimizer"])
    if parts.extra_optimizer is not None:
        parts.extra_optimizer.load_state_dict(state["extra_optimizer"])
    parts.scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state["scaler"]:
        scaler.load_state_dict(state["scaler"])
    prog = Progress(state["epoch"], state["step"], state["global_step"], state["best_map"], state["best_path"])
    log.info("resumed from %s: epoch %d, step %d (global step %d), written by %d process(es), now %d; "
             "optim.grad_accum %d, now %d", path, prog.epoch + 1, prog.step, prog.global_step, state["world_size"],
             accelerator.num_processes, accum, cfg.optim.grad_accum)  # fmt: skip
    before, now = state["world_size"] * accum, accelerator.num_processes * cfg.optim.grad_accum
    if before != now:  # the same global batches, cut into other micro-batches: not the uninterrupted run's result
        log.warning("the global batch is now cut into %d micro-batches, not %d (processes x optim.grad_accum): "
                    "BatchNorm statistics and per-process triplet mining see other samples together, so the run "
                    "continues on the same batches but not exactly as it would have; set optim.grad_accum=%s to keep "
                    "the cut", now, before, _keeping(before, accelerator.num_processes))  # fmt: skip
    return prog


def _keeping(cut: int, processes: int) -> str:
    """The optim.grad_accum that keeps ``cut`` micro-batches per global batch on ``processes``, in words."""
    return str(cut // processes) if cut % processes == 0 else f"(none: {cut} is not a multiple of {processes})"
