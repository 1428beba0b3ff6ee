"""Neck and head pieces of the retrieval model: BNNeck, linear and margin classifiers (``HEADS``)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def bnneck(dim: int) -> nn.BatchNorm1d:
    """The strong baseline's BNNeck: BatchNorm1d whose bias is frozen at zero."""
    bn = nn.BatchNorm1d(dim)
    nn.init.ones_(bn.weight)
    nn.init.zeros_(bn.bias)
    bn.bias.requires_grad_(False)
    return bn


class LinearHead(nn.Module):
    """Plain bias-free linear classifier (std 0.001 init, as in the strong baseline)."""

    def __init__(self, dim: int, num_classes: int, scale: float = 0.0, margin: float = 0.0) -> None:
        super().__init__()  # scale and margin belong to the margin heads: a linear head has neither
        self.weight = nn.Parameter(torch.empty(num_classes, dim))
        nn.init.normal_(self.weight, std=0.001)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return F.linear(x, self.weight)


class MarginHead(nn.Module):
    """Cosine classifier with an additive margin on the target class: AM-Softmax (CosFace) or ArcFace.

    Without labels (evaluation) it returns the scaled cosines without a margin.
    """

    def __init__(self, dim: int, num_classes: int, kind: str, scale: float = 30.0, margin: float = 0.35) -> None:
        super().__init__()
        if kind not in ("amsoftmax", "arcface"):
            raise ValueError(f"model.head={kind!r} is not a margin head; choose amsoftmax or arcface")
        self.kind, self.scale, self.margin = kind, scale, margin
        self.weight = nn.Parameter(torch.empty(num_classes, dim))
        nn.init.normal_(self.weight, std=0.01)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        cos = F.linear(F.normalize(x.float()), F.normalize(self.weight.float())).clamp(-1.0, 1.0)
        if labels is None:
            return self.scale * cos
        if self.kind == "amsoftmax":
            target = cos - self.margin
        else:
            sin = (1.0 - cos * cos).clamp(min=0.0).sqrt()
            target = cos * math.cos(self.margin) - sin * math.sin(self.margin)
            # past pi - m, cos(theta + m) is no longer monotonic: fall back to CosFace-style penalty
            threshold = math.cos(math.pi - self.margin)
            target = torch.where(cos > threshold, target, cos - math.sin(math.pi - self.margin) * self.margin)
        onehot = F.one_hot(labels, cos.shape[1]).bool()
        return self.scale * torch.where(onehot, target, cos)


class AMSoftmaxHead(MarginHead):
    """CosFace / AM-Softmax: ``s * (cos - m)`` on the target class."""

    def __init__(self, dim: int, num_classes: int, scale: float = 30.0, margin: float = 0.35) -> None:
        super().__init__(dim, num_classes, "amsoftmax", scale, margin)


class ArcFaceHead(MarginHead):
    """ArcFace: ``s * cos(theta + m)`` on the target class."""

    def __init__(self, dim: int, num_classes: int, scale: float = 30.0, margin: float = 0.35) -> None:
        super().__init__(dim, num_classes, "arcface", scale, margin)


# model.head picks one of these by name (the config schema validates against this dict)
HEADS: dict[str, type[nn.Module]] = {"linear": LinearHead, "amsoftmax": AMSoftmaxHead, "arcface": ArcFaceHead}


def build_head(name: str, dim: int, num_classes: int, scale: float, margin: float) -> nn.Module:
    """Classifier by name: one of ``HEADS``."""
    if name not in HEADS:
        raise ValueError(f"model.head={name!r} is not valid; choose one of {sorted(HEADS)}")
    return HEADS[name](dim, num_classes, scale, margin)
