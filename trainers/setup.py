"""Setting up a retrieval run: the Accelerator, the run directory, data checks, model/optimizers/schedule."""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs, ProjectConfiguration

from configs import ExperimentConfig, to_dict
from datasets.samplers import micro_batch_size
from inference.extract import input_dtype
from inference.models import build_model
from trainers import checkpoint as ckpt
from trainers.losses import RetrievalLoss
from trainers.optim import build_optimizer, build_scheduler, scaled_lr

log = logging.getLogger("trainers.retrieval")


@dataclass
class Parts:
    model: torch.nn.Module
    raw_model: torch.nn.Module
    criterion: RetrievalLoss
    optimizer: torch.optim.Optimizer
    center_optimizer: torch.optim.Optimizer | None
    scheduler: torch.optim.lr_scheduler.LambdaLR
    steps_per_epoch: int
    input_dtype: torch.dtype = torch.float32
    extra_optimizer: torch.optim.Optimizer | None = None
    """criterion parameters other than the centers (e.g. a distillation projection), stepped with the model"""


def make_accelerator(cfg: ExperimentConfig, run_dir: Path) -> Accelerator:
    plugin = None
    if cfg.train.deepspeed_config:
        if not Path(cfg.train.deepspeed_config).is_file():
            raise FileNotFoundError(f"train.deepspeed_config={cfg.train.deepspeed_config!r} does not exist")
        plugin = DeepSpeedPlugin(
            hf_ds_config=cfg.train.deepspeed_config,
            gradient_accumulation_steps=cfg.optim.grad_accum,
            gradient_clipping=float(cfg.optim.clip_grad),  # 0 = off; None would let "auto" become 1.0
        )
        # the stream is not an Accelerate-prepared loader, so "auto" cannot be filled from it
        world = int(os.environ.get("WORLD_SIZE", "1"))
        micro = cfg.data.batch_size // (world * cfg.optim.grad_accum)
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = micro
    # run() may be called again in one process (tests, benchmarks) with other precision/accumulation
    # settings; Accelerate keeps them in singletons, so forget the previous run's (not the process group)
    AcceleratorState._reset_state()
    GradientState._reset_state()
    project = ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "tb"))
    # a rank that stops answering fails the others' collectives after train.dist_timeout_s, not gloo's 30 min
    timeout = timedelta(seconds=cfg.train.dist_timeout_s)
    handlers = [InitProcessGroupKwargs(timeout=timeout)]
    if plugin is not None and not torch.cuda.is_available():
        # DeepSpeed on CPU: Accelerate must not be told cpu=True (it would then ignore DeepSpeed and see one
        # process); it initialises DeepSpeed's process group with the backend given here instead of nccl
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        handlers = [InitProcessGroupKwargs(backend="gloo", timeout=timeout)]
        if "LOCAL_RANK" not in os.environ:  # one process, not started by a launcher: a group of one
            os.environ.update(LOCAL_RANK="0", RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
    return Accelerator(
        mixed_precision=cfg.train.precision,
        gradient_accumulation_steps=cfg.optim.grad_accum,
        log_with="tensorboard",
        project_config=project,
        deepspeed_plugin=plugin,
        step_scheduler_with_optimizer=False,
        kwargs_handlers=handlers,
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def resolve_run_dir(cfg: ExperimentConfig, run_dir: str | None) -> Path:
    """runs/NAME/<$SLURM_JOB_ID or timestamp>, the same on every rank (rank 0 decides)."""
    if run_dir:
        return Path(run_dir)
    stamp = os.environ.get("SLURM_JOB_ID") or time.strftime("%Y%m%d-%H%M%S")
    return Path(cfg.output_dir) / cfg.name / stamp


def check_data(cfg: ExperimentConfig, manifest: dict, world_size: int) -> int:
    """Number of training classes; clear errors for P x K that cannot be met."""
    d = cfg.data
    if d.train_split not in manifest["splits"]:
        raise ValueError(f"data.train_split={d.train_split!r} is not in {d.shards}: {sorted(manifest['splits'])}")
    num_classes = int(manifest["splits"][d.train_split]["num_classes"])
    micro_batch_size(d.batch_size, world_size, cfg.optim.grad_accum)  # a clear error when it does not divide
    if d.sampler == "pk" and num_classes < d.batch_size // d.num_instances:
        raise ValueError(
            f"P x K: the training split has {num_classes} identities but a batch needs "
            f"P={d.batch_size // d.num_instances} (data.batch_size={d.batch_size} / data.num_instances="
            f"{d.num_instances}); lower data.batch_size"
        )
    return num_classes


def sync_batchnorm(model: torch.nn.Module, cfg: ExperimentConfig, accelerator) -> torch.nn.Module:
    """``train.sync_bn``: BatchNorm statistics over all processes (torch's SyncBatchNorm runs on CUDA only)."""
    if not cfg.train.sync_bn or accelerator.num_processes < 2:
        return model
    if accelerator.device.type != "cuda":
        log.warning("train.sync_bn ignored: SyncBatchNorm needs CUDA devices (BN statistics stay per process)")
        return model
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)


def build_parts(cfg: ExperimentConfig, accelerator: Accelerator, num_classes: int, loader_len: int) -> Parts:
    model = build_model(cfg.model, num_classes, img_size=(cfg.data.height, cfg.data.width))
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = sync_batchnorm(model, cfg, accelerator)
    raw_model = model
    criterion = RetrievalLoss(cfg.loss, num_classes, model.dim).to(accelerator.device)
    lr = scaled_lr(cfg.optim, global_batch(cfg))
    optimizer = build_optimizer(model, dataclasses.replace(cfg.optim, lr=lr))
    steps = cfg.schedule.iters_per_epoch or loader_len // cfg.optim.grad_accum
    if steps < 1:
        raise ValueError(f"an epoch has {loader_len} batches: fewer than optim.grad_accum={cfg.optim.grad_accum}")
    scheduler = build_scheduler(optimizer, cfg.schedule, steps)
    if cfg.train.compile:
        model = torch.compile(model)
    model, optimizer = accelerator.prepare(model, optimizer)
    center_opt = None
    if criterion.center is not None:
        center_opt = accelerator.prepare(torch.optim.SGD(criterion.center.parameters(), lr=cfg.loss.center_lr))
    dtype = input_dtype(raw_model)
    if dtype != torch.float32:
        # DeepSpeed fp16/bf16 converts parameters but not buffers; BatchNorm needs its statistics in the same dtype
        for module in raw_model.modules():
            for name, buf in module.named_buffers(recurse=False):
                if buf is not None and buf.is_floating_point():
                    module._buffers[name] = buf.to(dtype)
    return Parts(model, raw_model, criterion, optimizer, center_opt, scheduler, steps, dtype)


def global_batch(cfg: ExperimentConfig) -> int:
    """Samples per optimizer step over all processes: ``data.batch_size``, whatever the number of processes."""
    return cfg.data.batch_size


def resolved_optim(cfg: ExperimentConfig, world_size: int) -> dict:
    """The learning rate the run uses and what it follows from (logged, and kept in the run's config.json)."""
    batch = global_batch(cfg)
    return {"lr": scaled_lr(cfg.optim, batch), "global_batch": batch, "lr_scaling": cfg.optim.lr_scaling,
            "reference_batch": cfg.optim.reference_batch, "world_size": world_size}  # fmt: skip


def hparams(cfg: ExperimentConfig) -> dict:
    """Flat scalar config for TensorBoard's hparams view."""
    flat = ckpt.flatten(to_dict(cfg))
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flat.items()}
