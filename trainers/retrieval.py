"""The training loop of every registered trainer (``trainers.registry.TRAINERS``; ``retrieval`` by default):
``accelerate launch -q trainers/retrieval.py --config NAME [overrides]``.

One ``fit`` loop: micro-batches from the stream, forward, the criterion's terms, backward, an optimizer step per
global batch (skipped on the device when the loss is not finite), per-step lr, log lines and TensorBoard scalars
at ``train.log_every``, resumable state at ``checkpoint.every_steps``, a signal or ``--max-steps``, and at each
epoch's end; evaluation through ``inference.evaluate`` with the best weights kept as ``mAPxx.x.pth``. Nothing in
a step waits for the device: values are read at log intervals, and the stop signal is agreed on a CPU group.
``run()`` returns how the run ended; ``main()`` turns that into the exit code the launcher expects.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import math
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from configs import ExperimentConfig, load_config, save_config, to_dict
from datasets.transforms import model_images
from trainers import checkpoint as ckpt
from trainers.batch_record import BatchRecord
from trainers.monitor import log_line, manifest_table, setup_logging
from trainers.registry import trainer_builder
from trainers.setup import Parts, check_data, make_accelerator, resolve_run_dir, resolved_optim, set_threads
from trainers.state import Progress, restore_state, write_state
from trainers.stepping import StepGuard, StopSignal

log = logging.getLogger("trainers.retrieval")

FINISHED, SIGNAL, MAX_STEPS = "finished", "signal", "max_steps"
IMAGE_KEYS = ("image", "pixels", "erase")  # what model_images turns into the device batch's "image"


def fit(parts, stream, guard, cfg, accelerator, prog, run_dir, signals, max_steps=0) -> tuple[str, int]:
    """Train from ``prog``'s position to the end; return how it stopped (FINISHED, SIGNAL, MAX_STEPS) and the
    signal. Every process runs the same steps and stops at the same one."""
    accum, meter = cfg.optim.grad_accum, Meter(accelerator)
    while prog.epoch < cfg.schedule.epochs:
        steps = cfg.schedule.iters_per_epoch or stream.num_steps(prog.epoch)
        steps = min(steps, stream.num_steps(prog.epoch))  # a P x K epoch may come out a few batches short
        parts.model.train()
        with progress_bar(prog, steps, accelerator) as bar:
            for i, batch in enumerate(stream.epoch(prog.epoch, prog.step)):
                if prog.step >= steps:
                    break
                if i % accum == 0:
                    seed_step(cfg.train.seed, prog.epoch, prog.step, accelerator.process_index)
                    guard.begin()
                meter.add(micro_step(batch, parts, guard, cfg, accelerator), batch)
                if i % accum < accum - 1:
                    continue
                guard.step()
                parts.scheduler.step()  # also after a skipped step: the lr stays a function of the step count
                prog.step, prog.global_step = prog.step + 1, prog.global_step + 1
                bar.update()
                if prog.global_step % cfg.train.log_every == 0 or prog.step == steps:
                    report(meter, guard, parts, cfg, accelerator, prog, steps, bar)
                signum = signals.poll()
                if signum or prog.global_step == max_steps:
                    return stop(parts, guard, cfg, accelerator, prog, run_dir, signum)
                if prog.global_step % cfg.checkpoint.every_steps == 0:
                    write_state(parts, prog, cfg, accelerator, run_dir, guard.scaler)
        if should_evaluate(cfg, prog.epoch):
            prog.metrics = evaluate(parts, cfg, accelerator, prog, run_dir)
        prog.epoch, prog.step = prog.epoch + 1, 0
        write_state(parts, prog, cfg, accelerator, run_dir, guard.scaler)
    return FINISHED, 0


def micro_step(batch: dict, parts: Parts, guard: StepGuard, cfg: ExperimentConfig, accelerator: Accelerator) -> dict:
    """Forward, the criterion's terms and backward of one micro-batch (moved to the device); returns the terms
    and the accuracy, as device tensors."""
    # uint8 pixels normalised on the device; DeepSpeed fp16/bf16 holds the weights themselves in half precision
    # (no autocast): feed that dtype
    images = model_images(batch, cfg.data.augment, accelerator.device).to(parts.input_dtype)
    if cfg.train.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    batch = {
        k: v.to(accelerator.device, non_blocking=True) if torch.is_tensor(v) else v
        for k, v in batch.items()
        if k not in IMAGE_KEYS
    }
    batch["image"] = images
    with accelerator.accumulate(parts.model):
        with accelerator.autocast():
            out = parts.model(images, batch["label"])
            if parts.input_dtype != torch.float32:  # the losses (and the criterion's parameters) stay in float32
                out = {k: v.float() if v.is_floating_point() else v for k, v in out.items()}
            terms = parts.criterion(out, batch)
        guard.backward(terms["loss"])
    stats = {k: v.detach().float() for k, v in terms.items()}
    if "logits" in out:
        stats["acc"] = (out["logits"].detach().argmax(1) == batch["label"]).float().mean()
    return stats


class Meter:
    """Sums of the logged terms on the device; averaged over micro-batches and processes when read."""

    def __init__(self, accelerator: Accelerator) -> None:
        self.accelerator, self.sums, self.count, self.images, self.tick = accelerator, {}, 0, 0, time.perf_counter()

    def add(self, stats: dict, batch: dict) -> None:
        for key, value in stats.items():
            self.sums[key] = self.sums[key] + value if key in self.sums else value
        self.count += 1
        self.images += len(batch["label"]) * self.accelerator.num_processes

    def read(self) -> tuple[dict[str, float], float]:
        """Means since the last read (a host sync) and images per second."""
        names = sorted(self.sums)
        values = torch.stack([self.sums[k] for k in names]) / max(self.count, 1) if names else torch.zeros(0)
        if self.accelerator.num_processes > 1 and names:
            values = self.accelerator.reduce(values, "mean")
        means = dict(zip(names, values.tolist()))
        speed = self.images / max(time.perf_counter() - self.tick, 1e-9)
        self.sums, self.count, self.images, self.tick = {}, 0, 0, time.perf_counter()
        return means, speed


def report(meter, guard, parts, cfg, accelerator, prog, steps, bar) -> None:
    """The log line and TensorBoard scalars; skipped steps are counted, and too many in a row stop the run."""
    means, speed = meter.read()
    skipped, worst = guard.read_skips()
    lr = parts.optimizer.param_groups[0]["lr"]
    loss, acc = means.get("loss", math.nan), means.get("acc", math.nan)
    line = log_line(prog.epoch + 1, prog.step, steps, loss, acc, lr, speed)
    if bar.disable:
        log.info(line)
    else:
        bar.set_postfix_str(line.split("] ", 2)[-1])
    scalars = {f"train/{k}": v for k, v in means.items()}
    scalars.update({"train/lr": lr, "train/images_per_s": speed, "train/skipped_steps": skipped})
    accelerator.log(scalars, step=prog.global_step)
    if skipped:
        log.warning("non-finite loss: %d step(s) skipped before global step %d (at most %d in a row)",
                    skipped, prog.global_step, worst)  # fmt: skip
    if worst >= cfg.loss.max_nan_steps:
        raise FloatingPointError(
            f"the loss was non-finite {worst} steps in a row (loss.max_nan_steps={cfg.loss.max_nan_steps}) before "
            f"global step {prog.global_step}: lower optim.lr, enable optim.clip_grad or check the data"
        )


def progress_bar(prog: Progress, steps: int, accelerator: Accelerator):
    """A bar per epoch on the main process in an interactive terminal; otherwise the log lines stand alone."""
    show = accelerator.is_main_process and sys.stderr.isatty()
    bar = tqdm(total=steps, initial=prog.step, desc=f"epoch {prog.epoch + 1}", disable=not show, leave=False)
    return _Bar(bar) if show else nullcontext(bar)


class _Bar:
    """The bar, with log records printed above it while it is shown."""

    def __init__(self, bar: tqdm) -> None:
        self.bar, self.redirect = bar, logging_redirect_tqdm()

    def __enter__(self) -> tqdm:
        self.redirect.__enter__()
        return self.bar

    def __exit__(self, *exc) -> None:
        self.bar.close()
        self.redirect.__exit__(*exc)


def seed_step(seed: int, epoch: int, step: int, rank: int) -> None:
    """The trainer's generators (dropout, drop path) seeded from the position: resuming needs no saved state."""
    digest = hashlib.blake2b(f"{seed}/{epoch}/{step}/{rank}".encode(), digest_size=8).digest()
    ckpt.seed_everything(int.from_bytes(digest, "little") >> 1)


