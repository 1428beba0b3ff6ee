"""Retrieval / ReID trainer on Accelerate: ``accelerate launch trainers/retrieval.py --config NAME [overrides]``.

One loop: stream P x K (or balanced) batches from the shards, CE/triplet/center losses, per-iteration lr,
evaluation through ``inference.evaluate``, best weights ``mAPxx.x.pth``, resumable state, TensorBoard.
"""

from __future__ import annotations

import argparse
import logging
import math
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object

from configs import ExperimentConfig, load_config, save_config, to_dict
from inference.serialization import require_private
from trainers import checkpoint as ckpt
from trainers.distillation import build_distill_parts
from trainers.monitor import log_line, manifest_table, setup_logging
from trainers.setup import (
    Parts,
    build_parts,
    check_data,
    hparams,
    make_accelerator,
    resolve_run_dir,
    resolved_optim,
)

log = logging.getLogger("trainers.retrieval")

STOP_SIGNALS = (signal.SIGUSR2, signal.SIGTERM)


# cfg.trainer -> the function that builds the parts of the one training loop below
TRAINERS = {"retrieval": build_parts, "distill": build_distill_parts}


def trainer_parts(name: str):
    if name not in TRAINERS:
        raise ValueError(f"trainer={name!r} has no parts builder; choose one of {sorted(TRAINERS)}")
    return TRAINERS[name]


class Stopped(SystemExit):
    """Raised after the resumable state was written because of a signal or ``max_steps``."""


@dataclass
class Progress:
    """Where training is: the data position (epoch, micro-batches consumed) and what was achieved."""

    epoch: int = 0
    batch_in_epoch: int = 0
    global_step: int = 0
    best_map: float = -1.0
    best_path: str = ""
    nan_run: int = 0
    metrics: dict = field(default_factory=dict)


class SignalFlag:
    """Remembers SIGUSR2/SIGTERM so the loop can write its state at the next step boundary."""

    def __init__(self) -> None:
        self.signum = 0
        self.previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self.previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def collect_state(parts: Parts, prog: Progress, cfg: ExperimentConfig, accelerator: Accelerator) -> dict:
    """Everything needed to continue exactly; RNG states of every rank (a collective call)."""
    rngs = gather_object([ckpt.rng_state()])
    state = {
        "model": parts.raw_model.state_dict(),
        "optimizer": parts.optimizer.state_dict(),
        "center": parts.criterion.state_dict(),
        "center_optimizer": parts.center_optimizer.state_dict() if parts.center_optimizer else {},
        "extra_optimizer": parts.extra_optimizer.state_dict() if parts.extra_optimizer else {},
        "scheduler": parts.scheduler.state_dict(),
        "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else {},
        "rng": rngs,
        "epoch": prog.epoch,
        "batch_in_epoch": prog.batch_in_epoch,
        "global_step": prog.global_step,
        "best_map": prog.best_map,
        "best_path": prog.best_path,
        "world_size": accelerator.num_processes,
        "config": to_dict(cfg),
    }
    return state


def write_state(parts: Parts, prog: Progress, cfg: ExperimentConfig, accelerator: Accelerator, run_dir: Path) -> Path:
    state = collect_state(parts, prog, cfg, accelerator)
    path = ckpt.state_path(run_dir / "checkpoints", prog.global_step)
    if accelerator.state.deepspeed_plugin is not None:  # ZeRO shards the optimizer: every rank writes its part
        accelerator.save_state(str(path.with_suffix(".zero")))
        state["optimizer"] = {"zero": path.with_suffix(".zero").name}
    if accelerator.is_main_process:
        path = ckpt.save_state(state, run_dir / "checkpoints", prog.global_step, cfg.checkpoint.keep_last)
    accelerator.wait_for_everyone()
    return path


