# What every detection config shares (mmengine config; a local `_base_`, so no package lookup is involved).
#
# The data contract: the retail COCO layout, data_root/query.json scenes + data_root/gallery.json library images,
# images under data_root/images/; training reads both, evaluation the held-out query scenes (bbox mAP / AP50).
# trainers/detection.py copies the top-level `data_root` and `class_agnostic` into every dataset and sets every
# head's `num_classes` from the data, so `--cfg-options data_root=data/other/ class_agnostic=False` changes them all.

default_scope = "mmdet"
custom_imports = dict(imports=["trainers.detection_data"], allow_failed_imports=False)

data_root = "data/retail/"
class_agnostic = True  # one "object" class (retrieval assigns the product / identity); False = per category
num_classes = 1  # replaced from the annotation files by trainers/detection.py
backend_args = None

# "instances" carries the ground truth to CocoMetric (ann_file=None builds the COCO ground truth from it)
pack_eval_inputs = dict(
    type="PackDetInputs", meta_keys=("img_id", "img_path", "ori_shape", "img_shape", "scale_factor", "instances")
)
val_evaluator = dict(type="CocoMetric", ann_file=None, metric="bbox", format_only=False, backend_args=backend_args)
test_evaluator = val_evaluator
val_cfg = dict(type="ValLoop")
test_cfg = dict(type="TestLoop")

default_hooks = dict(
    timer=dict(type="IterTimerHook"),
    logger=dict(type="LoggerHook", interval=50),
    param_scheduler=dict(type="ParamSchedulerHook"),
    checkpoint=dict(type="CheckpointHook", interval=1, max_keep_ckpts=3, save_best="coco/bbox_mAP", rule="greater"),
    sampler_seed=dict(type="DistSamplerSeedHook"),
    visualization=dict(type="DetVisualizationHook"),
)
env_cfg = dict(
    cudnn_benchmark=False, mp_cfg=dict(mp_start_method="fork", opencv_num_threads=0), dist_cfg=dict(backend="nccl")
)
vis_backends = [dict(type="LocalVisBackend"), dict(type="TensorboardVisBackend")]
visualizer = dict(type="DetLocalVisualizer", vis_backends=vis_backends, name="visualizer")
log_processor = dict(type="LogProcessor", window_size=50, by_epoch=True)
log_level = "INFO"
load_from = None
resume = False
randomness = dict(seed=0)

# the held-out query scenes; each config sets the batch size and its own test pipeline (for both loaders)
val_dataloader = dict(
    batch_size=1,
    num_workers=2,
    persistent_workers=True,
    drop_last=False,
    sampler=dict(type="DefaultSampler", shuffle=False),
    dataset=dict(
        type="DetrCocoDataset",
        data_root=data_root,
        ann_file="query.json",
        data_prefix=dict(img="images/"),
        split="test",
        class_agnostic=class_agnostic,
        test_mode=True,
        pipeline=[],
        backend_args=backend_args,
    ),
)
test_dataloader = val_dataloader
