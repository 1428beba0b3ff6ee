"""A synthetic Market-1501-sized ranking problem: features clustered by identity, 6 cameras (for benchmarks)."""

from __future__ import annotations

import numpy as np


def market_like(
    num_query: int = 3368,
    num_gallery: int = 15913,
    dim: int = 2048,
    num_ids: int = 750,
    seed: int = 0,
    noise: float = 3.0,
):
    """(q_feats, g_feats, q_ids, g_ids, q_cams, g_cams): float32 features, L2-normalised, ids 1..num_ids.

    Every query identity has gallery images; about 15% of the gallery are distractors (identity 0).
    """
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((num_ids + 1, dim), dtype=np.float32)
    q_ids = rng.integers(1, num_ids + 1, num_query)
    num_distractors = int(0.15 * num_gallery)
    g_ids = rng.integers(1, num_ids + 1, num_gallery)
    g_ids[:num_distractors] = 0
    q_cams, g_cams = rng.integers(1, 7, num_query), rng.integers(1, 7, num_gallery)

    def sample(ids, cams):
        x = centers[ids] + noise * rng.standard_normal((len(ids), dim), dtype=np.float32)
        x += 0.3 * centers[(cams * 97) % (num_ids + 1)]  # a shared camera bias makes same-camera items closer
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    return sample(q_ids, q_cams), sample(g_ids, g_cams), q_ids, g_ids, q_cams, g_cams
