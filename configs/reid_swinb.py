"""A Swin-B ReID teacher on Market-1501 at its own 224x224 input: the seed's ReID recipe with the Swin-B backbone
of the retail recipe (AdamW, fp16), for distillation into ResNet50-IBN-a (``distill_swinb_r50ibn``)."""

from configs import ExperimentConfig
from configs.reid_r50ibn import config as reid_r50ibn


def config() -> ExperimentConfig:
    cfg = reid_r50ibn()
    cfg.name = "reid_swinb"
    cfg.data.height, cfg.data.width = 224, 224
    m = cfg.model
    m.backbone, m.pretrained_path = "swin_base_patch4_window7_224", "weights/swin_base_patch4_window7_224_22k.pth"
    m.last_stride, m.neck_feat = 2, "before"
    cfg.optim.name, cfg.optim.lr, cfg.optim.weight_decay = "adamw", 1e-4, 0.05
    cfg.train.precision = "fp16"
    return cfg
