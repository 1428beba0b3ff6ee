"""Tiny retail retrieval on the embedded sample: the main job's default, CPU minutes.

ResNet-18 (last stride 1) at 64x64 from random init, P x K = 8 x 4, CE + smoothing + triplet + center.
"""

from configs import ExperimentConfig


def config() -> ExperimentConfig:
    cfg = ExperimentConfig(name="retr_demo", trainer="retrieval")
    d = cfg.data
    d.reader, d.root, d.shards = "sample", "data/sample", "data/shards/sample"
    d.height, d.width = 64, 64
    d.sampler, d.batch_size, d.num_instances = "pk", 32, 4
    d.num_workers, d.eval_batch_size = 1, 64
    d.prepare.padding, d.prepare.max_side, d.prepare.shard_size, d.prepare.gallery_views = 0.05, 128, 200, 2
    d.augment.pad, d.augment.color_jitter = 4, 0.2
    cfg.model.backbone, cfg.model.last_stride = "resnet18", 1
    cfg.loss.center_weight = 5e-4
    cfg.optim.name, cfg.optim.lr = "adam", 1e-3
    s = cfg.schedule
    s.epochs, s.warmup_epochs, s.milestones = 4, 1, (3,)
    cfg.eval.protocol, cfg.eval.every = "retail", 2
    cfg.checkpoint.every_steps = 20
    cfg.launch.cpu_tasks = 1
    return cfg
