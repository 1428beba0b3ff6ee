"""Retrieval losses: CE with label smoothing (or margin softmax via the head), batch-hard triplet, center loss.

``RetrievalLoss`` returns a dict of named, weighted terms plus their sum under ``"loss"``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:  # reachable from the config schema (trainers.registry): no runtime import of configs
    from configs import LossConfig


def pairwise_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Euclidean distances [len(a), len(b)] (clamped before the square root for stable gradients)."""
    d = a.pow(2).sum(1, keepdim=True) + b.pow(2).sum(1).unsqueeze(0) - 2.0 * a @ b.t()
    return d.clamp(min=1e-12).sqrt()


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every rank; gradients flow back to the local slice."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x), dim=0)


def gather_labels(y: torch.Tensor) -> torch.Tensor:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return y
    out = [torch.empty_like(y) for _ in range(dist.get_world_size())]
    dist.all_gather(out, y)
    return torch.cat(out)


def batch_hard_triplet(
    feat: torch.Tensor, labels: torch.Tensor, margin: float, all_ranks: bool = False
) -> torch.Tensor:
    """Hermans et al.: per anchor the farthest positive and the closest negative; ``margin=0`` = soft margin.

    With ``all_ranks`` the positives/negatives are mined among the embeddings of every rank.
    """
    feat = feat.float()
    cand, cand_labels = (gather_with_grad(feat), gather_labels(labels)) if all_ranks else (feat, labels)
    d = pairwise_distances(feat, cand)
    same = labels.unsqueeze(1) == cand_labels.unsqueeze(0)
    d_ap = d.masked_fill(~same, float("-inf")).max(dim=1).values
    d_an = d.masked_fill(same, float("inf")).min(dim=1).values
    valid = torch.isfinite(d_ap) & torch.isfinite(d_an) & (same.sum(1) > 1)
    if not valid.any():
        return feat.sum() * 0.0
    diff = d_ap[valid] - d_an[valid]
    return F.softplus(diff).mean() if margin == 0 else F.relu(diff + margin).mean()


class CenterLoss(nn.Module):
    """Wen et al. center loss: mean squared distance of each feature to its class center (own optimizer)."""

    def __init__(self, num_classes: int, dim: int) -> None:
        super().__init__()
        self.centers = nn.Parameter(torch.randn(num_classes, dim))

    def forward(self, feat: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return (feat.float() - self.centers[labels]).pow(2).sum(1).clamp(1e-12, 1e12).mean()


class RetrievalLoss(nn.Module):
    """Weighted sum of the configured terms; ``forward(outputs, batch)`` -> {"ce", "triplet", "center", "loss"}.

    ``batch`` is the micro-batch (its ``label``); the center-loss centers are this module's parameters."""

    def __init__(self, cfg: LossConfig, num_classes: int, feat_dim: int) -> None:
        super().__init__()
        if cfg.ce_weight == 0 and cfg.triplet_weight == 0 and cfg.center_weight == 0:
            raise ValueError("loss: every weight is 0 (loss.ce_weight, loss.triplet_weight, loss.center_weight)")
        self.cfg = cfg
        self.center = CenterLoss(num_classes, feat_dim) if cfg.center_weight > 0 else None

    def forward(self, outputs: dict[str, torch.Tensor], batch: dict) -> dict[str, torch.Tensor]:
        cfg, labels = self.cfg, batch["label"]
        terms: dict[str, torch.Tensor] = {}
        if cfg.ce_weight > 0:
            ce = F.cross_entropy(outputs["logits"].float(), labels, label_smoothing=cfg.label_smoothing)
            terms["ce"] = cfg.ce_weight * ce
        if cfg.triplet_weight > 0:
            tri = batch_hard_triplet(outputs["feat"], labels, cfg.triplet_margin, cfg.triplet_all_ranks)
            terms["triplet"] = cfg.triplet_weight * tri
        if self.center is not None:
            terms["center"] = cfg.center_weight * self.center(outputs["feat"], labels)
        terms["loss"] = sum(terms.values())
        return terms
