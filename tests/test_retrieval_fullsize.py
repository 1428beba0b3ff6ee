"""The full-size recipes' models (slow): Swin-B of retr_swinb from an official-layout 22k file, ResNet50-IBN-a."""

import re

import pytest
import timm
import torch

from configs import load_config
from inference.models import build_model
from trainers.losses import RetrievalLoss

pytestmark = pytest.mark.slow


def _train_step(model, cfg, num_classes: int) -> dict:
    criterion = RetrievalLoss(
        cfg.loss, num_classes, model(torch.zeros(2, 3, cfg.data.height, cfg.data.width))["feat"].shape[1]
    )
    labels = torch.tensor([0, 1])
    out = model(torch.randn(2, 3, cfg.data.height, cfg.data.width))
    terms = criterion(out, {"label": labels})
    terms["loss"].backward()
    return terms


def test_swinb_recipe_loads_the_official_22k_layout_and_trains_a_step(tmp_path):
    cfg = load_config("retr_swinb")
    src = timm.create_model("swin_base_patch4_window7_224", num_classes=0)
    state = {re.sub(r"layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", k): v
             for k, v in src.state_dict().items()}  # fmt: skip
    state["head.weight"], state["head.bias"] = torch.zeros(21841, 1024), torch.zeros(21841)  # the 21k head
    torch.save({"model": state}, tmp_path / "swin_base_patch4_window7_224_22k.pth")
    cfg.model.pretrained_path = str(tmp_path / "swin_base_patch4_window7_224_22k.pth")
    model = build_model(cfg.model, num_classes=10, img_size=(cfg.data.height, cfg.data.width))
    n_params = sum(p.numel() for p in model.backbone.parameters())
    assert 86e6 < n_params < 89e6, n_params  # Swin-B
    for k, v in src.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[k], v), k
    terms = _train_step(model, cfg, 10)
    assert torch.isfinite(terms["loss"]) and model.backbone.patch_embed.proj.weight.grad is not None


def test_r50_ibn_recipe_trains_a_step():
    cfg = load_config("reid_r50ibn", ["model.pretrained_path="])
    model = build_model(cfg.model, num_classes=10, img_size=(cfg.data.height, cfg.data.width))
    assert 23e6 < sum(p.numel() for p in model.backbone.parameters()) < 26e6  # ResNet-50 size
    terms = _train_step(model, cfg, 10)
    assert {"ce", "triplet", "center", "loss"} <= set(terms) and torch.isfinite(terms["loss"])