def restore_state(path: Path, parts: Parts, cfg: ExperimentConfig, accelerator: Accelerator) -> tuple[Progress, dict]:
    """Load a state written by ``write_state``; refuses a changed config or another model."""
    state = ckpt.load_state(path)
    changes = ckpt.config_changes(state["config"], to_dict(cfg))
    if changes:
        raise ValueError(f"--resume {path}: the config changed since that state was written: {'; '.join(changes)}")
    if state["world_size"] != accelerator.num_processes:
        log.info("resuming with %d processes, the state was written with %d: the global batches stay the same",
                 accelerator.num_processes, state["world_size"])  # fmt: skip
    try:
        parts.raw_model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise ValueError(f"--resume {path}: the state holds another model than {cfg.model.backbone}: {exc}") from None
    if "zero" in state["optimizer"]:
        zero = Path(path).with_name(state["optimizer"]["zero"])
        require_private(zero, "DeepSpeed state")  # DeepSpeed unpickles its shards fully: only our own files
        accelerator.load_state(str(zero))
    else:
        parts.optimizer.load_state_dict(state["optimizer"])
    parts.criterion.load_state_dict(state["center"])
    if parts.center_optimizer is not None:
        parts.center_optimizer.load_state_dict(state["center_optimizer"])
    if parts.extra_optimizer is not None:
        parts.extra_optimizer.load_state_dict(state["extra_optimizer"])
    parts.scheduler.load_state_dict(state["scheduler"])
    if accelerator.scaler is not None and state["scaler"]:
        accelerator.scaler.load_state_dict(state["scaler"])
    prog = Progress(
        state["epoch"], state["batch_in_epoch"], state["global_step"], state["best_map"], state["best_path"]
    )
    rngs = state["rng"]
    rng = rngs[accelerator.process_index] if accelerator.process_index < len(rngs) else rngs[0]
    log.info(
        "resumed from %s: epoch %d, batch %d, step %d", path, prog.epoch + 1, prog.batch_in_epoch, prog.global_step
    )
    return prog, rng


def train_step(batch: dict, parts: Parts, cfg: ExperimentConfig, accelerator: Accelerator, prog: Progress):
    """One micro-batch: forward, losses, backward, (at accumulation boundaries) optimizer steps."""
    # DeepSpeed fp16/bf16 holds the weights themselves in half precision (no autocast): feed that dtype
    images = batch["image"].to(accelerator.device, dtype=parts.input_dtype, non_blocking=True)
    labels = batch["label"].to(accelerator.device, non_blocking=True)
    if cfg.train.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    batch = {**batch, "image": images, "label": labels}  # with its other keys (key, epoch, step, micro) for criteria
    buffers = [b.detach().clone() for b in parts.raw_model.buffers()]  # BN statistics, restored on a skip
    with accelerator.accumulate(parts.model):
        with accelerator.autocast():
            out = parts.model(images, labels)
            if parts.input_dtype != torch.float32:  # the losses (and center-loss parameters) stay in float32
                out = {k: v.float() if v.is_floating_point() else v for k, v in out.items()}
            terms = parts.criterion(out, batch)
        finite = torch.isfinite(terms["loss"].detach()).float()
        if accelerator.num_processes > 1:  # all ranks skip together or none does
            finite = accelerator.reduce(finite, "sum") / accelerator.num_processes
        if finite.item() < 1.0:
            with torch.no_grad():
                for buf, saved in zip(parts.raw_model.buffers(), buffers):
                    buf.copy_(saved)
            return skip_nan_step(parts, cfg, prog, terms)
        prog.nan_run = 0
        accelerator.backward(terms["loss"])
        if accelerator.sync_gradients:
            sync_criterion_grad(parts, accelerator)
            if cfg.optim.clip_grad > 0:
                accelerator.clip_grad_norm_(parts.model.parameters(), cfg.optim.clip_grad)
        parts.optimizer.step()  # Accelerate's wrapper (or DeepSpeed's engine) steps at accumulation boundaries
        parts.optimizer.zero_grad(set_to_none=True)
        # under DeepSpeed the center optimizer is a plain torch optimizer: step it at the boundaries only
        if parts.center_optimizer is not None and accelerator.sync_gradients:
            parts.center_optimizer.step()
            parts.center_optimizer.zero_grad(set_to_none=True)
        if parts.extra_optimizer is not None and accelerator.sync_gradients:
            parts.extra_optimizer.step()
            parts.extra_optimizer.zero_grad(set_to_none=True)
    stats = {k: v.detach().float() for k, v in terms.items()}
    stats["acc"] = (out["logits"].detach().argmax(1) == labels).float().mean()
    return stats


def sync_criterion_grad(parts: Parts, accelerator: Accelerator) -> None:
    """Criterion parameters (centers, a distillation projection) live outside DDP: average their gradients by
    hand, then undo the center loss weight."""
    if accelerator.num_processes > 1:
        for param in parts.criterion.parameters():
            if param.grad is not None:
                param.grad.copy_(accelerator.reduce(param.grad, "mean"))
    parts.criterion.unscale_center_grad()


