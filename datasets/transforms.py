"""Image transforms of the streams: decode, the strong-baseline training augmentation, and evaluation resize.

Training: resize to (height, width), flip, pad + random crop, colour jitter, normalise, random erasing
(erasing fills with 0 after normalisation, i.e. the mean colour, as the strong baseline does).
``train_transform`` is the per-image torchvision pipeline; ``BatchAugment`` draws the same augmentations from
the same distributions but builds a whole batch at once (what the training stream uses; about 2x faster). It stops
before the float conversion: the stream hands over uint8 pixels and each image's erasing box, and ``normalise``
finishes the batch where it is consumed (on the training device), bit-identical to doing it in the worker.
"""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from configs import AugmentConfig, ExperimentConfig

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
    """A batch of PIL images -> uint8 pixels [B, 3, H, W] and erasing boxes [B, 4], augmented like
    ``train_transform`` once ``normalise`` has finished them.

    Per image: resize (PIL, as torchvision does), then flip and pad + random crop in one slice copy into a
    zeroed uint8 batch (the crop is an offset into the zero-padded canvas), then colour jitter (torchvision's
    brightness / contrast / saturation functions in a random order, factors drawn as ``ColorJitter`` draws them)
    on the uint8 crop, then the random-erasing box with torchvision's rule (top, left, height, width; -1 when the
    image is not erased). ``normalise`` then converts to float and normalises (bit-identical to ToDtype(scale=True)
    + Normalize) and fills the boxes with 0. Handing over uint8 moves 4x fewer bytes between processes and to the
    device than float32, and the float work runs where the batch is used.

    Each image draws from its own generator, seeded by ``seeds[b]`` (the stream passes (seed, epoch, step,
    position in the global batch), so an image's augmentation does not depend on how the batch was split);
    without seeds they come from torch's RNG, so ``torch.manual_seed`` applies.
    """

    def __init__(self, cfg: ExperimentConfig) -> None:
        d, a = cfg.data, cfg.data.augment
        self.height, self.width, self.a = d.height, d.width, a

    def __call__(
        self, images: list[Image.Image], seeds: Sequence | None = None, out: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Augment ``images`` into ``out`` (uint8; a new tensor when None); returns (pixels, erasing boxes)."""
        n, h, w, pad = len(images), self.height, self.width, self.a.pad
        if seeds is None:
            seeds = torch.randint(0, 2**62, (n,)).tolist()
        canvas = self._canvas(n)
        boxes = torch.full((n, 4), -1, dtype=torch.int16)
        for b, (img, seed) in enumerate(zip(images, seeds)):
            rng = np.random.default_rng(seed)
            if img.size != (w, h):
                img = F.resize(img, [h, w], interpolation=v2.InterpolationMode.BILINEAR)
            flip = bool(rng.random() < self.a.flip_p)
            top, left = (int(v) - pad for v in rng.integers(0, 2 * pad + 1, 2))
            self._paste(canvas[b], np.asarray(img), flip, top, left)
            if self.a.color_jitter > 0:
                canvas[b] = self._jitter(torch.from_numpy(canvas[b]), rng).numpy()
            box = erase_box(rng, h, w) if rng.random() < self.a.erasing_p else None
            if box is not None:
                boxes[b] = torch.tensor(box, dtype=torch.int16)
        out = torch.empty((n, 3, h, w), dtype=torch.uint8) if out is None else out
        out.copy_(torch.from_numpy(canvas))
        return out, boxes

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


@functools.lru_cache(maxsize=16)
def _stats(mean: tuple, std: tuple, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """mean/std as [1, 3, 1, 1] float32 tensors on ``device``, made once (a copy each step would wait on it)."""
    return tuple(torch.tensor(v, dtype=torch.float32).view(1, 3, 1, 1).to(device) for v in (mean, std))


def normalise(pixels: torch.Tensor, erase: torch.Tensor, augment: AugmentConfig) -> torch.Tensor:
    """``BatchAugment``'s uint8 pixels + erasing boxes -> the normalised float32 batch, on ``pixels``' device.

    The same float operations as ToDtype(scale=True) + Normalize, in the same order (so the same bits on any
    device), then each box filled with 0 (the mean colour), as RandomErasing(value=0) after Normalize does. The
    boxes are read on the host, where the stream made them (``erase`` on the CPU: no wait on the device).
    """
    mean, std = _stats(tuple(augment.mean), tuple(augment.std), pixels.device)
    out = pixels.to(torch.float32).mul_(1.0 / 255).sub_(mean).div_(std)
    for b, (top, left, height, width) in enumerate(erase.tolist()):
        if top >= 0:
            out[b, :, top : top + height, left : left + width] = 0.0
    return out


def model_images(batch: dict, augment: AugmentConfig, device: torch.device | str | None = None) -> torch.Tensor:
    """A training micro-batch's images as a model takes them: normalised float32 NCHW on ``device`` (default:
    where they are). The stream's micro-batches hold uint8 ``pixels`` and ``erase`` boxes (on the host), moved and
    finished here by ``normalise``; a micro-batch that already holds a float ``image`` (a synthetic stream) gives
    that."""
    if "pixels" not in batch:
        return batch["image"].to(device, non_blocking=True) if device is not None else batch["image"]
    pixels = batch["pixels"].to(device, non_blocking=True) if device is not None else batch["pixels"]
    return normalise(pixels, batch["erase"], augment)
