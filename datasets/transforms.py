"""Image transforms of the streams: decode, the strong-baseline training augmentation, and evaluation resize.

Training: resize to (height, width), flip, pad + random crop, colour jitter, normalise, random erasing
(erasing fills with 0 after normalisation, i.e. the mean colour, as the strong baseline does).
"""

from __future__ import annotations

import io

import torch
from PIL import Image
from torchvision.transforms import v2

from configs import ExperimentConfig


def decode(jpg: bytes) -> Image.Image:
    """JPEG bytes -> RGB PIL image."""
    with Image.open(io.BytesIO(jpg)) as img:
        return img.convert("RGB")


def _to_normalised(cfg: ExperimentConfig) -> list:
    a = cfg.data.augment
    return [v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(a.mean), list(a.std))]


def train_transform(cfg: ExperimentConfig) -> v2.Compose:
    """PIL -> normalised FloatTensor[3, H, W] with the training augmentation of ``cfg.data.augment``."""
    d, a = cfg.data, cfg.data.augment
    size = (d.height, d.width)
    steps: list = [v2.Resize(size, interpolation=v2.InterpolationMode.BILINEAR)]
    if a.flip_p > 0:
        steps.append(v2.RandomHorizontalFlip(a.flip_p))
    if a.pad > 0:
        steps += [v2.Pad(a.pad), v2.RandomCrop(size)]
    if a.color_jitter > 0:
        j = a.color_jitter
        steps.append(v2.ColorJitter(brightness=j, contrast=j, saturation=j))
    steps += _to_normalised(cfg)
    if a.erasing_p > 0:
        steps.append(v2.RandomErasing(p=a.erasing_p, scale=(0.02, 0.4), ratio=(0.3, 3.33), value=0))
    return v2.Compose(steps)


def eval_transform(cfg: ExperimentConfig) -> v2.Compose:
    """PIL -> normalised FloatTensor[3, H, W], resized to (height, width), no augmentation."""
    size = (cfg.data.height, cfg.data.width)
    return v2.Compose([v2.Resize(size, interpolation=v2.InterpolationMode.BILINEAR), *_to_normalised(cfg)])
