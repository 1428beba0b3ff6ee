"""The retrieval model: a timm (or IBN-Net) backbone, pooling, optional embedding, BNNeck and a classifier.

``build_model(cfg.model, num_classes)`` is what the trainer, the evaluation CLI and the distiller call;
``load_model`` builds one from a weights file. Pretrained backbone weights come from a local file: timm
loads its own models' files (official Swin, torchvision/timm ResNet layouts), IBN-Net files load here.
"""

from __future__ import annotations

import difflib
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import timm
import torch
from torch import nn

from inference.aggregate import POOLINGS, GeM
from inference.heads import bnneck, build_head
from inference.ibn import IBN_DEPTHS, resnet_ibn_a
from inference.serialization import load_weights_only

if TYPE_CHECKING:  # the schema imports this module's registries: a runtime import would be a cycle
    from configs import ModelConfig

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
    """The backbone without classifier, with ``cfg.pretrained_path``'s weights; ``num_features`` gives its width."""
    check_backbone_name(cfg.backbone)
    if cfg.backbone in IBN_DEPTHS:
        if cfg.pretrained:
            raise ValueError(
                f"model.pretrained=true: there is no hub for {cfg.backbone}; download the IBN-Net weights "
                "(e.g. resnet50_ibn_a-d9d0bb7b.pth) and set model.pretrained_path=/path/to/file instead"
            )
        backbone = resnet_ibn_a(cfg.backbone, last_stride=cfg.last_stride)
        if cfg.pretrained_path:
            load_pretrained(backbone, cfg.pretrained_path)
        return backbone
    kwargs: dict = {"num_classes": 0}
    if cfg.drop_path > 0:
        kwargs["drop_path_rate"] = cfg.drop_path
    state = read_state_dict(cfg.pretrained_path) if cfg.pretrained_path else None
    if state is not None and not is_retrieval_weights(state):
        backbone = _timm_from_file(cfg.backbone, cfg.pretrained_path, state, img_size, kwargs)
    else:
        backbone = _timm_from_hub(cfg, img_size, kwargs)
        if state is not None:  # our own retrieval weights: timm cannot read them, the backbone part loads here
            load_pretrained(backbone, cfg.pretrained_path)
    set_last_stride(backbone, cfg.last_stride, cfg.backbone)
    return backbone


def _timm_create(name: str, img_size: tuple[int, int] | None, **kwargs) -> nn.Module:
    if img_size is not None:
        try:
            return timm.create_model(name, img_size=img_size, **kwargs)
        except TypeError:  # CNNs take any input size and have no img_size argument
            pass
    return timm.create_model(name, **kwargs)


def _timm_from_hub(cfg: ModelConfig, img_size: tuple[int, int] | None, kwargs: dict) -> nn.Module:
    try:
        return _timm_create(cfg.backbone, img_size, pretrained=cfg.pretrained, **kwargs)
    except (OSError, RuntimeError) as exc:
        if not cfg.pretrained:
            raise
        raise RuntimeError(
            f"model.pretrained=true could not fetch weights for {cfg.backbone} through timm's hub ({exc}). "
            "Without network access, put the weights file on disk and set model.pretrained=false "
            "model.pretrained_path=/path/to/weights (official Swin .pth, torchvision/timm ResNet, IBN-Net)"
        ) from exc


