"""Ranking metrics: a hand-computed case, the torchreid oracle on random data, and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from inference.distance import chunked_distance, pairwise_distance
from inference.metrics import evaluate_ranking
from tests.torchreid_oracle import oracle_rank

# gallery: same id+cam (ignored), id 2, id 1, id 3, id 1, junk
G_IDS = np.array([1, 2, 1, 3, 1, -1])
G_CAMS = np.array([1, 2, 2, 3, 3, 2])
Q_IDS, Q_CAMS = np.array([1, 9, 2]), np.array([1, 1, 1])
DIST = np.array(
    [
        [0.1, 0.2, 0.3, 0.4, 0.5, 0.15],
        [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],
        [0.3, 0.05, 0.4, 0.6, 0.7, 0.1],
    ]
)


def test_hand_computed_reid():
    out = evaluate_ranking(DIST, Q_IDS, G_IDS, Q_CAMS, G_CAMS, protocol="reid", max_rank=5)
    # query 0 keeps [id2, id1, id3, id1]: positives at ranks 2 and 4; query 1 has no positive; query 2 hits at 1
    assert out["num_valid_queries"] == 2 and out["num_skipped_queries"] == 1
    assert out["mAP"] == pytest.approx((0.5 * (1 / 2 + 2 / 4) + 1.0) / 2)
    assert out["mINP"] == pytest.approx((2 / 4 + 1.0) / 2)
    assert out["cmc"] == pytest.approx([0.5, 1.0, 1.0, 1.0, 1.0])
    assert out["rank1"] == 0.5 and out["rank5"] == 1.0 and out["rank10"] == 1.0


def test_hand_computed_retail_has_no_camera_rule():
    out = evaluate_ranking(DIST, Q_IDS, G_IDS, protocol="retail", max_rank=3)
    # query 0 keeps all but the junk item: positives at ranks 1, 3 and 5
    ap0 = (1 / 1 + 2 / 3 + 3 / 5) / 3
    assert out["mAP"] == pytest.approx((ap0 + 1.0) / 2)
    assert out["mINP"] == pytest.approx((3 / 5 + 1.0) / 2)
    assert out["cmc"] == pytest.approx([1.0, 1.0, 1.0])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_torchreid_on_random_inputs(seed):
    rank = _oracle()
    rng = np.random.default_rng(seed)
    nq, ng = 70, 500
    q_ids, g_ids = rng.integers(0, 40, nq), rng.integers(0, 40, ng)
    q_cams, g_cams = rng.integers(0, 4, nq), rng.integers(0, 4, ng)
    dist = rng.random((nq, ng)).astype(np.float32)
    cmc, m_ap = rank.evaluate_rank(dist, q_ids, g_ids, q_cams, g_cams, max_rank=50, use_cython=False)
    for chunk in (1, 16, 256):
        out = evaluate_ranking(torch.from_numpy(dist), q_ids, g_ids, q_cams, g_cams, chunk_size=chunk, junk_id=None)
        assert abs(out["mAP"] - m_ap) < 1e-6
        assert np.abs(np.asarray(out["cmc"]) - cmc).max() < 1e-6


def test_features_input_equals_distance_input():
    rank = _oracle()
    rng = np.random.default_rng(3)
    qf, gf = rng.standard_normal((40, 8)).astype(np.float32), rng.standard_normal((300, 8)).astype(np.float32)
    q_ids, g_ids = rng.integers(0, 20, 40), rng.integers(0, 20, 300)
    q_cams, g_cams = rng.integers(0, 3, 40), rng.integers(0, 3, 300)
    dist = chunked_distance(qf, gf, "euclidean").numpy()
    cmc, m_ap = rank.evaluate_rank(dist, q_ids, g_ids, q_cams, g_cams, max_rank=20, use_cython=False)
    out = evaluate_ranking((qf, gf), q_ids, g_ids, q_cams, g_cams, max_rank=20, metric="euclidean", chunk_size=7)
    assert abs(out["mAP"] - m_ap) < 1e-6 and np.abs(np.asarray(out["cmc"]) - cmc).max() < 1e-6
    assert len(out["cmc"]) == 20


def test_distance_metrics_by_hand():
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    y = torch.tensor([[0.0, 1.0]])
    assert torch.allclose(pairwise_distance(x, y, "sqeuclidean"), torch.tensor([[2.0], [1.0]]))
    assert torch.allclose(pairwise_distance(x, y, "euclidean"), torch.tensor([[2.0**0.5], [1.0]]))
    assert torch.allclose(pairwise_distance(x, y, "cosine"), torch.tensor([[1.0], [0.0]]), atol=1e-7)
    assert torch.allclose(chunked_distance(x, y, "sqeuclidean", chunk_size=1), pairwise_distance(x, y))


def _oracle():
    try:
        return oracle_rank()
    except ImportError as err:
        pytest.skip(f"oracle unavailable: {err}")


def test_bad_input_is_a_clear_error():
    qf, gf = np.ones((3, 4), np.float32), np.ones((5, 4), np.float32)
    ids3, ids5 = np.arange(3), np.arange(5)
    bad = qf.copy()
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match="NaN/inf"):
        evaluate_ranking((bad, gf), ids3, ids5, protocol="retail")
    with pytest.raises(ValueError, match="NaN/inf"):
        evaluate_ranking(np.full((3, 5), np.inf), ids3, ids5, protocol="retail")
    with pytest.raises(ValueError, match="empty"):
        evaluate_ranking((np.ones((0, 4), np.float32), gf), ids3[:0], ids5, protocol="retail")
    with pytest.raises(ValueError, match="empty"):
        evaluate_ranking(np.ones((3, 0)), ids3, ids5[:0], protocol="retail")
    with pytest.raises(ValueError, match="gallery ids has 4 entries"):
        evaluate_ranking((qf, gf), ids3, ids5[:4], protocol="retail")
    with pytest.raises(ValueError, match="dimension"):
        evaluate_ranking((qf, np.ones((5, 3), np.float32)), ids3, ids5, protocol="retail")
    with pytest.raises(ValueError, match="needs query and gallery cameras"):
        evaluate_ranking((qf, gf), ids3, ids5, protocol="reid")
    with pytest.raises(ValueError, match="no query has a valid positive"):
        evaluate_ranking((qf, gf), ids3 + 10, ids5, protocol="retail")
    with pytest.raises(ValueError, match="protocol"):
        evaluate_ranking((qf, gf), ids3, ids5, protocol="market")
