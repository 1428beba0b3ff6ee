"""Allowed ranges of every numeric config field, checked once per section (see ``configs/_schema.py``).

A value out of its range, ``nan``/``inf``, or an integer beyond int64 is a ``ValueError`` naming the dotted key.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, is_dataclass


@dataclass(frozen=True)
class Range:
    """Allowed interval of a numeric field; ``None`` leaves a side open-ended (values must still be finite)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    """``True`` excludes ``low`` itself (``lr > 0``)"""

    def contains(self, value: float) -> bool:
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return self.high is None or value <= self.high

    def __str__(self) -> str:
        low = f"{self.low:g}" if self.low is not None else ""
        high = f"{self.high:g}" if self.high is not None else ""
        if not high:
            return f"{'>' if self.low_open else '>='} {low}" if low else "finite"
        if not low:
            return f"<= {high}"
        return f"in {'(' if self.low_open else '['}{low}, {high}]"


_INT64_MAX = 2**63 - 1
POSITIVE = Range(0, None, low_open=True)
NON_NEGATIVE = Range(0, None)
COUNT = Range(1, None)
PROBABILITY = Range(0, 1)

# The one table of numeric ranges, by dotted key. Every numeric field must be finite (no nan/inf) and, when
# integer, fit int64; a field listed here must also lie in its range. A test checks that every numeric
# field of the tree is listed, so a new field gets a range when it is added.
RANGES: dict[str, Range] = {
    "data.height": Range(16, 4096),
    "data.width": Range(16, 4096),
    "data.batch_size": COUNT,
    "data.num_instances": COUNT,
    "data.balanced_cap": NON_NEGATIVE,
    "data.num_workers": Range(0, 256),
    "data.cache_mb": NON_NEGATIVE,
    "data.shards_wait_s": Range(0, 7 * 24 * 3600),
    "data.eval_batch_size": COUNT,
    "data.prepare.padding": Range(0, 4),
    "data.prepare.min_size": Range(0, 4096),
    "data.prepare.max_side": Range(0, 16384),
    "data.prepare.quality": Range(1, 100),
    "data.prepare.shard_size": COUNT,
    "data.prepare.gallery_views": Range(0, 1000),
    "data.prepare.workers": Range(1, 1024),
    "data.augment.flip_p": PROBABILITY,
    "data.augment.pad": Range(0, 1024),
    "data.augment.erasing_p": PROBABILITY,
    "data.augment.color_jitter": Range(0, 1),
    "data.augment.mean": PROBABILITY,
    "data.augment.std": Range(0, 10, low_open=True),
    "model.last_stride": Range(1, 2),
    "model.gem_p": Range(1, 100),
    "model.embed_dim": Range(0, 65536),
    "model.scale": Range(0, 1000, low_open=True),
    "model.margin": Range(0, 1),
    "model.drop_path": Range(0, 1),
    "loss.ce_weight": NON_NEGATIVE,
    "loss.label_smoothing": Range(0, 0.999),
    "loss.triplet_weight": NON_NEGATIVE,
    "loss.triplet_margin": Range(0, 100),
    "loss.center_weight": NON_NEGATIVE,
    "loss.center_lr": NON_NEGATIVE,
    "loss.max_nan_steps": COUNT,
    "optim.lr": Range(0, 100, low_open=True),
    "optim.weight_decay": Range(0, 1),
    "optim.momentum": Range(0, 1),
    "optim.head_lr_mult": Range(0, 1e4, low_open=True),
    "optim.clip_grad": NON_NEGATIVE,
    "optim.grad_accum": Range(1, 4096),
    "optim.reference_batch": NON_NEGATIVE,
    "schedule.epochs": COUNT,
    "schedule.iters_per_epoch": NON_NEGATIVE,
    "schedule.warmup_epochs": NON_NEGATIVE,
    "schedule.warmup_factor": Range(0, 1, low_open=True),
    "schedule.milestones": NON_NEGATIVE,
    "schedule.gamma": Range(0, 1, low_open=True),
    "schedule.min_lr_ratio": Range(0, 1),
    "train.seed": NON_NEGATIVE,
    "train.log_every": COUNT,
    "train.dist_timeout_s": Range(1, 86400),
    "train.threads": NON_NEGATIVE,
    "eval.every": NON_NEGATIVE,
    "checkpoint.every_steps": COUNT,
    "checkpoint.keep_last": COUNT,
    "launch.nodes": COUNT,
    "launch.gpus_per_node": NON_NEGATIVE,
    "launch.cpu_tasks": COUNT,
    "launch.cpus_per_task": COUNT,
    "launch.mem_gb": NON_NEGATIVE,
    "launch.time_min": COUNT,
    "launch.signal_delay_s": NON_NEGATIVE,
    "launch.requeue_on_failure": Range(0, 1000),
    "launch.min_nodes": NON_NEGATIVE,
    "distill.temperature": Range(0, 100, low_open=True),
    "distill.kl_weight": NON_NEGATIVE,
    "distill.js_weight": NON_NEGATIVE,
    "distill.embed_weight": NON_NEGATIVE,
    "distill.relation_weight": NON_NEGATIVE,
    "distill.cache_check_batches": NON_NEGATIVE,
    "distill.cache_tolerance": Range(0, 1),
}

# Where each section sits in the tree, so that its own validation names the full dotted key.
SECTION_KEYS = {
    "PrepareConfig": "data.prepare",
    "AugmentConfig": "data.augment",
    "DataConfig": "data",
    "ModelConfig": "model",
    "LossConfig": "loss",
    "OptimConfig": "optim",
    "ScheduleConfig": "schedule",
    "TrainConfig": "train",
    "EvalConfig": "eval",
    "CheckpointConfig": "checkpoint",
    "LaunchConfig": "launch",
    "DistillConfig": "distill",
}


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_ranges(section, prefix: str | None = None) -> None:
    """Reject non-finite, int64-overflowing and out-of-range numbers of one section, naming the dotted key.

    ``prefix`` is the section's dotted path (default: its place in the tree from ``SECTION_KEYS``).
    """
    prefix = SECTION_KEYS.get(type(section).__name__, "") if prefix is None else prefix
    for f in fields(section):
        value = getattr(section, f.name)
        items = value if isinstance(value, (tuple, list)) else (value,)
        key = f"{prefix}.{f.name}" if prefix else f.name
        for item in items:
            if not _is_number(item):
                continue
            if isinstance(item, int) and abs(item) > _INT64_MAX:
                raise ValueError(f"{key}={value!r} does not fit a 64-bit integer")
            if not math.isfinite(item):
                raise ValueError(f"{key}={value!r} must be a finite number")
            allowed = RANGES.get(key)
            if allowed is not None and not allowed.contains(item):
                raise ValueError(f"{key}={value!r} must be {allowed}")


def check_tree(node, prefix: str = "") -> None:
    """``check_ranges`` on every section of a config tree, by its real dotted path (new sections included)."""
    check_ranges(node, prefix)
    for f in fields(node):
        child = getattr(node, f.name)
        if is_dataclass(child):
            check_tree(child, f"{prefix}.{f.name}" if prefix else f.name)
