"""ReID on the real mars_mini set (../shared/data) from random init on CPU: a small P x K triplet + CE run.

For Market-1501-style trees (e.g. market1501_mini) use ``data.reader=market1501 data.root=...``.
"""

from configs import ExperimentConfig
from configs.reid_r50ibn import config as reid_r50ibn


def config() -> ExperimentConfig:
    cfg = reid_r50ibn()
    cfg.name = "reid_demo"
    d = cfg.data
    d.reader, d.root, d.shards = "mars", "../shared/data/mars_mini", "data/shards/mars_mini"
    d.height, d.width = 64, 32
    d.batch_size, d.num_instances, d.num_workers, d.eval_batch_size = 32, 4, 1, 128
    d.prepare.max_side, d.prepare.workers, d.prepare.shard_size = 128, 2, 500
    d.augment.pad = 4
    m = cfg.model
    m.backbone, m.pretrained_path, m.last_stride = "resnet18", "", 1
    cfg.optim.lr = 1e-3
    s = cfg.schedule
    s.epochs, s.warmup_epochs, s.milestones, s.iters_per_epoch = 6, 1, (4,), 0
    cfg.eval.every = 3
    cfg.checkpoint.every_steps = 50
    cfg.launch.gpus_per_node, cfg.launch.cpus_per_task = 0, 2
    return cfg
