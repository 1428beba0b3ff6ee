"""Setting up a training run: the Accelerator, the run directory, threads, data checks, and the parts that the
``retrieval`` trainer trains (model, criterion, optimizers, schedule).

This module is reachable from the config schema (through ``trainers.registry``), so it imports ``configs`` only
for type checking.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.tracking import TensorBoardTracker
from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs, ProjectConfiguration, broadcast_object_list

from datasets.samplers import micro_batch_size
from inference.extract import input_dtype
from inference.models import build_model
from trainers.losses import RetrievalLoss
from trainers.optim import build_optimizer, build_scheduler, scaled_lr

if TYPE_CHECKING:
    from configs import ExperimentConfig

log = logging.getLogger("trainers.retrieval")


@dataclass
class Parts:
    """What the training loop trains; a trainer's builder (``trainers.registry.TRAINERS``) makes them.

    The loop calls ``out = model(batch["image"], batch["label"])`` and ``terms = criterion(out, batch)``: a dict
    of named scalar tensors with the total to backpropagate under ``"loss"``, each logged as ``train/<name>``.
    The criterion's own parameters (center-loss centers, a distillation projection, ...) are trained by
    ``aux_optimizer`` (and ``extra_optimizer``); the loop averages their gradients over the processes.
    ``raw_model`` is what is saved and evaluated; ``criterion.state_dict()`` is saved too, so a module that must
    not be saved (a frozen teacher) is kept out of the criterion's registered children.
    """

    model: torch.nn.Module
    raw_model: torch.nn.Module
    criterion: torch.nn.Module
    optimizer: torch.optim.Optimizer
    aux_optimizer: torch.optim.Optimizer | None
    scheduler: torch.optim.lr_scheduler.LambdaLR
    input_dtype: torch.dtype = torch.float32
    extra_optimizer: torch.optim.Optimizer | None = None
    """criterion parameters with another optimizer than the centers' (a distillation projection)"""
    extra_optimizer: torch.optim.Optimizer | None = None
    """criterion parameters other than the centers (e.g. a distillation projection), stepped with the model"""


def check_zero_stage(path: str) -> None:
    """Refuse ZeRO stage 3: it partitions the parameters themselves, while the trainer saves, evaluates and
    distils from each rank's whole model (stages 1 and 2 partition the optimizer state and gradients only)."""
    try:
        stage = json.loads(Path(path).read_text()).get("zero_optimization", {}).get("stage", 0)
    except (json.JSONDecodeError, AttributeError) as exc:
        raise ValueError(f"train.deepspeed_config={path!r} is not a DeepSpeed JSON object: {exc}") from None
    if str(stage) == "3":
        raise ValueError(f"train.deepspeed_config={path!r}: ZeRO stage 3 is not supported (it partitions the "
                         "parameters; the trainer saves and evaluates whole models): use stage 1 or 2")  # fmt: skip


def make_accelerator(cfg: ExperimentConfig) -> Accelerator:
    plugin = None
    if cfg.train.deepspeed_config:
        if not Path(cfg.train.deepspeed_config).is_file():
            raise FileNotFoundError(f"train.deepspeed_config={cfg.train.deepspeed_config!r} does not exist")
        check_zero_stage(cfg.train.deepspeed_config)
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
    project = ProjectConfiguration()  # the run directory is decided later, once, by the main process
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
        project_config=project,
        deepspeed_plugin=plugin,
        step_scheduler_with_optimizer=False,
        kwargs_handlers=handlers,
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def resolve_run_dir(cfg: ExperimentConfig, run_dir: str | None, accelerator: Accelerator) -> Path:
    """The run directory, decided once by the main process and sent to the others; TensorBoard writes to tb/.

    ``run_dir`` is used as given (it may hold a run to resume). Otherwise ``runs/NAME/<$SLURM_JOB_ID or
    timestamp>`` is created exclusively, with ``-2``, ``-3``, ... when another run took that name first.
    """
    path = None
    if accelerator.is_main_process:
        path = Path(run_dir) if run_dir else new_run_dir(Path(cfg.output_dir) / cfg.name)
        path.mkdir(parents=True, exist_ok=True)
    path = Path(broadcast_object_list([str(path)])[0]) if accelerator.num_processes > 1 else path
    accelerator.project_configuration.set_directories(str(path))
    if accelerator.is_main_process:  # TensorBoard under the run directory, known only now
        accelerator.log_with = [TensorBoardTracker(cfg.name, str(path / "tb"))]
    return path


