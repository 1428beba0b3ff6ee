"""Neck and head pieces of the retrieval model: pooling choice, BNNeck, linear and margin classifiers."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from inference.aggregate import GAP, GeM


def build_pooling(name: str, gem_p: float = 3.0) -> nn.Module:
    """``avg`` or ``gem``."""
    if name == "avg":
        return GAP()
    if name == "gem":
        return GeM(gem_p, learnable=True)
    raise ValueError(f"model.pooling={name!r} is not valid; choose one of ['avg', 'gem']")


def bnneck(dim: int) -> nn.BatchNorm1d:
    """The strong baseline's BNNeck: BatchNorm1d whose bias is frozen at zero."""
    bn = nn.BatchNorm1d(dim)
    nn.init.ones_(bn.weight)
    nn.init.zeros_(bn.bias)
    bn.bias.requires_grad_(False)
    return bn


class LinearHead(nn.Module):
    """Plain bias-free linear classifier (std 0.001 init, as in the strong baseline)."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
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


HEADS = ("linear", "amsoftmax", "arcface")


def build_head(name: str, dim: int, num_classes: int, scale: float, margin: float) -> nn.Module:
    """Classifier by name: one of HEADS."""
    if name == "linear":
        return LinearHead(dim, num_classes)
    if name in ("amsoftmax", "arcface"):
        return MarginHead(dim, num_classes, name, scale, margin)
    raise ValueError(f"model.head={name!r} is not valid; choose one of {list(HEADS)}")
