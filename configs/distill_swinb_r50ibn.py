"""The mission's distillation: the Swin-B ReID teacher (``reid_swinb``, 224x224) into ResNet50-IBN-a at the
student's own recipe (``reid_r50ibn``: 256x128, P x K = 16 x 4, CE + triplet + center), plus softened-logit KL,
embedding cosine through a learned 768 -> 2048 projection, and the batch's similarity structure."""

from configs import ExperimentConfig
from configs.reid_r50ibn import config as reid_r50ibn


def config() -> ExperimentConfig:
    cfg = reid_r50ibn()
    cfg.name, cfg.trainer = "distill_swinb_r50ibn", "distill"
    k = cfg.distill
    k.teacher_checkpoint, k.teacher_config = "runs/reid_swinb/*/mAP*.pth", ""
    k.temperature, k.kl_weight, k.embed_weight, k.relation_weight = 4.0, 1.0, 1.0, 1.0
    k.embed_loss, k.projection, k.relation = "cosine", "auto", "similarity"
    k.cache = "off"  # the teacher runs live; distill.cache=use reads (and first builds) the teacher cache
    return cfg
