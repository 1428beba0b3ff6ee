"""Distillation losses: each term is zero when the student's outputs equal the teacher's, positive otherwise;
the projection is built when the sizes differ and refused when it is needed but switched off."""

import pytest
import torch

from configs import DistillConfig, load_config
from distill.losses import KDLoss, embedding_loss, js_divergence, kl_divergence, relation_loss
from trainers.registry import trainer_builder


def _pair(n=8, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=g), torch.randn(n, dim, generator=g)


@pytest.mark.parametrize("fn", [kl_divergence, js_divergence])
def test_logit_terms_zero_when_equal_positive_otherwise(fn):
    s, t = _pair(dim=10)
    assert fn(t.clone(), t, 4.0).abs().item() < 1e-6
    assert fn(s, t, 4.0).item() > 1e-4
    assert fn(s, t, 1.0).item() > 1e-4


def test_kl_matches_its_definition_and_gradient_flows_to_the_student_only():
    s, t = _pair(dim=5)
    s.requires_grad_(True)
    T = 2.0
    p, q = torch.softmax(t / T, 1), torch.softmax(s / T, 1)
    expected = (p * (p.log() - q.log())).sum(1).mean() * T * T
    loss = kl_divergence(s, t, T)
    assert torch.allclose(loss, expected, atol=1e-6)
    loss.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0


def test_js_is_symmetric_and_bounded():
    s, t = _pair(dim=6)
    assert torch.allclose(js_divergence(s, t, 1.0), js_divergence(t, s, 1.0), atol=1e-6)
    assert js_divergence(s * 50, -t * 50, 1.0).item() <= torch.log(torch.tensor(2.0)).item() + 1e-5


@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_embedding_term(kind):
    s, t = _pair()
    assert embedding_loss(t.clone(), t, kind).item() < 1e-6
    assert embedding_loss(s, t, kind).item() > 1e-3


@pytest.mark.parametrize("kind", ["similarity", "distance"])
def test_relation_term_works_across_sizes(kind):
    s, t = _pair()
    assert relation_loss(t.clone(), t, kind).item() < 1e-6
    assert relation_loss(s, t, kind).item() > 1e-4
    # a student of another width with the teacher's pairwise structure: zero (an orthogonal map into 32-d)
    q, _ = torch.linalg.qr(torch.randn(32, 16))
    assert relation_loss(t @ q.t(), t, kind).item() < 1e-5
    assert relation_loss(torch.randn(8, 32), t, kind).item() > 1e-4


def _all_terms(**kw) -> DistillConfig:
    return DistillConfig(kl_weight=1, js_weight=1, embed_weight=1, relation_weight=1, **kw)


def test_kdloss_terms_zero_for_identical_outputs_positive_otherwise():
    kd = KDLoss(_all_terms(), 16, 16)
    assert isinstance(kd.proj, torch.nn.Identity)
    s, t = _pair()
    logits_s, logits_t = _pair(dim=5, seed=1)
    same = kd({"embedding": t, "logits": logits_t}, {"embedding": t, "logits": logits_t})
    assert set(same) == {"kd_kl", "kd_js", "kd_embed", "kd_relation"}
    assert all(v.abs().item() < 1e-6 for v in same.values()), same
    other = kd({"embedding": s, "logits": logits_s}, {"embedding": t, "logits": logits_t})
    assert all(v.item() > 1e-4 for v in other.values()), other


def test_embedding_and_relation_terms_compare_the_retrieval_embeddings_not_the_pooled_features():
    """Search ranks ``embedding`` (after the BNNeck); the non-negative pooled ``feat`` before it is not what
    the student should match: equal embeddings give zero whatever ``feat`` is, and equal ``feat`` does not."""
    kd = KDLoss(DistillConfig(kl_weight=0, embed_weight=1, relation_weight=1), 16, 16)
    s, t = _pair()
    pooled = torch.rand(8, 16)
    same = kd({"feat": pooled, "embedding": t}, {"feat": torch.rand(8, 16), "embedding": t})
    assert set(same) == {"kd_embed", "kd_relation"} and all(v.abs().item() < 1e-6 for v in same.values()), same
    other = kd({"feat": pooled, "embedding": s}, {"feat": pooled, "embedding": t})
    assert all(v.item() > 1e-3 for v in other.values()), other


def test_weights_scale_their_own_term_and_zero_weights_drop_it():
    s, t = _pair()
    one = KDLoss(DistillConfig(kl_weight=0, embed_weight=1), 16, 16)({"embedding": s}, {"embedding": t})
    three = KDLoss(DistillConfig(kl_weight=0, embed_weight=3), 16, 16)({"embedding": s}, {"embedding": t})
    assert set(one) == {"kd_embed"}
    assert torch.allclose(three["kd_embed"], 3 * one["kd_embed"])


def test_projection_when_sizes_differ_and_error_when_switched_off():
    kd = KDLoss(_all_terms(), 8, 16)
    assert isinstance(kd.proj, torch.nn.Linear) and kd.proj.weight.shape == (16, 8)
    s, t = torch.randn(6, 8, requires_grad=True), torch.randn(6, 16)
    logits = torch.randn(6, 3)
    terms = kd({"embedding": s, "logits": logits}, {"embedding": t, "logits": logits})
    sum(terms.values()).backward()
    assert kd.proj.weight.grad is not None and s.grad is not None
    with pytest.raises(ValueError, match=r"distill.projection='none'.*8 dimensions.*16"):
        KDLoss(_all_terms(projection="none"), 8, 16)
    assert isinstance(KDLoss(_all_terms(projection="linear"), 16, 16).proj, torch.nn.Linear)
    assert KDLoss(DistillConfig(embed_weight=0, projection="none"), 8, 16).proj is None  # no embedding term


def test_bad_distill_and_trainer_settings_are_named():
    with pytest.raises(ValueError, match="trainer='nonsense' is not valid"):
        load_config("retr_demo", ["trainer=nonsense"])
    with pytest.raises(ValueError, match="trainer=.nonsense. is not registered"):
        trainer_builder("nonsense")
    with pytest.raises(ValueError, match="distill.embed_loss='l1'"):
        load_config("distill_demo", ["distill.embed_loss=l1"])
    with pytest.raises(ValueError, match="distill.temperature"):
        load_config("distill_demo", ["distill.temperature=0"])
    with pytest.raises(ValueError, match="needs distill.teacher_checkpoint"):
        load_config("distill_demo", ["distill.teacher_checkpoint="]).distill.check_for_training()
    with pytest.raises(ValueError, match="every distillation weight 0"):
        cfg = load_config(
            "distill_demo", ["distill.kl_weight=0", "distill.embed_weight=0", "distill.relation_weight=0"]
        )
        cfg.distill.check_for_training()
