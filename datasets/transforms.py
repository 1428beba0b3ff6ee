"""Image transforms of the streams: decode, the strong-baseline training augmentation, and evaluation resize.

Training: resize to (height, width), flip, pad + random crop, colour jitter, normalise, random erasing
(erasing fills with 0 after normalisation, i.e. the mean colour, as the strong baseline does).
``train_transform`` is the per-image torchvision pipeline; ``BatchAugment`` draws the same augmentations from
the same distributions but builds a whole batch at once (what the training stream uses; about 2x faster).
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from configs import ExperimentConfig

ERASE_SCALE = (0.02, 0.4)
ERASE_RATIO = (0.3, 3.33)


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
        steps.append(v2.RandomErasing(p=a.erasing_p, scale=ERASE_SCALE, ratio=ERASE_RATIO, value=0))
    return v2.Compose(steps)


def eval_transform(cfg: ExperimentConfig) -> v2.Compose:
    """PIL -> normalised FloatTensor[3, H, W], resized to (height, width), no augmentation."""
    size = (cfg.data.height, cfg.data.width)
    return v2.Compose([v2.Resize(size, interpolation=v2.InterpolationMode.BILINEAR), *_to_normalised(cfg)])


def erase_box(rng: np.random.Generator, height: int, width: int) -> tuple[int, int, int, int] | None:
    """torchvision's RandomErasing rule: 10 tries at a box of area scale x H x W and log-uniform aspect ratio."""
    lo, hi = math.log(ERASE_RATIO[0]), math.log(ERASE_RATIO[1])
    for _ in range(10):
        area = height * width * rng.uniform(*ERASE_SCALE)
        aspect = math.exp(rng.uniform(lo, hi))
        h, w = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
        if h < height and w < width:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    return None


class BatchAugment:
    """A batch of PIL images -> normalised FloatTensor[B, 3, H, W], augmented like ``train_transform``.

    Per image: resize (PIL, as torchvision does), then flip and pad + random crop in one slice copy into a
    zeroed uint8 batch (the crop is an offset into the zero-padded canvas), then colour jitter (torchvision's
    brightness / contrast / saturation functions in a random order, factors drawn as ``ColorJitter`` draws them)
    on the uint8 crop. Per batch: one float conversion + normalisation, bit-identical to ToDtype(scale=True) +
    Normalize; then random erasing per image with torchvision's box rule, value 0.

    Each image draws from its own generator, seeded by ``seeds[b]`` (the stream passes (seed, epoch, step,
    position in the global batch), so an image's augmentation does not depend on how the batch was split);
    without seeds they come from torch's RNG, so ``torch.manual_seed`` applies.
    """

    def __init__(self, cfg: ExperimentConfig) -> None:
        d, a = cfg.data, cfg.data.augment
        self.height, self.width, self.a = d.height, d.width, a
        self.mean = torch.tensor(a.mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(a.std, dtype=torch.float32).view(1, 3, 1, 1)

    def __call__(
        self, images: list[Image.Image], seeds: Sequence | None = None, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Augment ``images`` into ``out`` (a new tensor when None)."""
        n, h, w, pad = len(images), self.height, self.width, self.a.pad
        if seeds is None:
            seeds = torch.randint(0, 2**62, (n,)).tolist()
        rngs = [np.random.default_rng(s) for s in seeds]
        canvas = self._canvas(n)
        for b, (img, rng) in enumerate(zip(images, rngs)):
            if img.size != (w, h):
                img = F.resize(img, [h, w], interpolation=v2.InterpolationMode.BILINEAR)
            flip = bool(rng.random() < self.a.flip_p)
            top, left = (int(v) - pad for v in rng.integers(0, 2 * pad + 1, 2))
            self._paste(canvas[b], np.asarray(img), flip, top, left)
            if self.a.color_jitter > 0:
                canvas[b] = self._jitter(torch.from_numpy(canvas[b]), rng).numpy()
        out = torch.empty((n, 3, h, w), dtype=torch.float32) if out is None else out
        out.copy_(torch.from_numpy(canvas))
        out.mul_(1.0 / 255).sub_(self.mean).div_(self.std)
        for b, rng in enumerate(rngs):
            box = erase_box(rng, h, w) if rng.random() < self.a.erasing_p else None
            if box is not None:
                i, j, eh, ew = box
                out[b, :, i : i + eh, j : j + ew] = 0.0
        return out

    def _jitter(self, img: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        """torchvision's ColorJitter(brightness=j, contrast=j, saturation=j) with its draws from ``rng``."""
        j = self.a.color_jitter
        adjust = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation)
        for fn in rng.permutation(3):
            img = adjust[fn](img, float(rng.uniform(max(0.0, 1 - j), 1 + j)))
        return img

    def _canvas(self, n: int) -> np.ndarray:
        """The zeroed uint8 batch, reused between calls (fresh memory costs a page fault per 4 KiB)."""
        shape = (n, 3, self.height, self.width)
        if getattr(self, "_buffer", None) is None or self._buffer.shape != shape:
            self._buffer = np.zeros(shape, dtype=np.uint8)
        else:
            self._buffer.fill(0)
        return self._buffer

    @staticmethod
    def _paste(dst: np.ndarray, src: np.ndarray, flip: bool, dy: int, dx: int) -> None:
        """dst[:, y, x] = flipped src[y + dy, x + dx] where that is inside src (the rest stays 0 = padding)."""
        h, w = dst.shape[1:]
        if flip:
            src = src[:, ::-1]
        y0, y1, x0, x1 = max(0, -dy), min(h, h - dy), max(0, -dx), min(w, w - dx)
        dst[:, y0:y1, x0:x1] = src[y0 + dy : y1 + dy, x0 + dx : x1 + dx].transpose(2, 0, 1)
