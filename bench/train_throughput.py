"""The trainer's step against a bare PyTorch loop, in one process: images/s and their ratio per variant.

trainer: ``trainers.retrieval.run`` on real shards (mars_mini's training crops, prepared once by
``datasets.prepare``; ``--data sample``: the embedded sample) with data from ``datasets.stream.TrainStream``
(its loader worker decodes and augments, the loop normalises the uint8 micro-batches), the model, CE + triplet +
center losses and the fused optimizer of the config, the loop with its skip guard, logging and stop checks. Its
speed is what it logs itself (``train/images_per_s``) over the windows after the first (start-up and warm-up
excluded), as images / seconds. The windows lie inside the first epoch (mars_mini: about 50 steps of 32), so no
epoch-end checkpoint or loader restart is in them; the sample's epochs are 11-12 steps, and its windows hold one.
trainer, in memory: the same ``run`` and loop, its stream replaced by the stream's own micro-batches of epoch 0
(uint8 pixels + erasing boxes) read once and handed out again from memory: no loader worker, no decoding; what
separates the data work competing for the cores from the loop's own overhead.
bare: the same model, losses and optimizers (built by the same functions) on synthetic float tensors of the same
shape, forward / loss / backward / step / zero_grad, timed over the same number of steps after the same warm-up,
with the same intra-op thread count as the trainer's process.
They alternate (trainer, in memory, bare, trainer, ...) and the medians are compared. On a GPU, MFU is the
achieved FLOP/s of the bare loop (forward + backward counted by torch's FlopCounterMode) over the device's peak.

    python bench/train_throughput.py [--variants fp32 bf16 channels_last compile foreach] [--rounds 2]
        [--data mars|sample] [--backbone resnet18] [--height 128] [--width 64] [--batch 32] [--steps 12]
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
MARS = REPO.parent / "shared" / "data" / "mars_mini"

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
    source = [f"data.root={work / 'raw'}"] if args.data == "sample" else ["data.reader=mars", f"data.root={MARS}"]
    overrides = [
        *source, f"model.backbone={args.backbone}", f"data.height={args.height}", f"data.width={args.width}",
        f"data.batch_size={args.batch}", "data.num_instances=4", f"data.num_workers={args.workers}",
        f"data.shards={work / args.data / 'shards'}", f"output_dir={work / 'runs'}",
        "schedule.epochs=1000", "schedule.warmup_epochs=0", "eval.enabled=false", "optim.name=adamw",
        f"train.log_every={args.steps}", "checkpoint.every_steps=1000000", *VARIANTS[variant][0],
    ]  # fmt: skip
    return load_config("retr_demo", overrides)


class InMemoryStream:
    """A stream_fn for ``run``: the real stream's micro-batches of epoch 0, read once, then handed out from memory
    for every epoch (no loader worker, no decoding; the loop still normalises them)."""

    def __init__(self, cfg, rank: int, world_size: int) -> None:
        from datasets.stream import TrainStream

        stream = TrainStream(cfg, rank, world_size)
        try:
            self.batches = [{k: v.clone() if torch.is_tensor(v) else v for k, v in b.items()} for b in stream.epoch(0)]
        finally:
            stream.close()
        self.accum = cfg.optim.grad_accum

    def num_steps(self, epoch: int) -> int:
        return len(self.batches) // self.accum

    def epoch(self, epoch: int, start: int = 0):
        for batch in self.batches[start * self.accum :]:
            yield {**batch, "epoch": epoch}

    def close(self) -> None:
        pass


def trainer_speed(cfg, steps: int, in_memory: bool = False) -> float:
    """Images/s the trainer logs over its windows after the first (which holds start-up and warm-up): the images
    of those windows over their seconds."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from datasets.shards import read_manifest
    from trainers.retrieval import run

    extra = {}
    if in_memory:
        num_classes = read_manifest(cfg.data.shards)["splits"][cfg.data.train_split]["num_classes"]
        extra = {"stream_fn": InMemoryStream, "num_classes": num_classes}
    result = run(cfg, max_steps=3 * steps, **extra)
    acc = EventAccumulator(str(next(Path(result["run_dir"], "tb").rglob("events.out.tfevents*"))))
    acc.Reload()
    events = acc.Scalars("train/images_per_s")
    windows = [(e.step - prev.step, e.value) for prev, e in zip(events, events[1:])]  # (steps, images/s)
    images = sum(n * cfg.data.batch_size for n, _ in windows)
    return images / sum(n * cfg.data.batch_size / speed for n, speed in windows)


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
    trainer, memory, bare = [], [], []
    flops = 0.0
    for _ in range(args.rounds):
        if variant != "foreach":
            trainer.append(trainer_speed(cfg, args.steps))
            memory.append(trainer_speed(cfg, args.steps, in_memory=True))
        set_threads(cfg)  # the trainer's process-wide choice, for the bare loop too
        speed, flops = bare_speed(cfg, args.steps, fused=variant != "foreach")
        bare.append(speed)
    t = statistics.median(trainer) if trainer else float("nan")
    m = statistics.median(memory) if memory else float("nan")
    b = statistics.median(bare)
    return {"trainer": t, "memory": m, "bare": b, "ratio": t / b, "memory_ratio": m / b,
            "mfu": mfu(b, flops, args.batch, cfg.train.precision), "runs": (trainer, memory, bare)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=["fp32", "bf16", "channels_last", "foreach"])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--data", choices=["mars", "sample"], default="mars", help="mars_mini (../shared/data) or "
                        "the embedded sample (no download; its epochs are shorter than the timed windows)")  # fmt: skip
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--height", type=int, default=128)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--steps", type=int, default=12, help="steps per timed window")
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.data == "mars" and not MARS.is_dir():
        raise SystemExit(f"{MARS} is absent: run with --data sample (the embedded sample)")
    work = args.work or Path(tempfile.mkdtemp(prefix="train_throughput_"))
    cfg = config(args, "fp32", work)
    if not Path(cfg.data.shards, "manifest.json").is_file():
        prepare_main(["--config", "retr_demo", f"data.reader={cfg.data.reader}", f"data.root={cfg.data.root}",
                      f"data.shards={cfg.data.shards}", "--splits", "train", "--no-progress"])  # fmt: skip
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.processor() or 'cpu'})"
    print(f"device {device}; torch {torch.__version__}; {args.backbone} {args.height}x{args.width}, "
          f"batch {args.batch}; data {args.data}")  # fmt: skip
    print("| variant | trainer images/s | trainer, in memory images/s | bare loop images/s | trainer / bare "
          "| in memory / bare | MFU (bare) |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for variant in args.variants:
        if VARIANTS[variant][1] and not torch.cuda.is_available():
            print(f"| {variant} | GPU only | GPU only | GPU only | - | - | - |")
            continue
        row = measure(args, variant, work)
        trainer, memory, bare = row["runs"]
        texts = [f"{row[k]:.1f} ({', '.join(f'{v:.1f}' for v in runs)})" if runs else "-"
                 for k, runs in (("trainer", trainer), ("memory", memory), ("bare", bare))]  # fmt: skip
        ratios = [f"{row[k]:.3f}" if trainer else "-" for k in ("ratio", "memory_ratio")]
        print(f"| {variant} | {' | '.join(texts)} | {' | '.join(ratios)} | {row['mfu']} |", flush=True)


if __name__ == "__main__":
    main()
