"""The trainer's step against a bare PyTorch loop, in one process: images/s and their ratio per variant.

trainer: ``trainers.retrieval.run`` on the embedded sample's shards (data from ``datasets.stream.TrainStream``,
the model, CE + triplet losses and the fused optimizer of the config, the loop with its skip guard, logging and
stop checks); its speed is what it logs itself (``train/images_per_s``), over the windows after the first
(start-up and warm-up excluded).
bare: the same model, losses and optimizer (built by the same functions) on synthetic tensors of the same
shape, forward / loss / backward / step / zero_grad, timed over the same number of steps after the same warm-up,
with the same intra-op thread count as the trainer's process.
The two alternate (trainer, bare, trainer, bare, ...) and the medians are compared. On a GPU, MFU is the
achieved FLOP/s of the bare loop (forward + backward counted by torch's FlopCounterMode) over the device's peak.

    python bench/train_throughput.py [--variants fp32 bf16 channels_last compile foreach] [--rounds 2]
        [--backbone resnet18] [--height 128] [--width 64] [--batch 32] [--steps 12]
"""

from __future__ import annotations

import argparse
import logging
import platform
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from configs import load_config  # noqa: E402
from datasets.prepare import main as prepare_main  # noqa: E402
from inference.models import build_model  # noqa: E402
from trainers.losses import RetrievalLoss  # noqa: E402
from trainers.optim import build_optimizer  # noqa: E402

# variant -> (config overrides, GPU only)
VARIANTS = {
    "fp32": ([], False),
    "bf16": (["train.precision=bf16"], False),
    "fp16": (["train.precision=fp16"], True),  # Accelerate refuses fp16 mixed precision on a CPU
    "channels_last": (["train.channels_last=true"], False),
    "compile": (["train.compile=true"], False),
    "foreach": ([], False),  # bare loop only: torch's default (foreach) optimizer instead of the fused one
}
PEAK_TFLOPS = {
    "H100": {"bf16": 989, "fp16": 989, "fp32": 67},
    "H200": {"bf16": 989, "fp16": 989, "fp32": 67},
    "A100": {"bf16": 312, "fp16": 312, "fp32": 19.5},
}  # fmt: skip (dense, SXM datasheets)


def config(args, variant: str, work: Path):
    overrides = [
        f"model.backbone={args.backbone}", f"data.height={args.height}", f"data.width={args.width}",
        f"data.batch_size={args.batch}", "data.num_instances=4", f"data.num_workers={args.workers}",
        f"data.root={work / 'raw'}", f"data.shards={work / 'shards'}", f"output_dir={work / 'runs'}",
        "schedule.epochs=1000", "schedule.warmup_epochs=0", "eval.enabled=false", "optim.name=adamw",
        f"train.log_every={args.steps}", "checkpoint.every_steps=1000000", *VARIANTS[variant][0],
    ]  # fmt: skip
    return load_config("retr_demo", overrides)


def trainer_speed(cfg, steps: int) -> float:
    """Images/s the trainer logs over its windows after the first (which holds start-up and warm-up)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from trainers.retrieval import run

    result = run(cfg, max_steps=3 * steps)
    acc = EventAccumulator(str(next(Path(result["run_dir"], "tb").rglob("events.out.tfevents*"))))
    acc.Reload()
    speeds = [e.value for e in acc.Scalars("train/images_per_s")]
    return statistics.mean(speeds[1:])


def bare_speed(cfg, steps: int, fused: bool = True) -> tuple[float, float]:
    """Images/s of the plain loop, and its FLOPs per step (forward + backward)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(cfg.model, 24, img_size=(cfg.data.height, cfg.data.width)).to(device).train()
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    criterion = RetrievalLoss(cfg.loss, 24, model.dim).to(device)
    optimizer = build_optimizer(model, cfg.optim, fused=fused)
    step_fn = torch.compile(model) if cfg.train.compile else model
    images = torch.randn(cfg.data.batch_size, 3, cfg.data.height, cfg.data.width, device=device)
    if cfg.train.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.arange(cfg.data.batch_size // 4, device=device).repeat_interleave(4) % 24
    batch = {"label": labels}
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.precision)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    autocast = torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()

    def step() -> None:
        with autocast:
            out = step_fn(images, labels)
            out = {k: v.float() for k, v in out.items()}
            loss = criterion(out, batch)["loss"]
        (scaler.scale(loss) if scaler else loss).backward()
        scaler.step(optimizer) if scaler else optimizer.step()
        if scaler:
            scaler.update()
        optimizer.zero_grad(set_to_none=True)

    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    for _ in range(steps - 1):  # warm-up, as the trainer's first window
        step()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(2 * steps):
        step()
    sync()
    return 2 * steps * cfg.data.batch_size / (time.perf_counter() - start), counter.get_total_flops()


def mfu(images_per_s: float, flops_per_step: float, batch: int, precision: str) -> str:
    if not torch.cuda.is_available():
        return "-"
    name = torch.cuda.get_device_name()
    peak = next((p for key, p in PEAK_TFLOPS.items() if key in name), None)
    if peak is None:
        return f"peak of {name} unknown"
    kind = {"bf16": "bf16", "fp16": "fp16"}.get(precision, "fp32")
    return f"{100 * images_per_s / batch * flops_per_step / (peak[kind] * 1e12):.1f}%"


def measure(args, variant: str, work: Path) -> dict:
    from trainers.setup import set_threads

    cfg = config(args, variant, work)
    trainer, bare = [], []
    flops = 0.0
    for _ in range(args.rounds):
        if variant != "foreach":
            trainer.append(trainer_speed(cfg, args.steps))
        set_threads(cfg)  # the trainer's process-wide choice, for the bare loop too
        speed, flops = bare_speed(cfg, args.steps, fused=variant != "foreach")
        bare.append(speed)
    t = statistics.median(trainer) if trainer else float("nan")
    b = statistics.median(bare)
    return {"trainer": t, "bare": b, "ratio": t / b, "mfu": mfu(b, flops, args.batch, cfg.train.precision),
            "runs": (trainer, bare)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=["fp32", "bf16", "channels_last", "foreach"])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--height", type=int, default=128)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--steps", type=int, default=12, help="steps per timed window")
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    work = args.work or Path(tempfile.mkdtemp(prefix="train_throughput_"))
    if not (work / "shards" / "manifest.json").is_file():
        prepare_main(["--config", "retr_demo", f"data.root={work / 'raw'}", f"data.shards={work / 'shards'}",
                      "--no-progress"])  # fmt: skip
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.processor() or 'cpu'})"
    print(f"device {device}; torch {torch.__version__}; {args.backbone} {args.height}x{args.width}, batch {args.batch}")
    print("| variant | trainer images/s | bare loop images/s | trainer / bare | MFU (bare) |")
    print("| --- | --- | --- | --- | --- |")
    for variant in args.variants:
        if VARIANTS[variant][1] and not torch.cuda.is_available():
            print(f"| {variant} | GPU only | GPU only | - | - |")
            continue
        row = measure(args, variant, work)
        trainer, bare = row["runs"]
        t_text = f"{row['trainer']:.1f} ({', '.join(f'{v:.1f}' for v in trainer)})" if trainer else "-"
        ratio = f"{row['ratio']:.3f}" if trainer else "-"
        b_text = f"{row['bare']:.1f} ({', '.join(f'{v:.1f}' for v in bare)})"
        print(f"| {variant} | {t_text} | {b_text} | {ratio} | {row['mfu']} |", flush=True)


if __name__ == "__main__":
    main()
