"""Distillation on the embedded sample, CPU minutes: the retr_demo teacher (ResNet-18, 64x64) into a ResNet-10-T
student at 48x48 (its batches are resized for the teacher on the device).

First train the teacher: ``accelerate launch -q trainers/retrieval.py --config retr_demo``; the newest
``runs/retr_demo/*/mAP*.pth`` and the config.json beside it are the teacher.
"""

from configs import ExperimentConfig
from configs.retr_demo import config as retr_demo


def config() -> ExperimentConfig:
    cfg = retr_demo()
    cfg.name, cfg.trainer = "distill_demo", "distill"
    cfg.data.height, cfg.data.width = 48, 48
    cfg.model.backbone = "resnet10t"
    k = cfg.distill
    k.teacher_checkpoint, k.teacher_config = "runs/retr_demo/*/mAP*.pth", ""
    k.temperature, k.kl_weight, k.embed_weight, k.relation_weight = 4.0, 1.0, 1.0, 1.0
    k.embed_loss, k.projection, k.relation = "cosine", "auto", "similarity"
    return cfg
