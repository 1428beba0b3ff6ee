"""Retrieval model: backbones, last stride, neck/head modes and pretrained files in each official layout."""

import re

import pytest
import timm
import torch
import torchvision

from configs import ModelConfig
from inference.heads import MarginHead
from inference.ibn import resnet_ibn_a
from inference.models import build_model, load_pretrained


def _cfg(**kw) -> ModelConfig:
    cfg = ModelConfig(backbone="test_resnet")
    for k, v in kw.items():
        setattr(cfg, k, v)
    cfg.__post_init__()
    return cfg


def test_train_and_eval_outputs():
    model = build_model(_cfg(embed_dim=16, pooling="gem"), num_classes=5)
    x = torch.randn(4, 3, 64, 64)
    out = model(x)
    assert set(out) == {"feat", "logits", "embedding"}
    assert out["feat"].shape == (4, 16) and out["logits"].shape == (4, 5)
    assert not model.neck.bias.requires_grad  # BNNeck bias frozen
    model.eval()
    emb = model(x)
    assert emb.shape == (4, 16)
    assert torch.allclose(emb, model.neck(model.embed(model.pooled(x))))


def test_neck_feat_before_is_pre_bn():
    model = build_model(_cfg(neck_feat="before"), num_classes=3).eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(model(x), model.pooled(x))


def test_last_stride_one_doubles_the_map():
    x = torch.randn(1, 3, 64, 64)
    s1 = build_model(_cfg(backbone="resnet18", last_stride=1), 2).backbone.forward_features(x)
    s2 = build_model(_cfg(backbone="resnet18", last_stride=2), 2).backbone.forward_features(x)
    assert s1.shape[-1] == 2 * s2.shape[-1] == 4


@pytest.mark.parametrize("kind", ["amsoftmax", "arcface"])
def test_margin_heads_penalise_target(kind):
    head = MarginHead(8, 4, kind, scale=10.0, margin=0.3)
    x, y = torch.randn(6, 8), torch.tensor([0, 1, 2, 3, 0, 1])
    plain, margin = head(x), head(x, y)
    idx = torch.arange(6)
    assert torch.all(margin[idx, y] < plain[idx, y])
    mask = torch.ones_like(plain, dtype=torch.bool)
    mask[idx, y] = False
    assert torch.equal(margin[mask], plain[mask])


def test_vit_tokens_are_pooled():
    model = build_model(_cfg(backbone="test_vit"), 3, img_size=(32, 32)).eval()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, model.dim)


def test_unknown_backbone_lists_names():
    with pytest.raises(ValueError, match=r"resnet5O.*resnet50_ibn_a.*timm.*Close matches: .*resnet50"):
        build_model(_cfg(backbone="resnet5O"), 2)


def test_pretrained_offline_says_how_to_pass_a_file(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(RuntimeError, match="pretrained_path"):
        build_model(_cfg(backbone="resnet18", pretrained=True), 2)
    with pytest.raises(ValueError, match="pretrained_path"):
        build_model(_cfg(backbone="resnet50_ibn_a", pretrained=True), 2)


def test_ibn_a_key_layout():
    keys = resnet_ibn_a("resnet50_ibn_a", num_classes=1000).state_dict().keys()
    assert {
        "conv1.weight",
        "bn1.running_mean",
        "fc.weight",
        "layer1.0.bn1.IN.weight",
        "layer1.0.bn1.BN.running_var",
    } <= set(keys)
    assert "layer3.5.bn1.IN.bias" in keys and "layer4.0.bn1.weight" in keys and "layer4.0.bn1.IN.weight" not in keys
    assert "layer1.0.downsample.0.weight" in keys and "layer1.0.downsample.1.weight" in keys


def test_ibn_file_with_module_prefix_loads(tmp_path):
    src = resnet_ibn_a("resnet50_ibn_a", num_classes=1000)
    state = {f"module.{k}": v for k, v in src.state_dict().items()}
    torch.save({"state_dict": state, "epoch": 100}, tmp_path / "r50_ibn_a.pth")
    model = build_model(_cfg(backbone="resnet50_ibn_a", pretrained_path=str(tmp_path / "r50_ibn_a.pth")), 7)
    assert torch.equal(model.backbone.layer2[1].bn1.IN.weight, src.layer2[1].bn1.IN.weight)
    assert torch.equal(model.backbone.conv1.weight, src.conv1.weight)


def test_torchvision_resnet_file_loads(tmp_path):
    tv = torchvision.models.resnet18()
    torch.save(tv.state_dict(), tmp_path / "resnet18-f37072fd.pth")
    model = build_model(_cfg(backbone="resnet18", pretrained_path=str(tmp_path / "resnet18-f37072fd.pth")), 3)
    assert torch.equal(model.backbone.layer3[1].conv2.weight, tv.layer3[1].conv2.weight)
    assert torch.equal(model.backbone.bn1.running_var, tv.bn1.running_var)


def test_checkpoint_of_another_model_is_refused(tmp_path):
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "r18.pth")
    with pytest.raises(ValueError, match=r"does not hold weights for this backbone.*shape mismatches"):
        build_model(_cfg(backbone="resnet34", pretrained_path=str(tmp_path / "r18.pth")), 3)
    with pytest.raises(FileNotFoundError, match="model.pretrained_path"):
        build_model(_cfg(backbone="resnet18", pretrained_path=str(tmp_path / "nope.pth")), 3)


SWIN_KW = dict(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), num_classes=0)


def _official_swin_file(path, window=7, img=224):
    """Write a timm Swin's random weights in the official release layout (22k checkpoint)."""
    src = timm.create_model("swin_base_patch4_window7_224", window_size=window, img_size=img, **SWIN_KW)
    state = {}
    for k, v in src.state_dict().items():  # official: downsample at the end of a stage
        k = re.sub(r"layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", k)
        state[k] = v
    for k, v in src.named_buffers():
        if "relative_position_index" in k or "attn_mask" in k:
            state[k] = v
    state["layers.0.blocks.1.attn_mask"] = torch.zeros(64, 49, 49)
    state["head.weight"], state["head.bias"] = torch.randn(21841, src.num_features), torch.zeros(21841)
    torch.save({"model": state}, path)
    return src


def test_official_swin_file_loads(tmp_path, caplog):
    src = _official_swin_file(tmp_path / "swin_22k.pth")
    dst = timm.create_model("swin_base_patch4_window7_224", **SWIN_KW)
    missing, unexpected = load_pretrained(dst, tmp_path / "swin_22k.pth")
    assert missing == [] and unexpected == []
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k


def test_swin_relative_position_tables_are_resized(tmp_path):
    _official_swin_file(tmp_path / "swin_w7.pth")
    dst = timm.create_model("swin_base_patch4_window7_224", window_size=8, img_size=256, **SWIN_KW)
    missing, unexpected = load_pretrained(dst, tmp_path / "swin_w7.pth")
    assert missing == [] and unexpected == []
    assert dst.layers[0].blocks[0].attn.relative_position_bias_table.shape == (15 * 15, 1)
