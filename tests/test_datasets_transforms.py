"""BatchAugment (the stream's batched augmentation) against torchvision's per-image strong-baseline pipeline."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from configs import ExperimentConfig
from datasets.transforms import BatchAugment, decode, erase_box, eval_transform, model_images, normalise
from tests.conftest import shared_dataset

H, W = 32, 16


def make_cfg(flip_p: float = 0.0, pad: int = 0, erasing_p: float = 0.0, color_jitter: float = 0.0) -> ExperimentConfig:
    cfg = ExperimentConfig()
    cfg.data.height, cfg.data.width = H, W
    a = cfg.data.augment
    a.flip_p, a.pad, a.erasing_p, a.color_jitter = flip_p, pad, erasing_p, color_jitter
    return cfg


def cfg_mean() -> list[float]:
    return list(make_cfg().data.augment.mean)


def cfg_std() -> list[float]:
    return list(make_cfg().data.augment.std)


def augmented(cfg: ExperimentConfig, images: list, seeds=None) -> torch.Tensor:
    """BatchAugment's uint8 pixels and erasing boxes, finished as the training loop finishes them."""
    return normalise(*BatchAugment(cfg)(images, seeds), cfg.data.augment)


@pytest.fixture(scope="module")
def image() -> Image.Image:
    jpgs = sorted((shared_dataset("market1501_mini") / "bounding_box_train").glob("*.jpg"))
    return decode(jpgs[0].read_bytes())  # a real 128x64 person crop: exercises the resize too


def test_unaugmented_batch_equals_torchvision_resize_and_normalise(image):
    cfg = make_cfg()
    pixels, erase = BatchAugment(cfg)([image, image])
    assert pixels.shape == (2, 3, H, W) and pixels.dtype == torch.uint8 and erase.tolist() == [[-1] * 4] * 2
    out = augmented(cfg, [image, image])
    assert out.shape == (2, 3, H, W) and out.dtype == torch.float32
    assert torch.equal(out[0], eval_transform(cfg)(image)) and torch.equal(out[1], out[0])
    assert torch.equal(augmented(make_cfg(flip_p=1.0), [image])[0], eval_transform(cfg)(image).flip(-1))


def test_flip_rate_and_pad_crop_offsets_cover_the_padded_canvas(image):
    torch.manual_seed(0)
    pad, n = 3, 400
    out = augmented(make_cfg(flip_p=0.5, pad=pad), [image] * n)
    small = F.pil_to_tensor(F.resize(image, [H, W]))
    normalise = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(cfg_mean(), cfg_std())])
    canvases = {f: normalise(F.pad(small.flip(-1) if f else small, [pad], fill=0)) for f in (False, True)}
    flips, tops, lefts = [], [], []
    for x in out:  # each output must be exactly one crop of the (flipped) zero-padded image
        hits = [
            (f, i, j)
            for f in canvases
            for i in range(2 * pad + 1)
            for j in range(2 * pad + 1)
            if torch.equal(canvases[f][:, i : i + H, j : j + W], x)
        ]
        assert hits, "an output is not a crop of the padded image"
        flips.append(hits[0][0]), tops.append(hits[0][1]), lefts.append(hits[0][2])
    assert 0.4 < np.mean(flips) < 0.6
    assert set(tops) == set(lefts) == set(range(2 * pad + 1))  # every offset of torchvision's RandomCrop occurs


def test_random_erasing_matches_torchvision_rate_and_box_sizes(image):
    torch.manual_seed(1)
    n = 600
    ours = augmented(make_cfg(erasing_p=0.5), [image] * n)
    base = eval_transform(make_cfg())(image)
    erase = v2.RandomErasing(p=0.5, scale=(0.02, 0.4), ratio=(0.3, 3.33), value=0)
    theirs = torch.stack([erase(base.clone()) for _ in range(n)])

    def erased_fraction(batch: torch.Tensor) -> np.ndarray:
        zero = ((batch == 0) & (base != 0)).all(dim=1)  # erased pixels are 0 in all channels
        for z in zero[zero.any(dim=(1, 2))]:  # each erased area is one filled rectangle
            rows, cols = z.any(dim=1).nonzero(), z.any(dim=0).nonzero()
            assert z[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].all()
        return zero.float().mean(dim=(1, 2)).numpy()

    a, b = erased_fraction(ours), erased_fraction(theirs)
    assert abs((a > 0).mean() - (b > 0).mean()) < 0.08 and 0.4 < (a > 0).mean() < 0.6
    assert a[a > 0].min() >= 0.01 and a.max() <= 0.45
    assert abs(a[a > 0].mean() - b[b > 0].mean()) < 0.03