def skip_nan_step(parts: Parts, cfg: ExperimentConfig, prog: Progress, terms: dict) -> None:
    prog.nan_run += 1
    values = {k: float(v.detach()) for k, v in terms.items()}
    log.warning("non-finite loss at step %d %s: step skipped (%d in a row)", prog.global_step, values, prog.nan_run)
    for opt in (parts.optimizer, parts.center_optimizer, parts.extra_optimizer):
        if opt is not None:
            opt.zero_grad(set_to_none=True)
    if prog.nan_run >= cfg.loss.max_nan_steps:
        raise FloatingPointError(
            f"the loss was non-finite {prog.nan_run} steps in a row (loss.max_nan_steps={cfg.loss.max_nan_steps}); "
            f"last terms {values}: lower optim.lr, enable optim.clip_grad or check the data"
        )
    return None


def epoch_batches(stream, cfg: ExperimentConfig, accelerator: Accelerator, prog: Progress, rng: dict | None):
    """This epoch's micro-batch iterator, starting after the ``prog.batch_in_epoch`` micro-batches already consumed
    (states are written at step boundaries), and the epoch's number of micro-batches.

    The stream starts at that step directly; its augmentation is seeded by (seed, epoch, step, position), so only
    the trainer's own RNG needs restoring: seeded here from (seed, epoch, rank), then the saved state mid-epoch.
    """
    accum = cfg.optim.grad_accum
    ckpt.seed_everything(cfg.train.seed * 1_000_003 + prog.epoch * 1009 + accelerator.process_index)
    batches = stream.epoch(prog.epoch, prog.batch_in_epoch // accum)
    if rng is not None and prog.batch_in_epoch > 0:
        # mid-epoch: continue from the saved RNG; a state from an epoch's end (batch 0 of the next) has none to
        # restore: the uninterrupted run reseeds here too
        ckpt.set_rng_state(rng)
    return batches, stream.num_steps(prog.epoch) * accum


def train_epoch(stream, parts, cfg, accelerator, prog, run_dir, flag, max_steps, rng=None) -> None:
    """Run the rest of ``prog.epoch``; raise ``Stopped`` after saving state on a signal or at ``max_steps``."""
    accum = cfg.optim.grad_accum
    batches, length = epoch_batches(stream, cfg, accelerator, prog, rng)
    # the P x K plan's length varies a little per epoch: a shorter epoch ends early
    total_batches = min(parts.steps_per_epoch, length // accum) * accum
    parts.model.train()
    try:
        _train_batches(batches, total_batches, parts, cfg, accelerator, prog, run_dir, flag, max_steps)
    finally:
        # a failing step leaves the stream suspended inside a traceback: close it so its DataLoader workers
        # (which ignore SIGTERM) stop now instead of blocking the interpreter's exit
        getattr(batches, "close", lambda: None)()


def _train_batches(batches, total_batches, parts, cfg, accelerator, prog, run_dir, flag, max_steps) -> None:
    accum = cfg.optim.grad_accum
    window: dict[str, float] = {}
    seen, tick = 0, time.perf_counter()
    while prog.batch_in_epoch < total_batches:
        batch = next(batches)
        stats = train_step(batch, parts, cfg, accelerator, prog)
        prog.batch_in_epoch += 1
        seen += len(batch["label"]) * accelerator.num_processes
        for key, value in (stats or {}).items():
            window[key] = window.get(key, 0.0) + float(value)
        window["n"] = window.get("n", 0.0) + (stats is not None)
        if prog.batch_in_epoch % accum:
            continue
        parts.scheduler.step()  # also after a skipped step: the lr stays a function of the step count
        prog.global_step += 1
        step_in_epoch = prog.batch_in_epoch // accum
        if step_in_epoch % cfg.train.log_every == 0 or prog.batch_in_epoch == total_batches:
            report(window, seen / (time.perf_counter() - tick), parts, accelerator, prog, total_batches // accum)
            window, seen, tick = {}, 0, time.perf_counter()
        stop_signal = stop_requested(flag, accelerator)
        if stop_signal or (max_steps and prog.global_step >= max_steps):
            stop(parts, prog, cfg, accelerator, run_dir, stop_signal)
        if prog.global_step % cfg.checkpoint.every_steps == 0:
            write_state(parts, prog, cfg, accelerator, run_dir)


def report(window: dict, images_per_s: float, parts: Parts, accelerator: Accelerator, prog: Progress, total: int):
    n = max(window.pop("n", 0.0), 1.0)
    means = {k: v / n for k, v in window.items()}
    lr = parts.optimizer.param_groups[0]["lr"]
    step = prog.batch_in_epoch // accelerator.gradient_accumulation_steps
    log.info(log_line(prog.epoch + 1, step, total, means.get("loss", math.nan),
                      means.get("acc", math.nan), lr, images_per_s))  # fmt: skip
    scalars = {f"train/{k}": v for k, v in means.items()}
    scalars.update({"train/lr": lr, "train/images_per_s": images_per_s})
    accelerator.log(scalars, step=prog.global_step)


def stop_requested(flag: SignalFlag, accelerator: Accelerator) -> int:
    """The signal number any rank received (0 = none); every rank agrees."""
    signum = torch.tensor(float(flag.signum), device=accelerator.device)
    if accelerator.num_processes > 1:
        signum = accelerator.reduce(signum, "sum")
    return int(signum.item() > 0) and (flag.signum or int(signal.SIGTERM))


def stop(parts, prog, cfg, accelerator, run_dir, signum: int) -> None:
    path = write_state(parts, prog, cfg, accelerator, run_dir)
    reason = signal.Signals(signum).name if signum else f"max_steps={prog.global_step}"
    code = 128 + signum if signum else 0
    log.info("stopped by %s at epoch %d step %d: resumable state in %s; continue with --resume auto "
             "(exit code %d)", reason, prog.epoch + 1, prog.global_step, path, code)  # fmt: skip
    accelerator.end_training()
    raise Stopped(code)


def evaluate(parts: Parts, cfg: ExperimentConfig, accelerator: Accelerator, prog: Progress, run_dir: Path) -> dict:
    """Metrics through inference.evaluate on every rank; rank 0 logs them and keeps the best weights."""
    from inference.evaluate import evaluate_model

    parts.raw_model.eval()
    with torch.no_grad():
        metrics = evaluate_model(
            parts.raw_model, cfg, accelerator.device, accelerator.process_index, accelerator.num_processes, accelerator
        )
    parts.raw_model.train()
    names = ("mAP", "rank1", "rank5", "rank10", "mINP")
    log.info("Validation Results - Epoch: %d  %s", prog.epoch + 1,
             "  ".join(f"{k}: {100 * metrics[k]:.1f}%" for k in names if k in metrics))  # fmt: skip
    accelerator.log({f"eval/{k}": float(metrics[k]) for k in names if k in metrics}, step=prog.global_step)
    if metrics["mAP"] > prog.best_map:
        prog.best_map = float(metrics["mAP"])
        path = run_dir / f"mAP{100 * prog.best_map:.1f}.pth"
        if accelerator.is_main_process:
            weights = {k: v.float() if v.is_floating_point() else v for k, v in parts.raw_model.state_dict().items()}
            path = ckpt.save_best(weights, run_dir, prog.best_map)  # float32 also after DeepSpeed fp16/bf16
            log.info("new best mAP %.1f%%: weights in %s", 100 * prog.best_map, path)
        prog.best_path = str(path)
    if accelerator.is_main_process:
        draw_rank_list(parts, cfg, accelerator, prog)
    accelerator.wait_for_everyone()
    return {k: v for k, v in metrics.items() if not isinstance(v, (list, dict))}


def draw_rank_list(parts: Parts, cfg: ExperimentConfig, accelerator: Accelerator, prog: Progress) -> None:
    """TensorBoard image: a few queries with their top-10 gallery matches (green = same identity)."""
    from trainers.ranklist import rank_list

    image = rank_list(parts.raw_model, cfg, accelerator.device)
    tracker = accelerator.get_tracker("tensorboard", unwrap=True)
    tracker.add_image("eval/rank_list", image, prog.global_step, dataformats="HWC")


def should_evaluate(cfg: ExperimentConfig, epoch: int) -> bool:
    last = epoch + 1 == cfg.schedule.epochs
    return cfg.eval.enabled and (last or (cfg.eval.every > 0 and (epoch + 1) % cfg.eval.every == 0))


def run(
    cfg: ExperimentConfig,
    run_dir: str | None = None,
    resume: str | None = None,
    max_steps: int = 0,
    stream_fn=None,
    num_classes: int = 0,
) -> dict:
    """Train (and evaluate) ``cfg``; return the final metrics.

    ``stream_fn(cfg, rank, world_size)`` defaults to ``datasets.stream.TrainStream`` (its workers persist across
    epochs); another one (tests), with the same ``num_steps`` / ``epoch`` / ``close``, comes with its
    ``num_classes``.
    """
    from datasets.prepare import ensure_shards
    from datasets.stream import TrainStream

    accelerator = make_accelerator(cfg, resolve_run_dir(cfg, run_dir))
    run_path = Path(broadcast_object_list([str(resolve_run_dir(cfg, run_dir))])[0])
    resolved = resolved_optim(cfg, accelerator.num_processes)
    if accelerator.is_main_process:
        run_path.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_path / "config.json", resolved=resolved)
    accelerator.wait_for_everyone()
    setup_logging(run_path, accelerator.is_main_process)
    log.info("run dir %s; %d process(es) on %s, precision %s", run_path, accelerator.num_processes,
             accelerator.device, cfg.train.precision)  # fmt: skip
    log.info("global batch %d, lr %.4g (optim.lr=%.4g, optim.lr_scaling=%s, optim.reference_batch=%d)",
             resolved["global_batch"], resolved["lr"], cfg.optim.lr, cfg.optim.lr_scaling,
             cfg.optim.reference_batch)  # fmt: skip
    if stream_fn is None:
        stream_fn = TrainStream
        with accelerator.main_process_first():  # the embedded sample is prepared once, by the main process
            manifest = ensure_shards(cfg)
        num_classes = check_data(cfg, manifest, accelerator.num_processes)
        splits = [cfg.data.train_split, cfg.data.query_split, cfg.data.gallery_split]
        log.info("\n%s", manifest_table(manifest, splits, title=cfg.data.shards))
    stream = stream_fn(cfg, accelerator.process_index, accelerator.num_processes)
    ckpt.seed_everything(cfg.train.seed)
    loader_len = stream.num_steps(0) * cfg.optim.grad_accum
    parts = trainer_parts(cfg.trainer)(cfg, accelerator, num_classes, loader_len)
    prog, rng = Progress(), None
    state_file = ckpt.resolve_resume(resume, run_path)
    if state_file is not None:
        prog, rng = restore_state(state_file, parts, cfg, accelerator)
    accelerator.init_trackers(cfg.name, config=hparams(cfg))
    flag = SignalFlag()
    try:
        while prog.epoch < cfg.schedule.epochs:
            train_epoch(stream, parts, cfg, accelerator, prog, run_path, flag, max_steps, rng)
            rng = None
            if should_evaluate(cfg, prog.epoch):
                prog.metrics = evaluate(parts, cfg, accelerator, prog, run_path)
            prog.epoch, prog.batch_in_epoch = prog.epoch + 1, 0
            write_state(parts, prog, cfg, accelerator, run_path)
    finally:
        flag.restore()
        stream.close()
    accelerator.end_training()
    log.info("done: %d steps, best mAP %.1f%% (%s)", prog.global_step, 100 * max(prog.best_map, 0), prog.best_path)
    return {**prog.metrics, "best_mAP": prog.best_map, "best_path": prog.best_path, "global_step": prog.global_step,
            "run_dir": str(run_path)}  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="config name in configs/ (e.g. retr_demo)")
    parser.add_argument("--resume", default=None, help="auto (newest state of --run-dir or newest run) or a file")
    parser.add_argument("--run-dir", default=None, help="run directory (default runs/NAME/<job id or time>)")
    parser.add_argument("--max-steps", type=int, default=0, help="stop after N optimizer steps, state saved")
    args, overrides = parser.parse_known_args(argv)
    cfg = load_config(args.config, overrides)
    run_dir = args.run_dir
    if args.resume == "auto" and not run_dir:  # the newest run of this experiment that has a state
        runs = [p for p in (Path(cfg.output_dir) / cfg.name).glob("*") if ckpt.list_states(p / "checkpoints")]
        run_dir = str(max(runs, key=lambda p: p.stat().st_mtime)) if runs else None
    return run(cfg, run_dir, args.resume, args.max_steps)


if __name__ == "__main__":
    from configs.cli import run_cli  # user errors as one line; --debug for the traceback

    sys.exit(run_cli(main))
