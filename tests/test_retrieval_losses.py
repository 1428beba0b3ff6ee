"""Losses (batch-hard triplet, center, CE + smoothing, weighted sum) and optimizer / schedule building."""

import pytest
import torch

from configs import LossConfig, ModelConfig, OptimConfig, ScheduleConfig, load_config
from inference.models import build_model
from trainers.losses import RetrievalLoss, batch_hard_triplet, pairwise_distances
from trainers.optim import build_optimizer, build_scheduler, lr_factor


def test_batch_hard_triplet_matches_brute_force():
    torch.manual_seed(0)
    feat, labels = torch.randn(8, 5), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    d = torch.cdist(feat, feat)
    expected = []
    for i in range(8):
        pos = max(d[i, j] for j in range(8) if labels[j] == labels[i])
        neg = min(d[i, j] for j in range(8) if labels[j] != labels[i])
        expected.append(torch.relu(pos - neg + 0.3))
    assert torch.allclose(batch_hard_triplet(feat, labels, 0.3), torch.stack(expected).mean(), atol=1e-5)
    soft = torch.nn.functional.softplus(torch.stack(expected) - 0.3).mean()
    assert torch.allclose(batch_hard_triplet(feat, labels, 0.0), soft, atol=1e-5)
    assert torch.allclose(pairwise_distances(feat, feat), d, atol=1e-3)


def test_triplet_without_positives_is_zero_with_grad():
    feat = torch.randn(4, 3, requires_grad=True)
    loss = batch_hard_triplet(feat, torch.arange(4), 0.3)
    loss.backward()
    assert loss.item() == 0.0 and feat.grad is not None


def test_weighted_sum_and_terms():
    cfg = LossConfig(ce_weight=1.0, label_smoothing=0.1, triplet_weight=2.0, center_weight=5e-4)
    crit = RetrievalLoss(cfg, num_classes=4, feat_dim=6)
    out = {"feat": torch.randn(8, 6), "logits": torch.randn(8, 4)}
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    terms = crit(out, {"label": labels})
    assert set(terms) == {"ce", "triplet", "center", "loss"}
    ce = torch.nn.functional.cross_entropy(out["logits"], labels, label_smoothing=0.1)
    assert torch.allclose(terms["ce"], ce)
    assert torch.allclose(terms["triplet"], 2.0 * batch_hard_triplet(out["feat"], labels, 0.3))
    assert torch.allclose(terms["loss"], terms["ce"] + terms["triplet"] + terms["center"])


def test_center_step_uses_the_unweighted_gradient():
    """The strong baseline moves the centers by loss.center_lr times the gradient of the unweighted center loss."""
    from trainers.setup import make_accelerator, prepare_parts

    only_center = ["loss.ce_weight=0", "loss.triplet_weight=0", "loss.center_weight=5e-4", "loss.center_lr=0.5"]
    cfg = load_config("retr_demo", ["model.backbone=test_resnet", *only_center])
    crit = RetrievalLoss(cfg.loss, num_classes=3, feat_dim=2)
    model = build_model(cfg.model, num_classes=3, img_size=(32, 32))
    parts = prepare_parts(model, crit, cfg, make_accelerator(cfg), steps=1)
    feat, labels = torch.randn(6, 2), torch.tensor([0, 0, 1, 1, 2, 2])
    parts.criterion({"feat": feat}, {"label": labels})["loss"].backward()
    ref = parts.criterion.center.centers.detach().clone().requires_grad_(True)
    ((feat - ref[labels]).pow(2).sum(1).mean()).backward()
    parts.aux_optimizer.step()
    assert torch.allclose(parts.criterion.center.centers.detach(), ref.detach() - 0.5 * ref.grad, atol=1e-6)


def test_all_zero_weights_rejected():
    with pytest.raises(ValueError, match="every weight is 0"):
        RetrievalLoss(LossConfig(ce_weight=0, triplet_weight=0, center_weight=0), 2, 2)


def test_no_decay_on_norms_and_biases_and_head_lr():
    model = build_model(ModelConfig(backbone="test_resnet", embed_dim=8, pooling="gem"), 3)
    opt = build_optimizer(model, OptimConfig(name="sgd", lr=0.1, weight_decay=1e-4, head_lr_mult=10.0))
    by_id = {id(p): g for g in opt.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert by_id[id(named["backbone.conv1.0.weight"])]["weight_decay"] == 1e-4
    assert by_id[id(named["backbone.bn1.weight"])]["weight_decay"] == 0.0
    assert by_id[id(named["embed.bias"])]["weight_decay"] == 0.0
    assert by_id[id(named["pool.p"])]["weight_decay"] == 0.0
    assert by_id[id(named["head.weight"])]["lr"] == pytest.approx(1.0)
    assert by_id[id(named["backbone.conv1.0.weight"])]["lr"] == pytest.approx(0.1)
    assert id(named["neck.bias"]) not in by_id  # frozen BNNeck bias
    total = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert total == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_schedules():
    s = ScheduleConfig(epochs=10, warmup_epochs=2, warmup_factor=0.1, kind="multistep", milestones=(4, 7), gamma=0.1)
    ipe = 5
    assert lr_factor(0, s, ipe) == pytest.approx(0.1)
    assert lr_factor(5, s, ipe) == pytest.approx(0.55)
    assert lr_factor(10, s, ipe) == 1.0 and lr_factor(19, s, ipe) == 1.0
    assert lr_factor(20, s, ipe) == pytest.approx(0.1) and lr_factor(35, s, ipe) == pytest.approx(0.01)
    c = ScheduleConfig(epochs=10, warmup_epochs=0, kind="cosine", min_lr_ratio=0.1)
    assert lr_factor(0, c, ipe) == 1.0 and lr_factor(50, c, ipe) == pytest.approx(0.1)
    assert lr_factor(25, c, ipe) == pytest.approx(0.55)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = build_scheduler(opt, s, ipe)
    for _ in range(10):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(2.0)
