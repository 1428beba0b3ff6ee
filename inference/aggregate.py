"""Aggregation of backbone feature maps [B, C, H, W] into vectors [B, C]: GAP, GMP, GeM, SPoC, R-MAC."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _check_map(x: torch.Tensor) -> None:
    if x.dim() != 4:
        raise ValueError(f"feature maps must be [B, C, H, W], got shape {tuple(x.shape)}")


class GAP(nn.Module):
    """Global average pooling."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_map(x)
        return x.mean((2, 3))


class GMP(nn.Module):
    """Global max pooling (MAC)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_map(x)
        return x.amax((2, 3))


class GeM(nn.Module):
    """Generalised mean pooling (mean of x^p)^(1/p); ``learnable`` makes p a parameter."""

    def __init__(self, p: float = 3.0, learnable: bool = False, eps: float = 1e-6) -> None:
        super().__init__()
        if p <= 0:
            raise ValueError(f"GeM p={p} must be > 0")
        if learnable:
            self.p = nn.Parameter(torch.tensor(float(p)))
        else:
            self.register_buffer("p", torch.tensor(float(p)), persistent=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_map(x)
        return x.clamp(min=self.eps).pow(self.p).mean((2, 3)).pow(1.0 / self.p)


class SPoC(nn.Module):
    """Sum pooling of convolutions, weighted by a Gaussian centre prior (sigma = min(H, W) / 3) when asked."""

    def __init__(self, center_prior: bool = True) -> None:
        super().__init__()
        self.center_prior = center_prior

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_map(x)
        if not self.center_prior:
            return x.sum((2, 3))
        h, w = x.shape[2:]
        ys = torch.arange(h, dtype=x.dtype, device=x.device) - (h - 1) / 2
        xs = torch.arange(w, dtype=x.dtype, device=x.device) - (w - 1) / 2
        sigma = min(h, w) / 3.0
        weight = torch.exp(-(ys[:, None] ** 2 + xs[None, :] ** 2) / (2 * sigma**2))
        return (x * weight).sum((2, 3))


def rmac_regions(h: int, w: int, levels: int = 3, overlap: float = 0.4) -> list[tuple[int, int, int]]:
    """Square regions (top, left, side) on ``levels`` scales: side 2*min(h, w)/(l+1), placed evenly along each
    axis with about ``overlap`` between neighbours; the first level is the largest square(s)."""
    regions = []
    for level in range(1, levels + 1):
        side = max(1, math.floor(2 * min(h, w) / (level + 1)))
        stride = max(side * (1 - overlap), 1.0)
        rows = [round(t) for t in torch.linspace(0, h - side, max(1, math.ceil((h - side) / stride) + 1)).tolist()]
        cols = [round(t) for t in torch.linspace(0, w - side, max(1, math.ceil((w - side) / stride) + 1)).tolist()]
        regions += [(r, c, side) for r in rows for c in cols]
    return list(dict.fromkeys(regions))


class RMAC(nn.Module):
    """Regional MAC: max-pool each multi-scale region, L2-normalise, sum (Tolias et al. 2016)."""

    def __init__(self, levels: int = 3, overlap: float = 0.4) -> None:
        super().__init__()
        self.levels, self.overlap = levels, overlap

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_map(x)
        out = torch.zeros(x.shape[:2], dtype=x.dtype, device=x.device)
        for top, left, side in rmac_regions(x.shape[2], x.shape[3], self.levels, self.overlap):
            out += F.normalize(x[:, :, top : top + side, left : left + side].amax((2, 3)), dim=1)
        return out


# by name: model.pooling (the config schema validates against this dict) and build_aggregation
POOLINGS: dict[str, type[nn.Module]] = {"avg": GAP, "max": GMP, "gem": GeM, "spoc": SPoC, "rmac": RMAC}


def build_aggregation(name: str, **kwargs) -> nn.Module:
    """Aggregation module by name (a key of ``POOLINGS``), kwargs to its constructor."""
    if name not in POOLINGS:
        raise ValueError(f"aggregation {name!r} is not known; choose one of {sorted(POOLINGS)}")
    return POOLINGS[name](**kwargs)
