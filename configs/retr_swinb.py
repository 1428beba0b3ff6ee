"""The seed's retail recipe: Swin-B 224, CE + label smoothing + center loss, class-balanced batches, fp16."""

from configs import ExperimentConfig


def config() -> ExperimentConfig:
    cfg = ExperimentConfig(name="retr_swinb", trainer="retrieval")
    d = cfg.data
    d.reader, d.root, d.shards = "coco", "data/retail", "data/shards/retail"
    d.height, d.width = 224, 224
    d.sampler, d.batch_size, d.num_instances, d.balanced_cap = "balanced", 64, 4, 0
    d.num_workers, d.eval_batch_size = 8, 128
    d.prepare.padding, d.prepare.max_side, d.prepare.gallery_views, d.prepare.workers = 0.05, 448, 4, 8
    d.augment.pad, d.augment.color_jitter, d.augment.erasing_p = 10, 0.2, 0.5
    m = cfg.model
    m.backbone, m.pretrained_path = "swin_base_patch4_window7_224", "weights/swin_base_patch4_window7_224_22k.pth"
    m.neck, m.neck_feat, m.head = "bnneck", "before", "linear"
    cfg.loss.triplet_weight, cfg.loss.center_weight, cfg.loss.label_smoothing = 0.0, 5e-4, 0.1
    cfg.optim.name, cfg.optim.lr, cfg.optim.weight_decay = "adamw", 1e-4, 0.05
    s = cfg.schedule
    s.epochs, s.warmup_epochs, s.kind, s.milestones, s.gamma = 30, 2, "multistep", (15, 25), 0.1
    cfg.train.precision = "fp16"
    cfg.eval.protocol = "retail"
    cfg.checkpoint.every_steps = 500
    cfg.launch.gpus_per_node, cfg.launch.cpus_per_task, cfg.launch.time_min = 8, 10, 24 * 60
    return cfg