def _timm_from_file(name: str, path: str, state: dict, img_size: tuple[int, int] | None, kwargs: dict) -> nn.Module:
    """timm loads the file itself (its layout conversions, classifier removal); then we check that it fitted.

    timm loads without strictness once it drops the classifier, so a file of another model would leave a
    random backbone without a word: ``check_fit`` refuses that.
    """
    overlay = {"file": str(path)}
    try:
        backbone = _timm_create(name, img_size, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    except RuntimeError:  # shape mismatches: name them the way check_fit does
        plain = _timm_create(name, img_size, **kwargs)
        check_fit(plain, backbone_state(plain, state), path)
        raise
    matched = check_fit(backbone, backbone_state(backbone, state), path)
    log.info("pretrained %s: %d tensors loaded through timm", path, len(matched))
    return backbone


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
    """Tensors of a weights file, unwrapped from ``model`` / ``state_dict`` and stripped of ``module.``.

    Memory-mapped where the file allows it: checking a large file's names and shapes reads little of it.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model.pretrained_path={str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        obj = load_file(str(path))
    else:
        obj = load_weights_only(path, "model.pretrained_path", mmap=True)
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


def is_retrieval_weights(state: dict) -> bool:
    """Weights of a whole retrieval model (ours: ``backbone.*``, ``head.*``), not of a bare backbone."""
    return any(k.startswith("backbone.") for k in state)


def backbone_state(backbone: nn.Module, state: dict) -> dict:
    """``state`` in the backbone's own layout: the backbone part of our retrieval weights, timm's layout
    conversion for its model (e.g. official Swin files, relative-position tables resized), no classifier."""
    if is_retrieval_weights(state):
        state = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    module = sys.modules.get(type(backbone).__module__)
    filter_fn = getattr(module, "checkpoint_filter_fn", None)
    if filter_fn is not None and module.__name__.startswith("timm."):
        state = filter_fn(state, backbone)
    own = backbone.state_dict()
    return {k: v for k, v in state.items() if k in own or not k.startswith(CLASSIFIER_PREFIXES)}


def check_fit(backbone: nn.Module, state: dict, path: str | Path) -> list[str]:
    """Names of the backbone tensors that ``state`` (its own layout) holds; ValueError for another model's."""
    own = backbone.state_dict()
    matched, bad_shape = [], []
    for key in (k for k in state if k in own):
        if state[key].shape == own[key].shape:
            matched.append(key)
        else:
            bad_shape.append(f"{key} {tuple(state[key].shape)} vs {tuple(own[key].shape)}")
    if bad_shape or len(matched) < 0.9 * len(own):  # a few missing keys are reported, many are an error
        raise ValueError(
            f"{path} does not hold weights for this backbone ({type(backbone).__name__}): {len(matched)} of "
            f"{len(own)} tensors match; shape mismatches: {bad_shape[:5]}; "
            f"unknown keys e.g. {[k for k in state if k not in own][:5]}"
        )
    return matched


def load_pretrained(backbone: nn.Module, path: str | Path) -> tuple[list[str], list[str]]:
    """Load backbone weights from a file (IBN-Net layout, our retrieval weights, or a timm model's file);
    return the (missing, unexpected) keys after dropping the classifier."""
    state = backbone_state(backbone, read_state_dict(path))
    matched = check_fit(backbone, state, path)
    result = backbone.load_state_dict(state, strict=False)
    if result.missing_keys:
        log.warning("pretrained %s: %d missing keys: %s", path, len(result.missing_keys), result.missing_keys)
    if result.unexpected_keys:
        log.warning("pretrained %s: %d unexpected keys: %s", path, len(result.unexpected_keys), result.unexpected_keys)
    log.info("pretrained %s: loaded %d tensors", path, len(matched))
    return list(result.missing_keys), list(result.unexpected_keys)


def build_pooling(name: str, gem_p: float = 3.0) -> nn.Module:
    """Global pooling by name (a key of ``inference.aggregate.POOLINGS``); GeM's exponent is learnt."""
    if name not in POOLINGS:
        raise ValueError(f"model.pooling={name!r} is not valid; choose one of {sorted(POOLINGS)}")
    return GeM(gem_p, learnable=True) if name == "gem" else POOLINGS[name]()


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
    return RetrievalModel(create_backbone(cfg, img_size), cfg, num_classes)


def load_model(cfg: ModelConfig, checkpoint: str | Path, img_size: tuple[int, int] | None = None) -> RetrievalModel:
    """The model of ``cfg`` with the weights of a retrieval state_dict file (weights_only; e.g. ``mAPxx.pth``);
    the number of classes comes from the file. Returned in eval mode on the CPU."""
    path = Path(checkpoint)
    state = load_weights_only(path, "checkpoint")
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    head = state.get("head.weight") if isinstance(state, dict) else None
    if head is None:
        raise ValueError(f"checkpoint {path} is not a retrieval model state_dict (no 'head.weight')")
    model = build_model(cfg, num_classes=int(head.shape[0]), img_size=img_size)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(f"checkpoint {path} does not fit model.backbone={cfg.backbone!r}: {err}") from None
    return model.eval()