def new_run_dir(parent: Path) -> Path:
    """A folder of its own under ``parent``, created atomically (mkdir fails when another run made it first)."""
    parent.mkdir(parents=True, exist_ok=True)
    stamp = os.environ.get("SLURM_JOB_ID") or time.strftime("%Y%m%d-%H%M%S")
    for n in range(1, 10_000):
        path = parent / (stamp if n == 1 else f"{stamp}-{n}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise RuntimeError(f"{parent}: no free run directory name for {stamp}")


def set_threads(cfg: ExperimentConfig) -> str:
    """Set torch's intra-op threads: ``train.threads``, else OMP_NUM_THREADS, else the cores this process may
    use (its CPU affinity), shared by the processes of the node, less its data loader workers. Returns what was
    decided, for the log. (Oversubscribed cores are the default's cost: measured in DESIGN, ResNet-18 trained
    about 2x faster with 1 thread than with 2 on a 2-core machine whose loader workers needed the other core.)"""
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
        return f"{cfg.train.threads} (train.threads)"
    omp = os.environ.get("OMP_NUM_THREADS", "").strip()
    if omp.isascii() and omp.isdecimal() and 0 < int(omp) <= 4096:  # (torch refuses huge counts)
        # set explicitly: torch reads the variable once, when it starts, and a SLURM task imports torch (to
        # unpickle its job) before the launcher's job wrapper sets it from launch.cpus_per_task
        torch.set_num_threads(int(omp))
        return f"{torch.get_num_threads()} (OMP_NUM_THREADS)"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    per_process = cores // max(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), 1)
    threads = max(per_process - cfg.data.num_workers, 1)
    torch.set_num_threads(threads)
    ignored = f"; OMP_NUM_THREADS={omp!r} ignored: not one thread count" if omp else ""
    workers = cfg.data.num_workers
    return f"{threads} ({cores} usable cores, {per_process} for this process, {workers} loader workers{ignored})"


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


def build_retrieval_parts(cfg: ExperimentConfig, accelerator: Accelerator, num_classes: int, steps: int) -> Parts:
    """The ``retrieval`` trainer: the retrieval model, its CE / triplet / center losses, optimizers, schedule.

    ``steps`` is the number of optimizer steps per epoch (the schedule is per step)."""
    model = build_model(cfg.model, num_classes, img_size=(cfg.data.height, cfg.data.width))
    criterion = RetrievalLoss(cfg.loss, num_classes, model.dim)
    return prepare_parts(model, criterion, cfg, accelerator, steps)


def prepare_parts(model: torch.nn.Module, criterion: torch.nn.Module, cfg: ExperimentConfig, accelerator: Accelerator,
                  steps: int) -> Parts:  # fmt: skip
    """Optimizers and schedule for ``model`` and the criterion's own parameters, all placed by Accelerate.

    The model's optimizer is fused (one kernel per step, and the loss scaler can skip a step on the device);
    under DeepSpeed it is DeepSpeed's. The criterion's parameters get plain SGD at ``loss.center_lr`` divided by
    ``loss.center_weight``: the strong baseline updates the centers with the unweighted center-loss gradient."""
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = sync_batchnorm(model, cfg, accelerator)
    raw_model = model
    criterion = criterion.to(accelerator.device)
    deepspeed = accelerator.state.deepspeed_plugin is not None
    lr = scaled_lr(cfg.optim, global_batch(cfg))
    optimizer = build_optimizer(model, dataclasses.replace(cfg.optim, lr=lr), fused=not deepspeed)
    scheduler = build_scheduler(optimizer, cfg.schedule, steps)
    if cfg.train.compile:
        model = torch.compile(model)
    model, optimizer = accelerator.prepare(model, optimizer)
    aux = [p for p in criterion.parameters() if p.requires_grad]
    aux_optimizer = None
    if aux:
        lr = cfg.loss.center_lr / cfg.loss.center_weight if cfg.loss.center_weight > 0 else cfg.loss.center_lr
        aux_optimizer = accelerator.prepare(torch.optim.SGD(aux, lr=lr, fused=not deepspeed or None))
    dtype = input_dtype(raw_model)
    if dtype != torch.float32:
        # DeepSpeed fp16/bf16 converts parameters but not buffers; BatchNorm needs its statistics in the same dtype
        for module in raw_model.modules():
            for name, buf in module.named_buffers(recurse=False):
                if buf is not None and buf.is_floating_point():
                    setattr(module, name, buf.to(dtype))  # a registered buffer's name: replaced as a buffer
    return Parts(model, raw_model, criterion, optimizer, aux_optimizer, scheduler, dtype)


def global_batch(cfg: ExperimentConfig) -> int:
    """Samples per optimizer step over all processes: ``data.batch_size``, whatever the number of processes."""
    return cfg.data.batch_size


def resolved_optim(cfg: ExperimentConfig, world_size: int) -> dict:
    """The learning rate the run uses and what it follows from (logged, and kept in the run's config.json)."""
    batch = global_batch(cfg)
    return {"lr": scaled_lr(cfg.optim, batch), "global_batch": batch, "lr_scaling": cfg.optim.lr_scaling,
            "reference_batch": cfg.optim.reference_batch, "world_size": world_size}  # fmt: skip
