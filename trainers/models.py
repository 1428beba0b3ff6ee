"""The retrieval model: a timm (or IBN-Net) backbone, pooling, optional embedding, BNNeck and a classifier.

``build_model(cfg.model, num_classes)`` is what the trainer, the evaluator and the distiller call.
Pretrained weights come from a local file (official Swin, torchvision/timm ResNet, IBN-Net layouts).
"""

from __future__ import annotations

import difflib
import logging
import sys
from pathlib import Path

import timm
import torch
from torch import nn

from configs import ModelConfig
from trainers.heads import bnneck, build_head, build_pooling
from trainers.ibn import IBN_DEPTHS, resnet_ibn_a

log = logging.getLogger(__name__)

CLASSIFIER_PREFIXES = ("head.", "fc.", "classifier.", "last_linear.")


def our_backbones() -> list[str]:
    """Backbones written here (timm has no IBN-Net)."""
    return sorted(IBN_DEPTHS)


def check_backbone_name(name: str) -> None:
    """Raise a ValueError listing close valid names when ``name`` is neither ours nor a timm model."""
    if name in IBN_DEPTHS or timm.is_model(name.split(".")[0]):
        return
    names = our_backbones() + timm.list_models()
    close = difflib.get_close_matches(name, names, n=8, cutoff=0.5)
    raise ValueError(
        f"model.backbone={name!r} is not a known backbone. Ours: {', '.join(our_backbones())}; "
        f"or any of the {len(names) - len(our_backbones())} timm names (timm.list_models()). "
        f"Close matches: {', '.join(close) or 'none'}"
    )


def create_backbone(cfg: ModelConfig, img_size: tuple[int, int] | None = None) -> nn.Module:
    """The backbone without classifier; ``num_features`` gives its output width."""
    check_backbone_name(cfg.backbone)
    if cfg.backbone in IBN_DEPTHS:
        if cfg.pretrained:
            raise ValueError(
                f"model.pretrained=true: there is no hub for {cfg.backbone}; download the IBN-Net weights "
                "(e.g. resnet50_ibn_a-d9d0bb7b.pth) and set model.pretrained_path=/path/to/file instead"
            )
        return resnet_ibn_a(cfg.backbone, last_stride=cfg.last_stride)
    kwargs: dict = {"num_classes": 0}
    if cfg.drop_path > 0:
        kwargs["drop_path_rate"] = cfg.drop_path
    backbone = _timm_create(cfg, kwargs, img_size)
    set_last_stride(backbone, cfg.last_stride, cfg.backbone)
    return backbone


def _timm_create(cfg: ModelConfig, kwargs: dict, img_size: tuple[int, int] | None) -> nn.Module:
    try:
        if img_size is not None:
            try:
                return timm.create_model(cfg.backbone, pretrained=cfg.pretrained, img_size=img_size, **kwargs)
            except TypeError:  # CNNs take any input size and have no img_size argument
                pass
        return timm.create_model(cfg.backbone, pretrained=cfg.pretrained, **kwargs)
    except (OSError, RuntimeError) as exc:
        if not cfg.pretrained:
            raise
        raise RuntimeError(
            f"model.pretrained=true could not fetch weights for {cfg.backbone} through timm's hub ({exc}). "
            "Without network access, put the weights file on disk and set model.pretrained=false "
            "model.pretrained_path=/path/to/weights (official Swin .pth, torchvision/timm ResNet, IBN-Net)"
        ) from exc


