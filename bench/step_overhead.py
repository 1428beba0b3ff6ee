"""What the trainer's step pays beyond a bare step, on one in-memory batch, in one process, alternating.

Both use the parts the trainer builds (``trainers.registry``: model, criterion, fused optimizer, center-loss
optimizer) and the same uint8 micro-batch (normalised by ``datasets.transforms.model_images`` in both, as the loop
does). trainer: what ``trainers.retrieval.fit`` runs per step without the data (seeding from the position, the
StepGuard's BatchNorm snapshot, ``micro_step``, the meter, the guarded optimizer step, the scheduler). bare:
forward, loss, backward, optimizer steps, zero_grad. Then the parts of the guarded step on their own: the
optimizer step alone, through the GradScaler (its inf/nan check over the gradients: what lets a step be skipped on
the device), and the StepGuard's whole step (plus the BatchNorm restore and the skip counters).

    python bench/step_overhead.py [--rounds 8] [--precision no|bf16] [--height 128] [--width 64] [--batch 32]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from configs import load_config  # noqa: E402
from datasets.transforms import model_images  # noqa: E402
from trainers import retrieval  # noqa: E402
from trainers.registry import trainer_builder  # noqa: E402
from trainers.setup import make_accelerator, set_threads  # noqa: E402
from trainers.stepping import StepGuard, inner  # noqa: E402


def per_call_ms(fn, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8, help="alternating rounds of 3 steps each")
    parser.add_argument("--precision", default="no", choices=["no", "bf16"])
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--height", type=int, default=128)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    cfg = load_config("retr_demo", [
        f"model.backbone={args.backbone}", f"data.height={args.height}", f"data.width={args.width}",
        f"data.batch_size={args.batch}", "optim.name=adamw", f"train.precision={args.precision}",
    ])  # fmt: skip
    threads = set_threads(cfg)
    accelerator = make_accelerator(cfg)
    parts = trainer_builder(cfg.trainer)(cfg, accelerator, 24, 1000)
    guard, meter = StepGuard(parts, accelerator, cfg.optim.clip_grad), retrieval.Meter(accelerator)
    g = torch.Generator().manual_seed(0)
    n, shape = args.batch, (args.batch, 3, args.height, args.width)
    batch = {
        "pixels": torch.randint(0, 256, shape, dtype=torch.uint8, generator=g),
        "erase": torch.full((n, 4), -1, dtype=torch.int16),
        "label": torch.arange(n // 4).repeat_interleave(4) % 24,
        "identity": torch.zeros(n, dtype=torch.long), "camera": torch.zeros(n, dtype=torch.long),
        "key": [f"k{i}" for i in range(n)], "epoch": 0, "step": 0, "micro": 0,
    }  # fmt: skip
    optimizers = [inner(parts.optimizer), inner(parts.aux_optimizer)]

    def backward() -> None:
        images = model_images(batch, cfg.data.augment, accelerator.device)
        with accelerator.autocast():
            loss = parts.criterion(parts.model(images, batch["label"]), {**batch, "image": images})["loss"]
        loss.backward()

    def bare() -> None:
        backward()
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)

    def trainer() -> None:
        retrieval.seed_step(cfg.train.seed, 0, 0, 0)
        guard.begin()
        meter.add(retrieval.micro_step(batch, parts, guard, cfg, accelerator), batch)
        guard.step()
        parts.scheduler.step()

    times: dict[str, list[float]] = {"bare": [], "trainer": []}
    for _ in range(args.rounds):
        for name, fn in (("bare", bare), ("trainer", trainer)):
            times[name].append(per_call_ms(fn, 3))
    meter.read()
    b, t = statistics.median(times["bare"]), statistics.median(times["trainer"])
    print(
        f"torch {torch.__version__}; {args.backbone} {args.height}x{args.width}, batch {n}, precision "
        f"{args.precision}, {threads} intra-op threads; medians of {args.rounds} alternating rounds of 3 steps"
    )
    print("| what | ms per step |")
    print("| --- | ---: |")
    print(f"| bare step | {b:.1f} |")
    print(f"| trainer step (no data) | {t:.1f} |")
    print(f"| bare / trainer | {b / t:.3f} |")

    backward()  # gradients to step on, kept and put back before each timed step
    params = [p for p in parts.model.parameters() if p.grad is not None]
    grads = [p.grad.clone() for p in params]

    def restore() -> None:
        for p, grad in zip(params, grads):
            p.grad = grad.clone()

    def plain() -> None:
        restore()
        optimizers[0].step()

    def scaled() -> None:
        restore()
        guard.scaler.step(optimizers[0])
        guard.scaler.update(1.0)

    def guarded() -> None:
        restore()
        guard.step()

    restore_ms = per_call_ms(restore, 10)
    parts_ms = {
        "seed the step's generators (seed_step)": per_call_ms(lambda: retrieval.seed_step(0, 0, 0, 0), 50),
        "BatchNorm snapshot (StepGuard.begin)": per_call_ms(guard.begin, 50),
        "normalise the uint8 micro-batch (model_images)": per_call_ms(
            lambda: model_images(batch, cfg.data.augment, accelerator.device), 20
        ),
        "optimizer step alone": per_call_ms(plain, 10) - restore_ms,
        "optimizer step through the GradScaler": per_call_ms(scaled, 10) - restore_ms,
        "StepGuard.step (scaler, zero_grad, BatchNorm restore, counters)": per_call_ms(guarded, 10) - restore_ms,
    }
    for name, ms in parts_ms.items():
        print(f"| {name} | {ms:.2f} |")


if __name__ == "__main__":
    main()
