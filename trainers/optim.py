"""Optimizers and per-iteration learning-rate schedules (linear warmup, then multistep or cosine)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:  # reachable from the config schema (trainers.registry): no runtime import of configs
    from configs import OptimConfig, ScheduleConfig

# torch's public norm classes (timm's norm layers derive from them)
NO_DECAY_TYPES = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
    nn.LayerNorm,
    nn.GroupNorm,
)


def no_decay_names(model: nn.Module) -> set[str]:
    """Parameters that get no weight decay: biases, every norm layer's parameters, and other 0/1-d params."""
    names = set()
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            full = f"{module_name}.{name}" if module_name else name
            if isinstance(module, NO_DECAY_TYPES) or name.endswith("bias") or param.ndim <= 1:
                names.add(full)
    return names


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Four groups: backbone / head (neck, embedding, classifier) x decay / no decay."""
    skip = no_decay_names(model)
    groups: dict[tuple[bool, bool], list] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        is_head = not name.startswith("backbone.")
        groups.setdefault((is_head, name in skip), []).append(param)
    out = []
    for (is_head, no_decay), params in sorted(groups.items()):
        lr = cfg.lr * (cfg.head_lr_mult if is_head else 1.0)
        wd = 0.0 if no_decay else cfg.weight_decay
        out.append({"params": params, "lr": lr, "weight_decay": wd, "name": f"{'head' if is_head else 'backbone'}"})
    return out


def scaled_lr(cfg: OptimConfig, global_batch: int) -> float:
    """``optim.lr`` scaled from ``optim.reference_batch`` to ``global_batch`` (``optim.lr_scaling``).

    linear: the rate grows with the batch (Goyal et al.); sqrt: with its square root (suits Adam). With the
    global batch fixed, the rate is the same whatever the number of processes.
    """
    if cfg.lr_scaling == "none":
        return cfg.lr
    ratio = global_batch / cfg.reference_batch
    return cfg.lr * (ratio if cfg.lr_scaling == "linear" else math.sqrt(ratio))


def build_optimizer(model: nn.Module, cfg: OptimConfig, fused: bool = False) -> torch.optim.Optimizer:
    """SGD (momentum), Adam or AdamW over ``param_groups``; ``fused``: torch's single-kernel implementation
    (CPU and CUDA), which a loss scaler can tell to skip a step without a host sync."""
    groups = param_groups(model, cfg)
    fused = fused or None  # None: torch picks foreach or for-loop
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, fused=fused)
    if cfg.name == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, fused=fused)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, fused=fused)
    raise ValueError(f"optim.name={cfg.name!r} is not valid; choose one of ['adam', 'adamw', 'sgd']")


def lr_factor(step: int, cfg: ScheduleConfig, iters_per_epoch: int) -> float:
    """Multiplier of the base lr at optimizer step ``step`` (0-based)."""
    warmup = cfg.warmup_epochs * iters_per_epoch
    if step < warmup:
        return cfg.warmup_factor + (1.0 - cfg.warmup_factor) * step / warmup
    if cfg.kind == "multistep":
        return cfg.gamma ** sum(step >= m * iters_per_epoch for m in cfg.milestones)
    total = max(cfg.epochs * iters_per_epoch - warmup, 1)
    progress = min((step - warmup) / total, 1.0)
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, iters_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-iteration LambdaLR; call ``step()`` after every optimizer step."""
    if iters_per_epoch < 1:
        raise ValueError(f"iters_per_epoch={iters_per_epoch} must be >= 1")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg, iters_per_epoch))
