"""The seed's ReID recipe on Market-1501: ResNet50-IBN-a, 256x128, P x K = 16 x 4, triplet + CE + center."""

from configs import ExperimentConfig


def config() -> ExperimentConfig:
    cfg = ExperimentConfig(name="reid_r50ibn", trainer="retrieval")
    d = cfg.data
    d.reader, d.root, d.shards = "market1501", "data/Market-1501-v15.09.15", "data/shards/market1501"
    d.train_split, d.query_split, d.gallery_split = "train", "query", "gallery"
    d.height, d.width = 256, 128
    d.sampler, d.batch_size, d.num_instances = "pk", 64, 4
    d.num_workers, d.eval_batch_size = 8, 256
    d.prepare.max_side, d.prepare.workers = 0, 8
    d.augment.pad, d.augment.erasing_p, d.augment.flip_p = 10, 0.5, 0.5
    m = cfg.model
    m.backbone, m.pretrained_path, m.last_stride = "resnet50_ibn_a", "weights/r50_ibn_a.pth", 1
    m.neck, m.neck_feat = "bnneck", "after"
    cfg.loss.triplet_weight, cfg.loss.triplet_margin, cfg.loss.center_weight = 1.0, 0.3, 5e-4
    cfg.optim.name, cfg.optim.lr, cfg.optim.weight_decay = "adam", 3.5e-4, 5e-4
    s = cfg.schedule
    s.epochs, s.warmup_epochs, s.milestones, s.gamma = 120, 10, (40, 70), 0.1
    cfg.eval.protocol, cfg.eval.every = "reid", 10
    cfg.launch.gpus_per_node, cfg.launch.cpus_per_task = 1, 8
    return cfg
