"""Typed dataclass tree that every experiment config builds (see DESIGN, "Configuration contract").

Each section validates itself in ``__post_init__``; ``configs.load_config`` re-runs the validation
after command-line overrides, so a bad value is reported with its dotted key.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from configs._ranges import check_ranges, check_tree
from datasets.readers import READERS
from datasets.samplers import SAMPLERS
from inference.aggregate import POOLINGS
from inference.heads import HEADS
from trainers.registry import TRAINERS


def _choice(key: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{key}={value!r} is not valid; choose one of {sorted(allowed)}")


LR_SCALINGS = ("none", "linear", "sqrt")


@dataclass
class PrepareConfig:
    """How raw records are cropped into shards (``python -m datasets.prepare``)."""

    padding: float = 0.0
    """context padding around each box, as a fraction of the box side"""
    min_size: int = 8
    """boxes with a side smaller than this (pixels) are skipped and counted"""
    max_side: int = 512
    """crops are downscaled so their longer side is at most this (0 = keep)"""
    quality: int = 95
    """JPEG quality of the stored crops"""
    shard_size: int = 1000
    """samples per tar shard"""
    gallery_views: int = 0
    """extra augmented views written per gallery sample (the seed's enlarged feature bank)"""
    workers: int = 2
    """parallel crop workers"""
    skip_bad: bool = True
    """skip (and count, report, record in the manifest) unreadable images instead of failing"""

    def __post_init__(self) -> None:
        check_ranges(self)


@dataclass
class AugmentConfig:
    """Training augmentation (the reid-strong-baseline set)."""

    flip_p: float = 0.5
    """horizontal flip probability"""
    pad: int = 10
    """zero padding before the random crop back to the input size (pixels; 0 = off)"""
    erasing_p: float = 0.5
    """random erasing probability"""
    color_jitter: float = 0.0
    """brightness/contrast/saturation jitter strength (0 = off)"""
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    """normalisation mean"""
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    """normalisation std"""

    def __post_init__(self) -> None:
        check_ranges(self)


@dataclass
class DataConfig:
    """Where the data comes from, how it is sharded and how it is streamed."""

    reader: str = "sample"
    """record reader: a key of datasets.readers.READERS"""
    root: str = "data/sample"
    """dataset root for the reader (for ``sample``: where the generated set is written)"""
    shards: str = "data/shards/sample"
    """folder of tar shards + manifest.json made by datasets.prepare"""
    shards_wait_s: float = 3600.0
    """training and evaluation started while a datasets.prepare still writes data.shards wait this many seconds
    for it to finish (logging the folder and the writer every 30 s), then stop with an error (0 = at once)"""
    train_split: str = "train"
    """split used for training"""
    query_split: str = "query"
    """split used as evaluation queries"""
    gallery_split: str = "gallery"
    """split used as the evaluation gallery"""
    height: int = 128
    """network input height"""
    width: int = 128
    """network input width"""
    sampler: str = "pk"
    """batch composition, a key of datasets.samplers.SAMPLERS: pk (P identities x K samples), balanced
    (under-sample big classes), random"""
    batch_size: int = 32
    """global batch per optimizer step across all ranks (a micro-batch = batch_size / (world size x grad_accum))"""
    num_instances: int = 4
    """K: samples per identity in a P x K batch"""
    balanced_cap: int = 0
    """balanced sampler: most samples taken per class per epoch (0 = the median class count)"""
    num_workers: int = 2
    """data loader workers per rank (they persist across epochs)"""
    cache_mb: int = 0
    """per worker: an LRU of recently read samples' bytes, in MiB (0 = none: the OS page cache keeps hot shards)"""
    eval_batch_size: int = 64
    """batch size of the evaluation stream"""
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    """shard preparation settings"""
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    """training augmentation"""

    def __post_init__(self) -> None:
        check_ranges(self)
        _choice("data.reader", self.reader, READERS)
        _choice("data.sampler", self.sampler, SAMPLERS)
        if self.sampler == "pk" and self.batch_size % self.num_instances:
            raise ValueError(
                f"data.batch_size={self.batch_size} must be a multiple of data.num_instances={self.num_instances} "
                "for P x K batches"
            )


@dataclass
class ModelConfig:
    """Backbone, neck and head of the retrieval model."""

    backbone: str = "resnet18"
    """timm model name, or resnet50_ibn_a / resnet101_ibn_a"""
    pretrained_path: str = ""
    """local weights file (official Swin, torchvision/timm ResNet or IBN-Net layout); empty = random init"""
    pretrained: bool = False
    """download weights through timm's hub (needs network access)"""
    last_stride: int = 1
    """stride of the last ResNet stage (1 = the ReID recipe)"""
    pooling: str = "avg"
    """global pooling: a key of inference.aggregate.POOLINGS"""
    gem_p: float = 3.0
    """initial GeM exponent"""
    embed_dim: int = 0
    """optional linear embedding size after pooling (0 = backbone width)"""
    neck: str = "bnneck"
    """bnneck or none"""
    neck_feat: str = "after"
    """inference embedding: before or after the BNNeck"""
    head: str = "linear"
    """classifier: a key of inference.heads.HEADS"""
    scale: float = 30.0
    """cosine classifier scale"""
    margin: float = 0.35
    """cosine classifier margin"""
    drop_path: float = 0.0
    """stochastic depth rate for timm backbones that support it"""

    def __post_init__(self) -> None:
        _choice("model.pooling", self.pooling, POOLINGS)
        _choice("model.neck", self.neck, ("bnneck", "none"))
        _choice("model.neck_feat", self.neck_feat, ("before", "after"))
        _choice("model.head", self.head, HEADS)
        _choice("model.last_stride", self.last_stride, (1, 2))
        check_ranges(self)


@dataclass
class LossConfig:
    """Weighted sum of losses."""

    ce_weight: float = 1.0
    """cross-entropy (or margin-softmax) weight"""
    label_smoothing: float = 0.1
    """label smoothing epsilon"""
    triplet_weight: float = 1.0
    """batch-hard triplet weight (0 = off)"""
    triplet_margin: float = 0.3
    """triplet margin; 0 = soft margin"""
    triplet_all_ranks: bool = False
    """mine triplets over embeddings gathered from all ranks"""
    center_weight: float = 0.0
    """center loss weight (strong baseline: 5e-4)"""
    center_lr: float = 0.5
    """center loss optimizer learning rate"""
    max_nan_steps: int = 5
    """stop with an error after this many non-finite losses in a row (each one is skipped)"""

    def __post_init__(self) -> None:
        check_ranges(self)


@dataclass
class OptimConfig:
    """Optimizer."""

    name: str = "adam"
    """sgd, adam or adamw"""
    lr: float = 3.5e-4
    """base learning rate"""
    weight_decay: float = 5e-4
    """weight decay (not applied to norms and biases)"""
    momentum: float = 0.9
    """SGD momentum"""
    head_lr_mult: float = 1.0
    """learning-rate multiplier of the neck/head relative to the backbone"""
    clip_grad: float = 0.0
    """max gradient norm (0 = off)"""
    grad_accum: int = 1
    """gradient accumulation steps"""
    lr_scaling: str = "none"
    """none, linear or sqrt: scale optim.lr by (global batch / optim.reference_batch) or its square root"""
    reference_batch: int = 0
    """the global batch (data.batch_size) optim.lr was tuned for; needed when optim.lr_scaling is not none"""

    def __post_init__(self) -> None:
        _choice("optim.name", self.name, ("sgd", "adam", "adamw"))
        _choice("optim.lr_scaling", self.lr_scaling, LR_SCALINGS)
        check_ranges(self)
        if self.lr_scaling != "none" and self.reference_batch == 0:
            raise ValueError(
                f"optim.lr_scaling={self.lr_scaling} scales optim.lr relative to optim.reference_batch: set it to "
                "the global batch optim.lr was tuned for (e.g. optim.reference_batch=64)"
            )


@dataclass
class ScheduleConfig:
    """Epochs and learning-rate schedule (per iteration, with linear warmup)."""

    epochs: int = 120
    """training epochs"""
    iters_per_epoch: int = 0
    """optimizer steps per epoch (0 = derived from the training split and the batch size)"""
    warmup_epochs: int = 10
    """linear warmup length"""
    warmup_factor: float = 0.01
    """lr multiplier at the first warmup step"""
    kind: str = "multistep"
    """multistep or cosine"""
    milestones: tuple[int, ...] = (40, 70)
    """multistep: epochs where the lr is multiplied by gamma"""
    gamma: float = 0.1
    """multistep decay factor"""
    min_lr_ratio: float = 0.0
    """cosine: final lr as a fraction of the base lr"""

    def __post_init__(self) -> None:
        check_ranges(self)
        _choice("schedule.kind", self.kind, ("multistep", "cosine"))
        if list(self.milestones) != sorted(self.milestones):
            raise ValueError(f"schedule.milestones={self.milestones} must be increasing")


@dataclass
class TrainConfig:
    """Run-wide training settings."""

    seed: int = 0
    """random seed"""
    precision: str = "no"
    """mixed precision: no, fp16 or bf16 (through Accelerate)"""
    compile: bool = False
    """torch.compile the model"""
    channels_last: bool = False
    """channels-last memory format"""
    sync_bn: bool = False
    """convert BatchNorm to SyncBatchNorm under DDP"""
    log_every: int = 10
    """iterations between log lines"""
    deepspeed_config: str = ""
    """DeepSpeed JSON (configs/deepspeed/*.json); empty = plain DDP"""
    dist_timeout_s: int = 600
    """seconds a collective waits for the other processes before failing (a stopped or lost rank)"""
    record_batches: bool = False
    """write each micro-batch's sample keys to RUN/batches/ (trainers/batch_record.py): which samples each step
    trained on, to check a resume on another number of processes"""
    threads: int = 0
    """torch intra-op threads per process (0 = the cores this process may use, shared by the processes of the
    node, less its data loader workers; OMP_NUM_THREADS, when set, wins)"""

    def __post_init__(self) -> None:
        _choice("train.precision", self.precision, ("no", "fp16", "bf16"))
        check_ranges(self)


@dataclass
class EvalConfig:
    """Evaluation during and after training."""

    every: int = 1
    """evaluate every N epochs (0 = only at the end)"""
    enabled: bool = True
    """evaluate during and after training (false = train only, e.g. without query/gallery shards)"""
    protocol: str = "reid"
    """reid (Market-1501 camera rule) or retail (no camera rule)"""
    flip: bool = False
    """average embeddings of the image and its horizontal flip"""
    rerank: bool = False
    """k-reciprocal re-ranking before the metrics"""
    normalize: bool = True
    """L2-normalise embeddings before ranking"""

    def __post_init__(self) -> None:
        check_ranges(self)
        _choice("eval.protocol", self.protocol, ("reid", "retail"))


@dataclass
class CheckpointConfig:
    """Resumable state and best weights."""

    every_steps: int = 200
    """write resumable state every N optimizer steps (and at the end of each epoch)"""
    keep_last: int = 2
    """resumable states kept"""

    def __post_init__(self) -> None:
        check_ranges(self)


@dataclass
class LaunchConfig:
    """Resources and SLURM settings for launch/slurm.py."""

    cluster: str = "auto"
    """auto (SLURM when sbatch is on PATH), slurm or local"""
    nodes: int = 1
    """nodes"""
    gpus_per_node: int = 0
    """GPUs per node (one task each); 0 = CPU"""
    cpu_tasks: int = 1
    """tasks per node when running on CPU"""
    cpus_per_task: int = 2
    """CPUs per task"""
    mem_gb: int = 0
    """memory per node in GB (0 = SLURM default)"""
    partition: str = ""
    """SLURM partition"""
    account: str = ""
    """SLURM account"""
    qos: str = ""
    """SLURM QOS"""
    time_min: int = 60
    """time limit in minutes"""
    constraint: str = ""
    """SLURM constraint"""
    extra_sbatch: tuple[str, ...] = ()
    """extra #SBATCH lines, e.g. ("--exclusive",)"""
    signal_delay_s: int = 120
    """seconds before the time limit when SIGUSR2 is sent"""
    requeue_on_failure: int = 0
    """times a job that lost a rank or node is requeued to resume from its last state (SLURM)"""
    min_nodes: int = 0
    """fewest nodes the job (also when requeued) accepts; 0 = launch.nodes, all of them"""
    network_interface: str = ""
    """interface the ranks talk over (NCCL_SOCKET_IFNAME and GLOO_SOCKET_IFNAME), e.g. ib0; empty = auto"""
    env: tuple[str, ...] = ()
    """extra environment of every task, e.g. ("NCCL_IB_HCA=mlx5", "NCCL_DEBUG=WARN")"""

    def __post_init__(self) -> None:
        _choice("launch.cluster", self.cluster, ("auto", "slurm", "local"))
        check_ranges(self)
        if self.min_nodes > self.nodes:
            raise ValueError(f"launch.min_nodes={self.min_nodes} must be <= launch.nodes={self.nodes}")
        for item in self.env:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", item):
                raise ValueError(f"launch.env entry {item!r} must look like NAME=value")
        if self.network_interface and not re.fullmatch(r"[\w.^,-]+", self.network_interface):
            raise ValueError(f"launch.network_interface={self.network_interface!r} is not an interface name")


DISTILL_PROJECTIONS = ("auto", "linear", "none")
DISTILL_CACHE = ("off", "use", "build")


@dataclass
class DistillConfig:
    """Knowledge distillation from a trained retrieval teacher (``trainer="distill"``)."""

    teacher_checkpoint: str = ""
    """the teacher's trained weights: an ``mAPxx.x.pth`` or a resumable state (a glob takes the newest match)"""
    teacher_config: str = ""
    """the teacher's config (model, input size, mean/std): a config name, a config.json, or empty = the
    config.json of the checkpoint's run directory"""
    temperature: float = 4.0
    """softmax temperature of the logit terms (scaled back by T^2)"""
    kl_weight: float = 1.0
    """weight of KL(teacher || student) on the softened logits (0 = off)"""
    js_weight: float = 0.0
    """weight of the Jensen-Shannon divergence on the softened logits (0 = off)"""
    embed_weight: float = 0.0
    """weight of the embedding term between the student's and the teacher's retrieval embeddings (the
    ``embedding`` that search ranks: after the BNNeck unless model.neck_feat=before) (0 = off)"""
    embed_loss: str = "cosine"
    """embedding term: mse or cosine"""
    projection: str = "auto"
    """student -> teacher embedding projection: auto (linear when the sizes differ), linear, none"""
    relation_weight: float = 0.0
    """weight of the relational term on the pairwise structure of the batch's retrieval embeddings (0 = off)"""
    relation: str = "similarity"
    """relational term: similarity (cosine-similarity matrices) or distance (mean-normalised distances)"""
    cache: str = "off"
    """teacher outputs: off (run the teacher live), use (read the cache, build it if missing), build (rebuild)"""
    cache_dir: str = ""
    """teacher cache folder (empty = <data.shards>/teacher_cache/<recipe fingerprint>)"""
    cache_check_batches: int = 2
    """micro-batches per rank compared with the live teacher before trusting the cache (0 = no check)"""
    cache_dtype: str = "float16"
    """dtype the cache stores: float16 or float32"""
    cache_tolerance: float = 0.02
    """largest |cached - live| relative to the live outputs' scale that the check accepts"""

    def __post_init__(self) -> None:
        _choice("distill.embed_loss", self.embed_loss, ("mse", "cosine"))
        _choice("distill.projection", self.projection, DISTILL_PROJECTIONS)
        _choice("distill.relation", self.relation, ("similarity", "distance"))
        _choice("distill.cache", self.cache, DISTILL_CACHE)
        _choice("distill.cache_dtype", self.cache_dtype, ("float16", "float32"))
        check_ranges(self)

    def check_for_training(self) -> None:
        """What a distillation run needs beyond valid values: a teacher and at least one term."""
        if not self.teacher_checkpoint:
            raise ValueError(
                "trainer='distill' needs distill.teacher_checkpoint (the teacher's mAPxx.x.pth or state file)"
            )
        if not any((self.kl_weight, self.js_weight, self.embed_weight, self.relation_weight)):
            raise ValueError(
                "trainer='distill' with every distillation weight 0 (distill.kl_weight, distill.js_weight, "
                "distill.embed_weight, distill.relation_weight): use trainer='retrieval' instead"
            )


@dataclass
class ExperimentConfig:
    """One experiment: what trains, on what, how, and where its outputs go."""

    name: str = "experiment"
    """experiment name (runs/NAME/...)"""
    trainer: str = "retrieval"
    """what trains it: a key of trainers.registry.TRAINERS (detection configs are mmengine configs)"""
    output_dir: str = "runs"
    """root of the run directories"""
    data: DataConfig = field(default_factory=DataConfig)
    """data"""
    model: ModelConfig = field(default_factory=ModelConfig)
    """model"""
    loss: LossConfig = field(default_factory=LossConfig)
    """losses"""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """optimizer"""
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    """learning-rate schedule"""
    train: TrainConfig = field(default_factory=TrainConfig)
    """training run"""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """evaluation"""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """checkpoints"""
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    """launcher"""
    distill: DistillConfig = field(default_factory=DistillConfig)
    """knowledge distillation (read by trainer="distill" only)"""

    def __post_init__(self) -> None:
        _choice("trainer", self.trainer, TRAINERS)
        check_tree(self)  # every numeric field of every section, by its dotted key (configs/_ranges.py)