def set_last_stride(backbone: nn.Module, stride: int, name: str = "") -> None:
    """Make the first block of ``layer4`` (ResNet family) use ``stride`` instead of 2."""
    layer4 = getattr(backbone, "layer4", None)
    if layer4 is None or stride == 2:
        if stride != 2:
            log.info("model.last_stride=%d ignored: %s has no ResNet layer4", stride, name or type(backbone).__name__)
        return
    for module in layer4[0].modules():
        if isinstance(module, nn.Conv2d) and module.stride == (2, 2):
            module.stride = (stride, stride)
        elif isinstance(module, nn.AvgPool2d) and module.stride == 2:  # ResNet-D average-pool shortcut
            module.kernel_size, module.stride = 1, 1


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a weights file, unwrapped from ``model`` / ``state_dict`` and stripped of ``module.``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model.pretrained_path={str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        obj = load_file(str(path))
    else:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict", "model_state"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not obj:
        raise ValueError(f"{path}: no state dict found (expected a dict of tensors, maybe under 'model')")
    out = {}
    for key, value in obj.items():
        if isinstance(value, torch.Tensor):
            out[key.removeprefix("module.")] = value
    return out


def load_pretrained(backbone: nn.Module, path: str | Path) -> tuple[list[str], list[str]]:
    """Load backbone weights from a file; return (missing, unexpected) keys after dropping the classifier."""
    state = read_state_dict(path)
    if any(k.startswith("backbone.") for k in state):  # our own retrieval weights: keep the backbone part
        state = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    module = sys.modules.get(type(backbone).__module__)
    filter_fn = getattr(module, "checkpoint_filter_fn", None)
    if filter_fn is not None and module.__name__.startswith("timm."):
        state = filter_fn(state, backbone)  # e.g. Swin: old layout, buffers, rel-pos table resize
    own = backbone.state_dict()
    dropped = [k for k in state if k.startswith(CLASSIFIER_PREFIXES) and k not in own]
    state = {k: v for k, v in state.items() if k not in dropped}
    bad_shape = [
        f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and v.shape != own[k].shape
    ]
    matched = [k for k in state if k in own and state[k].shape == own[k].shape]
    if bad_shape or len(matched) < 0.9 * len(own):  # a few missing keys are reported, many are an error
        raise ValueError(
            f"{path} does not hold weights for this backbone ({type(backbone).__name__}): {len(matched)} of "
            f"{len(own)} tensors match; shape mismatches: {bad_shape[:5]}; "
            f"unknown keys e.g. {[k for k in state if k not in own][:5]}"
        )
    result = backbone.load_state_dict(state, strict=False)
    if dropped:
        log.info("pretrained %s: dropped classifier tensors %s", path, dropped)
    if result.missing_keys:
        log.warning("pretrained %s: %d missing keys: %s", path, len(result.missing_keys), result.missing_keys)
    if result.unexpected_keys:
        log.warning("pretrained %s: %d unexpected keys: %s", path, len(result.unexpected_keys), result.unexpected_keys)
    log.info("pretrained %s: loaded %d tensors", path, len(matched))
    return list(result.missing_keys), list(result.unexpected_keys)


class RetrievalModel(nn.Module):
    """Backbone -> pooling -> [embedding] -> BNNeck -> classifier.

    Eval mode: ``forward(images)`` returns the inference embedding. Train mode: a dict with ``feat``
    (before the BNNeck, for triplet/center), ``logits`` and ``embedding``. Margin heads take ``labels``.
    """

    def __init__(self, backbone: nn.Module, cfg: ModelConfig, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.nhwc = getattr(backbone, "output_fmt", "NCHW") == "NHWC"
        self.pool = build_pooling(cfg.pooling, cfg.gem_p)
        dim = backbone.num_features
        self.embed = nn.Linear(dim, cfg.embed_dim) if cfg.embed_dim else nn.Identity()
        self.dim = cfg.embed_dim or dim
        self.neck = bnneck(self.dim) if cfg.neck == "bnneck" else nn.Identity()
        self.head = build_head(cfg.head, self.dim, num_classes, cfg.scale, cfg.margin)
        self.neck_feat = cfg.neck_feat
        self.num_classes = num_classes

    def pooled(self, images: torch.Tensor) -> torch.Tensor:
        x = self.backbone.forward_features(images)
        if x.ndim == 3:  # token sequence (ViT): the backbone's own pooling
            return self.backbone.forward_head(x, pre_logits=True)
        if self.nhwc:
            x = x.permute(0, 3, 1, 2)
        return self.pool(x)

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None):
        feat = self.embed(self.pooled(images))
        after = self.neck(feat)
        embedding = after if self.neck_feat == "after" else feat
        if not self.training:
            return embedding
        return {"feat": feat, "logits": self.head(after, labels), "embedding": embedding}


def build_model(cfg: ModelConfig, num_classes: int, img_size: tuple[int, int] | None = None) -> RetrievalModel:
    """Build the retrieval model for ``num_classes`` training identities (weights from cfg.pretrained_path)."""
    if num_classes < 1:
        raise ValueError(f"num_classes={num_classes} must be >= 1 (the training split has no identities)")
    backbone = create_backbone(cfg, img_size)
    if cfg.pretrained_path:
        load_pretrained(backbone, cfg.pretrained_path)
    return RetrievalModel(backbone, cfg, num_classes)
