"""Feature validation and chunked pairwise distances (squared euclidean, euclidean, cosine) in torch."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

METRICS = ("sqeuclidean", "euclidean", "cosine")


def as_features(x, name: str = "features", allow_empty: bool = False) -> torch.Tensor:
    """``x`` (numpy or torch) as a floating 2-D tensor; a clear ValueError for bad shapes or NaN/inf."""
    t = torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else x
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a numpy array or torch tensor, got {type(x).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D [N, D], got shape {tuple(t.shape)}")
    if not allow_empty and t.shape[0] == 0:
        raise ValueError(f"{name} is empty (0 rows)")
    if t.shape[1] == 0:
        raise ValueError(f"{name} has dimension 0")
    if not t.is_floating_point():
        t = t.float()
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        rows = bad.any(dim=1).nonzero().flatten()
        raise ValueError(f"{name} has NaN/inf values in {rows.numel()} rows (first: row {int(rows[0])})")
    return t


def as_labels(x, name: str, length: int | None = None) -> np.ndarray:
    """1-D int64 numpy array of labels/ids/cameras, checked against ``length``."""
    arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if length is not None and arr.shape[0] != length:
        raise ValueError(f"{name} has {arr.shape[0]} entries but the features/distances have {length} rows")
    return arr.astype(np.int64, copy=False)


def check_same_dim(a: torch.Tensor, b: torch.Tensor, a_name: str = "query", b_name: str = "gallery") -> None:
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"{a_name} features have dimension {a.shape[1]} but {b_name} features have {b.shape[1]}")


def pairwise_distance(x: torch.Tensor, y: torch.Tensor, metric: str = "sqeuclidean") -> torch.Tensor:
    """Dense [len(x), len(y)] distances; ``cosine`` is 1 - cosine similarity."""
    if metric not in METRICS:
        raise ValueError(f"metric={metric!r} is not valid; choose one of {list(METRICS)}")
    if metric == "cosine":
        return 1.0 - torch.nn.functional.normalize(x, dim=1) @ torch.nn.functional.normalize(y, dim=1).T
    d = (x * x).sum(1, keepdim=True) + (y * y).sum(1)[None, :]
    d = torch.addmm(d, x, y.T, beta=1.0, alpha=-2.0).clamp_(min=0)
    return d.sqrt_() if metric == "euclidean" else d


def iter_distances(
    x: torch.Tensor, y: torch.Tensor, metric: str = "sqeuclidean", chunk_size: int = 1024
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(start, distances[start:start+chunk_size])`` row chunks of the x-to-y distance matrix."""
    check_same_dim(x, y)
    for start in range(0, x.shape[0], chunk_size):
        yield start, pairwise_distance(x[start : start + chunk_size], y, metric)


def chunked_distance(x, y, metric: str = "sqeuclidean", chunk_size: int = 1024) -> torch.Tensor:
    """The full distance matrix, computed in row chunks (validates the features first)."""
    x, y = as_features(x, "query features"), as_features(y, "gallery features")
    out = torch.empty(x.shape[0], y.shape[0], dtype=x.dtype, device=x.device)
    for start, d in iter_distances(x, y.to(x.device, x.dtype), metric, chunk_size):
        out[start : start + d.shape[0]] = d
    return out
