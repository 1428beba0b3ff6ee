# det_demo: det_cascade_swinb shrunk for CPU, trained on the generated retail sample (mmengine config).
#
# `python trainers/detection.py --config det_demo` trains on the sample's query scenes (train split) plus the
# library images and evaluates bbox mAP / AP50 on the held-out query scenes. Only what differs from
# det_cascade_swinb is written here: a tiny Swin, smaller heads and samplers, the sample's data, a short schedule.

_base_ = ["./det_cascade_swinb.py"]

data_root = "data/sample/"
make_sample = True  # trainers/detection.py writes the generated retail sample under data_root when missing
img_scale = (320, 240)

# ---------------------------------------------------------------- model
model = dict(
    backbone=dict(
        embed_dims=32,
        depths=[1, 1, 2, 1],
        num_heads=[1, 2, 4, 8],
        mlp_ratio=2,
        drop_path_rate=0.1,
        convert_weights=False,
    ),
    neck=dict(in_channels=[32, 64, 128, 256], out_channels=64),
    rpn_head=dict(in_channels=64, feat_channels=64),
    roi_head=dict(
        bbox_roi_extractor=dict(out_channels=64),
        bbox_head=[
            dict(
                type="Shared2FCBBoxHead",
                in_channels=64,
                fc_out_channels=128,
                roi_feat_size=7,
                num_classes={{_base_.num_classes}},
                bbox_coder=dict(type="DeltaXYWHBBoxCoder", target_means=[0.0] * 4, target_stds=stds),
                reg_class_agnostic=True,
                loss_cls=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0),
                loss_bbox=dict(type="SmoothL1Loss", beta=1.0, loss_weight=1.0),
            )
            for stds in ([0.1, 0.1, 0.2, 0.2], [0.05, 0.05, 0.1, 0.1], [0.033, 0.033, 0.067, 0.067])
        ],
    ),
    train_cfg=dict(
        rpn=dict(sampler=dict(num=128)),
        rpn_proposal=dict(nms_pre=1000, max_per_img=300),
        rcnn=[
            dict(
                assigner=dict(
                    type="MaxIoUAssigner",
                    pos_iou_thr=iou,
                    neg_iou_thr=iou,
                    min_pos_iou=iou,
                    match_low_quality=False,
                    ignore_iof_thr=-1,
                ),
                sampler=dict(type="RandomSampler", num=128, pos_fraction=0.25, neg_pos_ub=-1, add_gt_as_proposals=True),
                pos_weight=-1,
                debug=False,
            )
            for iou in (0.5, 0.6, 0.7)
        ],
    ),
    test_cfg=dict(rpn=dict(nms_pre=500, max_per_img=300)),
)

# ---------------------------------------------------------------- data
train_pipeline = [
    dict(type="LoadImageFromFile", backend_args=None),
    dict(type="LoadAnnotations", with_bbox=True),
    dict(type="RandomResize", scale=img_scale, ratio_range=(0.8, 1.2), keep_ratio=True),
    dict(type="RandomFlip", prob=0.5),
    dict(type="PackDetInputs"),
]
test_pipeline = [
    dict(type="LoadImageFromFile", backend_args=None),
    dict(type="Resize", scale=img_scale, keep_ratio=True),
    dict(type="LoadAnnotations", with_bbox=True),
    {{_base_.pack_eval_inputs}},
]
train_dataloader = dict(
    num_workers=2,
    dataset=dict(
        datasets=[
            dict(
                type="DetrCocoDataset",
                data_root=data_root,
                ann_file=ann_file,
                data_prefix=dict(img="images/"),
                split=split,
                class_agnostic={{_base_.class_agnostic}},
                filter_cfg=dict(filter_empty_gt=True, min_size=8),
                pipeline=train_pipeline,
                backend_args=None,
            )
            for ann_file, split in (("query.json", "train"), ("gallery.json", None))
        ],
    ),
)
val_dataloader = dict(batch_size=2, dataset=dict(data_root=data_root, pipeline=test_pipeline))
test_dataloader = val_dataloader

# ---------------------------------------------------------------- schedule
max_epochs = 8
train_cfg = dict(max_epochs=max_epochs, val_interval=2)
param_scheduler = [
    dict(type="LinearLR", start_factor=0.01, by_epoch=False, begin=0, end=100),
    dict(type="CosineAnnealingLR", T_max=max_epochs, eta_min_ratio=0.05, by_epoch=True, begin=0, end=max_epochs),
]
optim_wrapper = dict(optimizer=dict(lr=1e-3), clip_grad=dict(_delete_=True, max_norm=10.0, norm_type=2))
auto_scale_lr = dict(base_batch_size=2)

# ---------------------------------------------------------------- runtime
default_hooks = dict(logger=dict(interval=10), checkpoint=dict(max_keep_ckpts=2))
env_cfg = dict(dist_cfg=dict(backend="gloo"))
log_processor = dict(window_size=10)
load_from = None