def stop(parts, guard, cfg, accelerator, prog, run_dir, signum: int) -> tuple[str, int]:
    path = write_state(parts, prog, cfg, accelerator, run_dir, guard.scaler)
    reason = signal.Signals(signum).name if signum else f"max_steps={prog.global_step}"
    log.info("stopped by %s at epoch %d step %d (global step %d): resumable state in %s; continue with --resume "
             "auto", reason, prog.epoch + 1, prog.step, prog.global_step, path)  # fmt: skip
    return (SIGNAL, signum) if signum else (MAX_STEPS, 0)


def evaluate(parts: Parts, cfg: ExperimentConfig, accelerator: Accelerator, prog: Progress, run_dir: Path) -> dict:
    """Metrics through inference.evaluate on every rank; rank 0 logs them and keeps the best weights."""
    from inference.evaluate import evaluate_model

    sync_buffers(parts.raw_model, accelerator)
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


def sync_buffers(model: torch.nn.Module, accelerator: Accelerator) -> None:
    """Every rank takes rank 0's buffers (BatchNorm's running statistics) before it embeds its share of the
    evaluation: each rank updates them from its own micro-batches, DDP copies rank 0's only at the start of each
    forward and DeepSpeed never does, and rank 0's are the ones saved (state files, mAPxx.pth). Without this the
    reported mAP would mix models of their own on the ranks, and change with a resume (which loads rank 0's)."""
    if accelerator.num_processes == 1:
        return
    with torch.no_grad():
        for buf in model.buffers():
            wire = buf.float() if buf.dtype in (torch.float16, torch.bfloat16) else buf.clone()  # (gloo and half)
            torch.distributed.broadcast(wire, src=0)
            buf.copy_(wire)


