"""``trainer="distill"``: the retrieval trainer's parts with a frozen teacher and the distillation terms added.

The one training loop (``trainers/retrieval.py``) runs it unchanged: ``criterion(out, batch)`` returns the
student's own terms (CE, triplet, center) plus ``kd_*`` terms and their sum under ``loss``. The teacher lives
outside the model, the optimizer and every saved file; the embedding projection (when there is one) is a
criterion parameter with its own optimizer, averaged over ranks like the center loss's centers.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
from accelerate import Accelerator
from torch import nn

from configs import ExperimentConfig
from distill.cache import TeacherCache, open_cache
from distill.losses import KDLoss
from distill.teacher import Teacher, load_teacher
from trainers.losses import RetrievalLoss
from trainers.optim import build_optimizer, scaled_lr
from trainers.setup import Parts, build_retrieval_parts, global_batch

log = logging.getLogger("trainers.retrieval")


class DistillCriterion(nn.Module):
    """Student losses + distillation terms; teacher outputs come from the live teacher or from the cache."""

    def __init__(
        self,
        base: RetrievalLoss,
        kd: KDLoss,
        teacher: Teacher,
        cache: TeacherCache | None = None,
        rank: int = 0,
        accum: int = 1,
        check_batches: int = 0,
        tolerance: float = 0.02,
    ) -> None:
        super().__init__()
        self.base, self.kd = base, kd
        self.teacher = teacher  # a plain object: not a submodule, so never in state_dict() or parameters()
        self.cache, self.rank, self.accum = cache, rank, accum
        self.check_batches, self.tolerance, self.checked = check_batches, tolerance, 0

    @property
    def center(self):
        return self.base.center

    def teacher_outputs(self, batch: dict) -> dict[str, torch.Tensor]:
        if self.cache is None:
            return self.teacher(batch["image"])
        size = len(batch["label"])
        # rank r's slice of the global batch, cut into grad_accum micro-batches of `size`
        offset = self.rank * size * self.accum + int(batch["micro"]) * size
        device = batch["image"].device
        cached = self.cache.lookup(int(batch["epoch"]), int(batch["step"]), offset, list(batch["key"]), device)
        cached["embedding"] = self.teacher.embedding_of(cached["feat"])
        if self.checked < self.check_batches:
            self.checked += 1
            compare_with_live(cached, self.teacher(batch["image"]), self.tolerance, self.cache.folder, batch)
        return cached

    def forward(self, out: dict[str, torch.Tensor], batch: dict) -> dict[str, torch.Tensor]:
        terms = self.base(out, batch)
        terms.pop("loss")
        terms.update(self.kd(out, self.teacher_outputs(batch)))
        terms["loss"] = sum(terms.values())
        return terms


def compare_with_live(cached: dict, live: dict, tolerance: float, folder, batch: dict) -> None:
    """Refuse a cache whose outputs differ from the live teacher's beyond ``tolerance`` (relative to scale)."""
    for name in ("feat", "logits"):
        scale = live[name].abs().max().clamp(min=1e-6)
        error = float((cached[name] - live[name]).abs().max() / scale)
        if error > tolerance:
            raise ValueError(
                f"teacher cache {folder}: its {name} differ from the live teacher's at epoch {int(batch['epoch'])} "
                f"step {int(batch['step'])} (max relative error {error:.3g} > distill.cache_tolerance={tolerance}); "
                "the cache is stale or the data changed: rebuild it with distill.cache=build"
            )
    log.info("teacher cache matches the live teacher at epoch %d step %d", int(batch["epoch"]), int(batch["step"]))


def build_distill_parts(cfg: ExperimentConfig, accelerator: Accelerator, num_classes: int, steps: int) -> Parts:
    """The retrieval parts for the student, then the teacher, the distillation terms and their optimizer."""
    d = cfg.distill
    d.check_for_training()
    if (d.kl_weight or d.js_weight) and cfg.model.head != "linear":
        # a margin head's training logits carry the margin on the target class, the teacher's (eval) do not:
        # the KL would pull the student's target logit up by scale x margin instead of towards the teacher
        raise ValueError(
            f"logit distillation (distill.kl_weight / distill.js_weight) needs model.head=linear; the student's "
            f"model.head={cfg.model.head!r} adds its margin to the training logits, which the teacher's lack: "
            "use model.head=linear, or only distill.embed_weight / distill.relation_weight"
        )
    teacher = load_teacher(cfg, accelerator.device)
    if (d.kl_weight or d.js_weight) and teacher.num_classes != num_classes:
        raise ValueError(
            f"logit distillation (distill.kl_weight / distill.js_weight) needs the teacher's classes to be the "
            f"student's: the teacher has {teacher.num_classes}, the training split {num_classes}; train the teacher "
            "on the same shards, or use only distill.embed_weight / distill.relation_weight"
        )
    parts = build_retrieval_parts(cfg, accelerator, num_classes, steps)
    kd = KDLoss(d, parts.raw_model.dim, teacher.dim).to(accelerator.device)
    cache = None
    if d.cache != "off":
        with accelerator.main_process_first():  # the main process builds a missing cache, the others then read it
            cache = open_cache(cfg, teacher, accelerator.device, build_allowed=accelerator.is_main_process)
    parts.criterion = DistillCriterion(
        parts.criterion,
        kd,
        teacher,
        cache,
        accelerator.process_index,
        cfg.optim.grad_accum,
        d.cache_check_batches,
        d.cache_tolerance,
    )
    trainable = [p for p in kd.parameters() if p.requires_grad]
    if trainable:
        # the student's learning rate (after optim.lr_scaling); constant, like the centers'
        optim = dataclasses.replace(cfg.optim, lr=scaled_lr(cfg.optim, global_batch(cfg)))
        fused = accelerator.state.deepspeed_plugin is None  # so that the loop can skip its step on the device
        parts.extra_optimizer = accelerator.prepare(build_optimizer(kd, optim, fused=fused))
    log.info(
        "distillation: %s; student %s (%d-d) <- teacher %s (%d-d)%s",
        ", ".join(f"{k}={getattr(d, k)}" for k in ("kl_weight", "js_weight", "embed_weight", "relation_weight")),
        cfg.model.backbone, parts.raw_model.dim, teacher.cfg.model.backbone, teacher.dim,
        f", teacher outputs from {cache.folder}" if cache else "",
    )  # fmt: skip
    return parts
