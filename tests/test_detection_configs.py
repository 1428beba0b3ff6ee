"""Every detection config (configs/det_*.py) loads with mmengine and builds its model and datasets' settings."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("mmdet")

from trainers import mmcv_ext  # noqa: E402

mmcv_ext.install()  # before mmdet imports mmcv.ops

from mmdet.registry import MODELS  # noqa: E402
from mmdet.structures import DetDataSample  # noqa: E402
from mmdet.utils import register_all_modules  # noqa: E402
from mmengine.config import Config  # noqa: E402
from mmengine.structures import InstanceData  # noqa: E402

from configs import config_kind, config_path, list_configs  # noqa: E402
from trainers import detection  # noqa: E402  (installs mmcv._ext, registers DetrCocoDataset)

register_all_modules()
DET_CONFIGS = [name for name in list_configs() if name.startswith("det_")]


def test_det_configs_are_mmengine_configs():
    assert {"det_demo", "det_cascade_swinb", "det_yolox_s"} <= set(DET_CONFIGS)
    for name in DET_CONFIGS:
        assert config_kind(name) == "mmengine"
        # bases are local files (a package base, mmdet::..., would need pkg_resources)
        text = config_path(name).read_text()
        assert "mmdet::" not in text and '_base_ = ["./' in text, name
    shared = Config.fromfile(str(config_path("det_yolox_s")))
    assert shared.default_hooks["checkpoint"]["save_best"] == "coco/bbox_mAP" and shared.data_root == "data/retail/"
    demo = Config.fromfile(str(config_path("det_demo")))
    assert demo.val_dataloader["dataset"]["data_root"] == demo.data_root == "data/sample/"
    assert demo.model.backbone.embed_dims == 32 and demo.model.backbone.depths == [1, 1, 2, 1]


@pytest.mark.parametrize("name", DET_CONFIGS)
def test_det_config_builds(name):
    cfg = Config.fromfile(str(config_path(name)))
    model = MODELS.build(cfg.model)
    assert sum(p.numel() for p in model.parameters()) > 0
    assert cfg.val_evaluator["type"] == "CocoMetric" and cfg.val_evaluator["metric"] == "bbox"
    assert cfg.default_hooks["checkpoint"]["save_best"] == "coco/bbox_mAP"
    assert any(b["type"] == "TensorboardVisBackend" for b in cfg.visualizer["vis_backends"])
    datasets = list(detection._datasets(cfg.train_dataloader["dataset"]))
    assert {d["ann_file"] for d in datasets} == {"query.json", "gallery.json"}  # the seed trains on both


def test_cascade_swinb_is_the_seeds_detector():
    cfg = Config.fromfile(str(config_path("det_cascade_swinb")))
    bb = cfg.model.backbone
    assert (bb.type, bb.embed_dims, bb.depths, bb.num_heads, bb.window_size) == (
        "SwinTransformer",
        128,
        [2, 2, 18, 2],
        [4, 8, 16, 32],
        7,
    )
    assert cfg.model.type == "CascadeRCNN" and cfg.model.neck.type == "FPN"
    assert cfg.optim_wrapper.optimizer.type == "AdamW"
    model = MODELS.build(cfg.model)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    assert 125 < params < 140, params  # about 132 M


def test_class_mode_setting_reaches_datasets_and_heads(tmp_path):
    import json

    cats = [{"id": 3, "name": "cola"}, {"id": 7, "name": "chips"}]
    for ann in ("query.json", "gallery.json"):
        (tmp_path / ann).write_text(json.dumps({"images": [], "annotations": [], "categories": cats}))
    for name in DET_CONFIGS:
        cfg = detection.load_det_config(name, {"data_root": str(tmp_path), "class_agnostic": False})
        cfg.pop("make_sample", None)
        assert detection.resolve_data(cfg) == ["cola", "chips"]
        heads = cfg.model.get("roi_head", {}).get("bbox_head") or [cfg.model.bbox_head]
        assert all(h["num_classes"] == 2 for h in heads)
        for ds in detection._datasets(cfg.train_dataloader["dataset"]):
            assert ds["class_agnostic"] is False and ds["data_root"].startswith(str(tmp_path))
        cfg = detection.load_det_config(name, {"data_root": str(tmp_path), "class_agnostic": True})
        cfg.pop("make_sample", None)
        assert detection.resolve_data(cfg) == ["object"]


def test_dataclass_loader_refuses_det_configs():
    from configs import load_config

    with pytest.raises(ValueError, match="mmengine config"):
        load_config("det_demo")
    with pytest.raises(ValueError, match="unknown config"):
        detection.load_det_config("det_nope")


@pytest.mark.slow
def test_cascade_swinb_forward_backward_cpu():
    cfg = Config.fromfile(str(config_path("det_cascade_swinb")))
    cfg.model.roi_head.bbox_head = [dict(h, num_classes=3) for h in cfg.model.roi_head.bbox_head]
    model = MODELS.build(cfg.model)
    model.init_weights()
    model.train()
    h, w = 320, 416
    sample = DetDataSample(metainfo=dict(img_shape=(h, w), ori_shape=(h, w), pad_shape=(h, w), scale_factor=(1.0, 1.0)))
    gt = InstanceData()
    gt.bboxes = torch.tensor([[10.0, 20.0, 120.0, 200.0], [200.0, 50.0, 380.0, 300.0]])
    gt.labels = torch.tensor([0, 2])
    sample.gt_instances = gt
    data = model.data_preprocessor(
        {"inputs": [torch.randint(0, 255, (3, h, w), dtype=torch.uint8)], "data_samples": [sample]}, True
    )
    losses = model(**data, mode="loss")
    loss, _ = model.parse_losses(losses)
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in model.backbone.parameters() if p.requires_grad]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


@pytest.fixture(scope="module")
def sample_root(tmp_path_factory):
    from datasets.sample import ensure_sample

    return ensure_sample(tmp_path_factory.mktemp("sample") / "retail")


@pytest.mark.parametrize("name", DET_CONFIGS)
def test_det_config_pipelines_run_on_the_sample(name, sample_root):
    from mmdet.registry import DATASETS

    cfg = detection.load_det_config(name, {"data_root": str(sample_root)})
    assert detection.resolve_data(cfg) == ["object"]  # class-agnostic by default
    train = DATASETS.build(cfg.train_dataloader.dataset)
    item = train[0]
    assert item["inputs"].ndim == 3 and len(item["data_samples"].gt_instances) > 0
    val = DATASETS.build(cfg.val_dataloader.dataset)
    assert len(val) == 20 and "instances" in val[0]["data_samples"].metainfo  # CocoMetric's ground truth


@pytest.mark.slow
def test_yolox_s_train_step_on_the_sample(sample_root):
    from mmdet.registry import DATASETS
    from mmengine.dataset import pseudo_collate
    from mmengine.logging import MessageHub

    cfg = detection.load_det_config("det_yolox_s", {"data_root": str(sample_root)})
    detection.resolve_data(cfg)
    train = DATASETS.build(cfg.train_dataloader.dataset)
    model = MODELS.build(cfg.model)
    model.train()
    MessageHub.get_current_instance().update_info("iter", 0)  # YOLOX's batch resize reads the iteration
    data = model.data_preprocessor(pseudo_collate([train[0], train[1]]), True)
    loss, _ = model.parse_losses(model(**data, mode="loss"))
    loss.backward()
    assert torch.isfinite(loss)
