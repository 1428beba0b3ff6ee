"""The seed's ReID recipe with a plain ResNet-50 (last stride 1) instead of ResNet50-IBN-a."""

from configs import ExperimentConfig
from configs.reid_r50ibn import config as reid_r50ibn


def config() -> ExperimentConfig:
    cfg = reid_r50ibn()
    cfg.name = "reid_r50"
    cfg.model.backbone, cfg.model.pretrained_path = "resnet50", "weights/resnet50-0676ba61.pth"
    return cfg