def draw_rank_list(parts: Parts, cfg: ExperimentConfig, accelerator: Accelerator, prog: Progress) -> None:
    """TensorBoard image: a few queries with their top-10 gallery matches (green = same identity)."""
    from trainers.ranklist import rank_list

    image = rank_list(parts.raw_model, cfg, accelerator.device)
    tracker = accelerator.get_tracker("tensorboard", unwrap=True)
    tracker.add_image("eval/rank_list", image, prog.global_step, dataformats="HWC")


def should_evaluate(cfg: ExperimentConfig, epoch: int) -> bool:
    last = epoch + 1 == cfg.schedule.epochs
    return cfg.eval.enabled and (last or (cfg.eval.every > 0 and (epoch + 1) % cfg.eval.every == 0))


def hparams(cfg: ExperimentConfig) -> dict:
    """Flat scalar config for TensorBoard's hparams view."""
    flat = ckpt.flatten(to_dict(cfg))
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flat.items()}


def run(cfg, run_dir=None, resume=None, max_steps=0, stream_fn=None, num_classes=0) -> dict:
    """Train (and evaluate) ``cfg``; return the final metrics and how the run ended (``ended``: finished,
    signal or max_steps; ``signal``: its number).

    ``stream_fn(cfg, rank, world_size)`` defaults to ``datasets.stream.TrainStream``; another one (tests), with
    the same ``num_steps`` / ``epoch`` / ``close``, comes with its ``num_classes``.
    """
    from datasets.prepare import ensure_shards
    from datasets.shardguard import await_writer
    from datasets.stream import TrainStream

    accelerator = make_accelerator(cfg)
    run_path = resolve_run_dir(cfg, run_dir, accelerator)
    resolved = resolved_optim(cfg, accelerator.num_processes)
    if accelerator.is_main_process:
        save_config(cfg, run_path / "config.json", resolved=resolved)
    setup_logging(run_path, accelerator.is_main_process)
    log.info("run dir %s; %d process(es) on %s, precision %s, %s intra-op threads", run_path,
             accelerator.num_processes, accelerator.device, cfg.train.precision, set_threads(cfg))  # fmt: skip
    log.info("global batch %d, lr %.4g (optim.lr=%.4g, optim.lr_scaling=%s, optim.reference_batch=%d)",
             resolved["global_batch"], resolved["lr"], cfg.optim.lr, cfg.optim.lr_scaling,
             cfg.optim.reference_batch)  # fmt: skip
    if stream_fn is None:
        stream_fn = TrainStream
        await_writer(cfg.data.shards, cfg.data.shards_wait_s)  # every rank, outside the barrier below
        with accelerator.main_process_first():  # the embedded sample is prepared once, by the main process
            manifest = ensure_shards(cfg)
        num_classes = check_data(cfg, manifest, accelerator.num_processes)
        log.info("\n%s", manifest_table(manifest, [cfg.data.train_split, cfg.data.query_split,
                                                    cfg.data.gallery_split], title=cfg.data.shards))  # fmt: skip
    stream, signals = stream_fn(cfg, accelerator.process_index, accelerator.num_processes), None
    if cfg.train.record_batches:
        stream = BatchRecord(stream, run_path / "batches", accelerator.process_index, accelerator.num_processes,
                             cfg.optim.grad_accum, cfg.schedule.iters_per_epoch)  # fmt: skip
    try:
        ckpt.seed_everything(cfg.train.seed)
        steps = cfg.schedule.iters_per_epoch or stream.num_steps(0)
        parts = trainer_builder(cfg.trainer)(cfg, accelerator, num_classes, steps)
        guard = StepGuard(parts, accelerator, cfg.optim.clip_grad)
        state_file = ckpt.resolve_resume(resume, run_path)
        prog = restore_state(state_file, parts, cfg, accelerator, guard.scaler) if state_file else Progress()
        accelerator.init_trackers(cfg.name, config=hparams(cfg))
        signals = StopSignal(accelerator.num_processes)
        ended, signum = fit(parts, stream, guard, cfg, accelerator, prog, run_path, signals, max_steps)
    finally:
        if signals is not None:
            signals.close()
        stream.close()
    accelerator.end_training()
    if ended == FINISHED:
        log.info("done: %d steps, best mAP %.1f%% (%s)", prog.global_step, 100 * max(prog.best_map, 0),
                 prog.best_path or "no evaluation")  # fmt: skip
    return {**prog.metrics, "best_mAP": prog.best_map, "best_path": prog.best_path, "global_step": prog.global_step,
            "run_dir": str(run_path), "world_size": accelerator.num_processes, "ended": ended,
            "signal": signum}  # fmt: skip


def exit_code(result: dict) -> int:
    """What the launcher expects: 128 + the signal after a stop on SIGUSR2/SIGTERM (state saved), else 0."""
    return 128 + result["signal"] if result["ended"] == SIGNAL else 0


def main(argv: list[str] | None = None) -> int:
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
    return exit_code(run(cfg, run_dir, args.resume, args.max_steps))


if __name__ == "__main__":
    from configs.cli import run_cli  # user errors as one line; --debug for the traceback

    sys.exit(run_cli(main))
