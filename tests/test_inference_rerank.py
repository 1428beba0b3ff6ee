"""k-reciprocal re-ranking: a hand-checkable limit, the torchreid oracle on random data, and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from inference.distance import pairwise_distance
from inference.rerank import k_reciprocal_rerank
from tests.torchreid_oracle import oracle_rerank


def _oracle():
    try:
        return oracle_rerank()
    except ImportError as err:
        pytest.skip(f"oracle unavailable: {err}")


def _clustered(rng, n, dim, centers, noise=0.7):
    return centers[rng.integers(0, len(centers), n)] + noise * rng.standard_normal((n, dim))


def _reference(re_ranking, q, g, metric, **kw):
    q, g = torch.from_numpy(q), torch.from_numpy(g)
    dist = [pairwise_distance(a, b, metric).numpy() for a, b in ((q, g), (q, q), (g, g))]
    return re_ranking(*dist, **kw)


@pytest.mark.parametrize(
    "nq,ng,dim,metric,k1,k2,lam",
    [
        (30, 200, 16, "euclidean", 20, 6, 0.3),
        (50, 300, 8, "euclidean", 20, 6, 0.3),
        (12, 90, 4, "sqeuclidean", 7, 3, 0.5),
        (25, 150, 12, "cosine", 10, 1, 0.2),
    ],
)
def test_matches_torchreid(nq, ng, dim, metric, k1, k2, lam):
    re_ranking = _oracle().re_ranking
    rng = np.random.default_rng(nq)
    centers = rng.standard_normal((15, dim))
    q, g = _clustered(rng, nq, dim, centers), _clustered(rng, ng, dim, centers)
    ref = _reference(re_ranking, q, g, metric, k1=k1, k2=k2, lambda_value=lam)
    # small blocks and pair budgets exercise every chunked path
    ours = k_reciprocal_rerank(q, g, k1=k1, k2=k2, lambda_value=lam, metric=metric, chunk_size=37, pair_budget=500)
    assert ours.shape == (nq, ng) and ours.dtype == torch.float32
    assert np.abs(ours.numpy() - ref).max() < 1e-6


def test_float32_features_and_one_block():
    re_ranking = _oracle().re_ranking
    rng = np.random.default_rng(7)
    centers = rng.standard_normal((10, 32))
    q = _clustered(rng, 20, 32, centers).astype(np.float32)
    g = _clustered(rng, 120, 32, centers).astype(np.float32)
    ref = _reference(re_ranking, q, g, "euclidean")
    assert np.abs(k_reciprocal_rerank(torch.from_numpy(q), g).numpy() - ref).max() < 1e-5


def test_lambda_one_is_the_normalised_original_distance():
    q = np.array([[0.0, 0.0], [1.0, 0.0]])
    g = np.array([[0.0, 1.0], [2.0, 0.0], [0.0, 3.0]])
    out = k_reciprocal_rerank(q, g, k1=2, k2=1, lambda_value=1.0).numpy()
    # squared euclidean distances divided by the largest squared distance of each query's row (over q and g)
    d2_q0 = np.array([1.0, 4.0, 9.0]) / 9.0
    d2_q1 = np.array([2.0, 1.0, 10.0]) / 10.0
    np.testing.assert_allclose(out, np.stack([d2_q0, d2_q1]), rtol=1e-6)


def test_bad_input():
    g = np.ones((5, 4))
    with pytest.raises(ValueError, match="NaN/inf"):
        k_reciprocal_rerank(np.full((2, 4), np.inf), g)
    with pytest.raises(ValueError, match="dimension"):
        k_reciprocal_rerank(np.ones((2, 3)), g)
    with pytest.raises(ValueError, match="empty"):
        k_reciprocal_rerank(np.ones((0, 4)), g)
    with pytest.raises(ValueError, match="k2"):
        k_reciprocal_rerank(np.ones((2, 4)), g, k1=3, k2=9)
    with pytest.raises(ValueError, match="lambda"):
        k_reciprocal_rerank(np.ones((2, 4)), g, lambda_value=2.0)


@pytest.mark.gpu
def test_gpu_matches_cpu():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    rng = np.random.default_rng(11)
    centers = rng.standard_normal((10, 32))
    q, g = _clustered(rng, 40, 32, centers), _clustered(rng, 300, 32, centers)
    cpu = k_reciprocal_rerank(q, g, chunk_size=64)
    gpu = k_reciprocal_rerank(q, g, chunk_size=64, device="cuda")
    assert gpu.device.type == "cuda" and torch.allclose(cpu, gpu.cpu(), atol=1e-6)