def test_colour_jitter_changes_pixels_but_keeps_shape(image):
    torch.manual_seed(2)
    plain = augmented(make_cfg(), [image] * 4)
    jittered = augmented(make_cfg(color_jitter=0.4), [image] * 4)
    assert jittered.shape == plain.shape and not torch.equal(jittered, plain)


def float_batch_in_the_worker(aug: BatchAugment, images: list, seeds: list) -> torch.Tensor:
    """How the stream's workers made the float batch before they handed over uint8 (the reference): the same
    per-image draws, then one float conversion + normalisation of the batch, then each image's erasing box."""
    a, n, h, w = aug.a, len(images), aug.height, aug.width
    rngs = [np.random.default_rng(s) for s in seeds]
    canvas = np.zeros((n, 3, h, w), dtype=np.uint8)
    for b, (img, rng) in enumerate(zip(images, rngs)):
        img = F.resize(img, [h, w], interpolation=v2.InterpolationMode.BILINEAR) if img.size != (w, h) else img
        flip = bool(rng.random() < a.flip_p)
        top, left = (int(v) - a.pad for v in rng.integers(0, 2 * a.pad + 1, 2))
        aug._paste(canvas[b], np.asarray(img), flip, top, left)
        if a.color_jitter > 0:
            canvas[b] = aug._jitter(torch.from_numpy(canvas[b]), rng).numpy()
    out = torch.empty((n, 3, h, w), dtype=torch.float32).copy_(torch.from_numpy(canvas))
    mean, std = (torch.tensor(v, dtype=torch.float32).view(1, 3, 1, 1) for v in (a.mean, a.std))
    out.mul_(1.0 / 255).sub_(mean).div_(std)
    for b, rng in enumerate(rngs):
        box = erase_box(rng, h, w) if rng.random() < a.erasing_p else None
        if box is not None:
            i, j, eh, ew = box
            out[b, :, i : i + eh, j : j + ew] = 0.0
    return out


def test_uint8_hand_over_finished_by_the_consumer_is_bit_identical_to_the_float_batch():
    """The whole recipe on real person crops of several sizes, seeded as the stream seeds: the pixels + boxes,
    normalised where they are consumed (also through ``model_images``, as the loop calls it), equal the float batch
    the workers made before, bit for bit."""
    jpgs = sorted((shared_dataset("mars_mini") / "bbox_train").glob("*/*.jpg"))[::97][:24]
    images = [decode(p.read_bytes()) for p in jpgs] + [decode(p.read_bytes()).resize((40, 90)) for p in jpgs[:8]]
    cfg = make_cfg(flip_p=0.5, pad=10, erasing_p=0.5, color_jitter=0.2)
    cfg.data.height, cfg.data.width = 256, 128
    aug = BatchAugment(cfg)
    seeds = [(3, 1, 7, b) for b in range(len(images))]
    reference = float_batch_in_the_worker(aug, images, seeds)
    pixels, erase = aug(images, seeds)
    assert 0 < int((erase[:, 0] >= 0).sum()) < len(images)  # some images erased, some not
    assert torch.equal(normalise(pixels, erase, cfg.data.augment), reference)
    batch = {"pixels": pixels, "erase": erase, "label": torch.zeros(len(images))}
    assert torch.equal(model_images(batch, cfg.data.augment, "cpu"), reference)
    assert model_images({"image": reference}, cfg.data.augment) is reference  # a synthetic stream's float images
