"""Post-processing and aggregation: hand-computed cases, PCA against numpy's SVD, save/re-apply, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from inference.aggregate import GAP, GMP, RMAC, GeM, SPoC, build_aggregation, rmac_regions
from inference.postprocess import PCA, PostProcess, alpha_query_expansion, database_augment, l2_normalize


def test_l2_normalize():
    out = l2_normalize(np.array([[3.0, 4.0], [0.0, 0.0]]))
    assert torch.allclose(out, torch.tensor([[0.6, 0.8], [0.0, 0.0]], dtype=out.dtype))


def test_pca_on_a_line_and_against_svd():
    x = torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0], [3.0, 3.0]])
    pca = PCA.fit(x, 1)
    assert torch.allclose(pca.components[:, 0], torch.tensor([1.0, 1.0]) / 2**0.5, atol=1e-6)
    proj = pca.transform(x)[:, 0]
    assert torch.allclose(proj, (torch.arange(4.0) - 1.5) * 2**0.5, atol=1e-5)
    rng = np.random.default_rng(0)
    y = rng.standard_normal((200, 6)) @ rng.standard_normal((6, 6))
    ours = PCA.fit(y, 4, whiten=True).transform(y).double().numpy()
    yc = y - y.mean(0)
    u, s, _ = np.linalg.svd(yc, full_matrices=False)
    ref = u[:, :4] * np.sqrt(len(y) - 1)  # whitened scores have unit variance
    np.testing.assert_allclose(np.abs(ours), np.abs(ref), atol=1e-4)
    np.testing.assert_allclose(ours.var(0, ddof=1), np.ones(4), atol=1e-4)


def test_postprocess_save_and_reapply():
    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.standard_normal((50, 8)).astype(np.float32))
    post = PostProcess.fit(x, pca_dim=5, whiten=True)
    again = PostProcess.from_state_dict(post.state_dict())
    assert post.output_dim == 5
    assert torch.equal(post(x), again(x))
    assert torch.allclose(post(x).norm(dim=1), torch.ones(50))


def test_pca_dimension_too_large_and_wrong_input():
    with pytest.raises(ValueError, match="PCA dimension 10 is larger than the data allows"):
        PCA.fit(np.ones((5, 20)), 10)
    with pytest.raises(ValueError, match="NaN/inf"):
        PCA.fit(np.array([[1.0, np.nan], [0.0, 1.0], [1.0, 1.0]]), 1)
    pca = PCA.fit(np.random.default_rng(0).standard_normal((10, 4)), 2)
    with pytest.raises(ValueError, match="dimension 3 but the PCA was fitted on 4"):
        pca.transform(np.ones((2, 3)))


def test_dba_by_hand():
    g = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])
    out = database_augment(g, k=2)
    # item 0's two nearest are itself and item 1: mean (0.9, 0.3), normalised
    assert torch.allclose(out[0], torch.nn.functional.normalize(torch.tensor([0.9, 0.3]), dim=0))
    # item 2's nearest are itself and item 1
    assert torch.allclose(out[2], torch.nn.functional.normalize(torch.tensor([0.4, 0.8]), dim=0))


def test_alpha_qe_by_hand():
    q = torch.tensor([[1.0, 0.0]])
    g = torch.tensor([[0.8, 0.6], [0.0, 1.0], [-1.0, 0.0]])
    out = alpha_query_expansion(q, g, k=2, alpha=2.0)
    expected = torch.tensor([1.0, 0.0]) + 0.8**2 * torch.tensor([0.8, 0.6]) + 0.0 * torch.tensor([0.0, 1.0])
    assert torch.allclose(out[0], torch.nn.functional.normalize(expected, dim=0))
    with pytest.raises(ValueError, match="dimension"):
        alpha_query_expansion(q, torch.ones(3, 3))


def test_aggregations_by_hand():
    x = torch.arange(16.0).view(1, 1, 4, 4) + 1.0
    assert GAP()(x).item() == pytest.approx(8.5)
    assert GMP()(x).item() == 16.0
    assert GeM(p=1.0)(x).item() == pytest.approx(8.5)
    assert GeM(p=3.0)(x).item() == pytest.approx(float((x**3).mean() ** (1 / 3)), rel=1e-5)
    assert SPoC(center_prior=False)(x).item() == 136.0
    assert SPoC()(torch.ones(1, 2, 3, 3))[0, 0] < 9.0
    learn = GeM(p=3.0, learnable=True)
    learn(x.requires_grad_()).sum().backward()
    assert learn.p.grad is not None and [n for n, _ in learn.named_parameters()] == ["p"]
    assert list(GeM(p=3.0).parameters()) == []
    # R-MAC on a 1x1 map is the normalised MAC vector (the single region, counted once)
    y = torch.tensor([[[[3.0]], [[4.0]]]])
    assert torch.allclose(RMAC()(y), torch.tensor([[0.6, 0.8]]))
    assert rmac_regions(4, 4, levels=1) == [(0, 0, 4)]
    assert (0, 0, 2) in rmac_regions(4, 6, levels=2)
    assert build_aggregation("gem", p=4.0, learnable=True).p.item() == 4.0
    with pytest.raises(ValueError, match="choose one of"):
        build_aggregation("mean")
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        GAP()(torch.ones(2, 3))
