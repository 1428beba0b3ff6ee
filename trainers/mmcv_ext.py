"""Our ``mmcv._ext``: the compiled ops Cascade R-CNN needs (nms, RoIAlign), on torchvision's CPU/CUDA kernels.

mmcv-lite ships no compiled ops; ``install()`` registers this module as ``mmcv._ext`` before anything
imports ``mmcv.ops``. Every other op name resolves to a function that raises NotImplementedError naming
the op and the config setting that needs it.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
import types

import torch
import torchvision  # noqa: F401  (registers torch.ops.torchvision.*)

log = logging.getLogger(__name__)

PROVIDED = ("nms", "roi_align_forward", "roi_align_backward")

# Which config setting pulls in an op we do not provide (the hint in the NotImplementedError).
_NEEDED_BY = {
    "softnms": "test_cfg ... nms=dict(type='soft_nms'); use nms=dict(type='nms')",
    "nms_match": "an nms_match post-processing step",
    "nms_rotated": "a rotated-box detector (mmrotate)",
    "nms_quadri": "a quadrilateral-box detector",
    "roi_pool_forward": "roi_layer=dict(type='RoIPool'); use type='RoIAlign'",
    "deform_conv_forward": "a DCN setting (backbone dcn=... or conv_cfg=dict(type='DCN'))",
    "modulated_deform_conv_forward": "a DCNv2 setting (dcn=dict(type='DCNv2') or conv_cfg=dict(type='DCNv2'))",
    "deform_roi_pool_forward": "roi_layer=dict(type='DeformRoIPoolPack' / 'ModulatedDeformRoIPoolPack')",
    "sigmoid_focal_loss_forward": "loss_cls=dict(type='FocalLoss') on CUDA (mmdet falls back to PyTorch on CPU)",
    "softmax_focal_loss_forward": "a softmax focal loss",
    "ms_deform_attn_forward": "MultiScaleDeformableAttention on CUDA (Deformable DETR / DINO)",
    "sync_bn_forward_mean": "norm_cfg=dict(type='SyncBN'); use type='BN' (or GN)",
    "carafe_forward": "an FPN with upsample_cfg=dict(type='carafe')",
    "masked_im2col_forward": "MaskedConv2d",
    "bbox_overlaps": "mmcv.ops.bbox_overlaps (mmdet's own BboxOverlaps2D needs no compiled op)",
    "get_compiler_version": "mmcv's environment report (there is no compiled mmcv here)",
    "get_compiling_cuda_version": "mmcv's environment report (there is no compiled mmcv here)",
}


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float, offset: int = 0) -> torch.Tensor:
    """Indices kept by greedy NMS, highest score first; ``offset=1`` counts box sides as ``x2 - x1 + 1``."""
    if offset not in (0, 1):
        raise ValueError(f"nms offset must be 0 or 1, got {offset}")
    if boxes.numel() == 0:
        return boxes.new_zeros(0, dtype=torch.long)
    if offset:
        # (x2 + 1) - x1 is mmcv's legacy side length; shifting x2/y2 makes torchvision compute it.
        boxes = torch.cat([boxes[:, :2], boxes[:, 2:] + offset], dim=1)
    return torchvision.ops.nms(boxes, scores.to(boxes.dtype), float(iou_threshold))


def _check_pool_mode(pool_mode: int) -> None:
    if pool_mode != 1:
        raise NotImplementedError(
            "mmcv._ext.roi_align with pool_mode='max' is not provided (torchvision's RoIAlign averages); "
            "needed by roi_layer=dict(type='RoIAlign', pool_mode='max'); use pool_mode='avg'"
        )


def roi_align_forward(
    input: torch.Tensor,
    rois: torch.Tensor,
    output: torch.Tensor,
    argmax_y: torch.Tensor,
    argmax_x: torch.Tensor,
    aligned_height: int,
    aligned_width: int,
    spatial_scale: float,
    sampling_ratio: int,
    pool_mode: int,
    aligned: bool,
) -> None:
    """mmcv's in-place RoIAlign forward (rois are ``[batch_index, x1, y1, x2, y2]``): fills ``output``."""
    _check_pool_mode(pool_mode)
    result = torch.ops.torchvision.roi_align(
        input, rois.to(input.dtype), spatial_scale, aligned_height, aligned_width, sampling_ratio, aligned
    )
    output.copy_(result)


def roi_align_backward(
    grad_output: torch.Tensor,
    rois: torch.Tensor,
    argmax_y: torch.Tensor,
    argmax_x: torch.Tensor,
    grad_input: torch.Tensor,
    aligned_height: int,
    aligned_width: int,
    spatial_scale: float,
    sampling_ratio: int,
    pool_mode: int,
    aligned: bool,
) -> None:
    """mmcv's in-place RoIAlign backward: fills ``grad_input`` (shape of the forward input)."""
    _check_pool_mode(pool_mode)
    batch, channels, height, width = grad_input.shape
    result = torch.ops.torchvision._roi_align_backward(
        grad_output,
        rois.to(grad_output.dtype),
        spatial_scale,
        aligned_height,
        aligned_width,
        batch,
        channels,
        height,
        width,
        sampling_ratio,
        aligned,
    )
    grad_input.copy_(result)


def _missing(name: str):
    hint = _NEEDED_BY.get(name, "a config that uses an mmcv op other than nms / RoIAlign")

    def missing_op(*args, **kwargs):
        raise NotImplementedError(
            f"mmcv op {name!r} is not available: mmcv-lite has no compiled ops and trainers/mmcv_ext.py provides "
            f"only {', '.join(PROVIDED)}. It is needed by {hint}."
        )

    missing_op.__name__ = name
    return missing_op


def __getattr__(name: str):
    # mmcv.ops modules check ``hasattr(ext, op)`` for every op at import; missing ones fail only when called.
    if name.startswith("__"):
        raise AttributeError(name)
    return _missing(name)


def install() -> types.ModuleType:
    """Register this module as ``mmcv._ext`` unless a compiled mmcv provides one; returns the module in use."""
    if "mmcv._ext" in sys.modules:
        return sys.modules["mmcv._ext"]
    import mmcv

    if importlib.util.find_spec("mmcv._ext") is not None:
        log.info("using the compiled mmcv._ext of %s", mmcv.__file__)
        return importlib.import_module("mmcv._ext")
    if "mmcv.ops" in sys.modules:
        raise RuntimeError("mmcv.ops was imported before trainers.mmcv_ext.install(); install it first")
    module = sys.modules[__name__]
    sys.modules["mmcv._ext"] = module
    mmcv._ext = module
    log.debug("mmcv._ext -> %s (torchvision ops)", __name__)
    return module
