"""Distillation losses: softened-logit KL and JS, embedding MSE / cosine (through a projection), and relational.

``KDLoss(cfg, student_dim, teacher_dim)`` compares the student's training outputs with the teacher's and
returns its weighted terms by name (``kd_kl``, ``kd_js``, ``kd_embed``, ``kd_relation``); each term is zero
when the student's outputs equal the teacher's. The embedding and relational terms compare the retrieval
embeddings (``embedding``: what evaluation and search rank by cosine, after the BNNeck unless
``model.neck_feat=before``), not the pooled features before the neck: those are non-negative (ReLU, then
pooling), so their cosine similarities crowd near one common value and carry little of the ranking.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from configs import DistillConfig


def kl_divergence(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton et al.: KL(softmax(teacher / T) || softmax(student / T)) per sample, times T^2 (gradient scale)."""
    t = F.log_softmax(teacher.float() / temperature, dim=1)
    s = F.log_softmax(student.float() / temperature, dim=1)
    return F.kl_div(s, t, reduction="batchmean", log_target=True) * temperature**2


def js_divergence(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Jensen-Shannon divergence of the softened distributions (symmetric, bounded by log 2), times T^2."""
    s = F.log_softmax(student.float() / temperature, dim=1)
    t = F.log_softmax(teacher.float() / temperature, dim=1)
    m = torch.logsumexp(torch.stack([s, t]), dim=0) - torch.log(torch.tensor(2.0, device=s.device))
    js = 0.5 * F.kl_div(m, s, reduction="batchmean", log_target=True)
    js = js + 0.5 * F.kl_div(m, t, reduction="batchmean", log_target=True)
    return js * temperature**2


def embedding_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str) -> torch.Tensor:
    """``mse`` between the embeddings, or ``cosine``: mean of 1 - cos(student, teacher)."""
    student, teacher = student.float(), teacher.float()
    if kind == "mse":
        return F.mse_loss(student, teacher)
    if kind == "cosine":
        return (1.0 - F.cosine_similarity(student, teacher, dim=1, eps=1e-8)).mean()
    raise ValueError(f"distill.embed_loss={kind!r} is not valid; choose one of ['cosine', 'mse']")


def _distances(x: torch.Tensor) -> torch.Tensor:
    d = x.pow(2).sum(1, keepdim=True) + x.pow(2).sum(1).unsqueeze(0) - 2.0 * x @ x.t()
    return d.clamp(min=1e-12).sqrt()


def relation_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str) -> torch.Tensor:
    """Match the batch's pairwise structure, which needs no projection (the sizes of the two may differ).

    ``similarity``: MSE between the cosine-similarity matrices. ``distance`` (Park et al., RKD-D): smooth-L1
    between the off-diagonal distances, each divided by its matrix's mean distance.
    """
    student, teacher = student.float(), teacher.float()
    if kind == "similarity":
        s, t = F.normalize(student, dim=1), F.normalize(teacher, dim=1)
        return F.mse_loss(s @ s.t(), t @ t.t())
    if kind == "distance":
        n = student.shape[0]
        off = ~torch.eye(n, dtype=torch.bool, device=student.device)
        ds, dt = _distances(student)[off], _distances(teacher)[off]
        return F.smooth_l1_loss(ds / ds.mean().clamp(min=1e-12), dt / dt.mean().clamp(min=1e-12))
    raise ValueError(f"distill.relation={kind!r} is not valid; choose one of ['distance', 'similarity']")


def build_projection(cfg: DistillConfig, student_dim: int, teacher_dim: int) -> nn.Module | None:
    """The student -> teacher embedding projection the config asks for (None when the embedding term is off)."""
    if cfg.embed_weight == 0:
        return None
    if cfg.projection == "none":
        if student_dim != teacher_dim:
            raise ValueError(
                f"distill.projection='none' but the student's embedding has {student_dim} dimensions and the "
                f"teacher's {teacher_dim}: the embedding term needs a projection; set distill.projection=auto "
                "(or linear), or distill.embed_weight=0"
            )
        return nn.Identity()
    if cfg.projection == "auto" and student_dim == teacher_dim:
        return nn.Identity()
    return nn.Linear(student_dim, teacher_dim, bias=False)


class KDLoss(nn.Module):
    """The configured distillation terms, each weighted; ``proj`` (if any) is trained with the student."""

    def __init__(self, cfg: DistillConfig, student_dim: int, teacher_dim: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.proj = build_projection(cfg, student_dim, teacher_dim)

    def forward(self, student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``student``: the model's training outputs (``embedding``, ``logits``); ``teacher``: the same keys."""
        cfg = self.cfg
        terms: dict[str, torch.Tensor] = {}
        if cfg.kl_weight > 0:
            terms["kd_kl"] = cfg.kl_weight * kl_divergence(student["logits"], teacher["logits"], cfg.temperature)
        if cfg.js_weight > 0:
            terms["kd_js"] = cfg.js_weight * js_divergence(student["logits"], teacher["logits"], cfg.temperature)
        if self.proj is not None:
            projected = self.proj(student["embedding"].float())
            terms["kd_embed"] = cfg.embed_weight * embedding_loss(projected, teacher["embedding"], cfg.embed_loss)
        if cfg.relation_weight > 0:
            relation = relation_loss(student["embedding"], teacher["embedding"], cfg.relation)
            terms["kd_relation"] = cfg.relation_weight * relation
        return terms
