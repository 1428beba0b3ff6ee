"""Our mmcv._ext (trainers/mmcv_ext.py) against the definitions: nms with offset 0/1, RoIAlign forward/backward."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("mmcv")
pytest.importorskip("torchvision")

from trainers import mmcv_ext  # noqa: E402

mmcv_ext.install()

import torchvision  # noqa: E402
from mmcv.ops import RoIAlign, batched_nms, nms, roi_align, soft_nms  # noqa: E402

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    return torch.device(name)


def nms_reference(boxes: torch.Tensor, scores: torch.Tensor, thr: float, offset: int) -> list[int]:
    """Greedy NMS by definition: highest score first, drop boxes whose IoU with a kept box exceeds ``thr``."""
    order = sorted(range(len(scores)), key=lambda i: -float(scores[i]))
    b = boxes.double().tolist()

    def area(i):
        return (b[i][2] - b[i][0] + offset) * (b[i][3] - b[i][1] + offset)

    keep: list[int] = []
    for i in order:
        ok = True
        for k in keep:
            w = max(0.0, min(b[i][2], b[k][2]) - max(b[i][0], b[k][0]) + offset)
            h = max(0.0, min(b[i][3], b[k][3]) - max(b[i][1], b[k][1]) + offset)
            inter = w * h
            if inter / (area(i) + area(k) - inter) > thr:
                ok = False
                break
        if ok:
            keep.append(i)
    return keep


def random_boxes(n: int, gen: torch.Generator, size: float = 40.0, integer: bool = False) -> torch.Tensor:
    xy = torch.rand(n, 2, generator=gen) * 60
    wh = torch.rand(n, 2, generator=gen) * size + 1
    boxes = torch.cat([xy, xy + wh], dim=1)
    return boxes.round() if integer else boxes


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("offset", [0, 1])
@pytest.mark.parametrize("thr", [0.3, 0.5, 0.7])
def test_nms_matches_definition(device, offset, thr):
    dev = _device(device)
    gen = torch.Generator().manual_seed(offset * 10 + int(thr * 10))
    # boxes of a few pixels, where offset 1 changes the IoU most; the jitter keeps IoUs off exact ties with the
    # threshold (there float32 and float64 may round either way)
    boxes = random_boxes(200, gen, size=8.0, integer=True) + torch.rand(200, 4, generator=gen) * 0.01
    scores = torch.randperm(200, generator=gen).float() / 200  # distinct scores: one valid answer
    dets, keep = nms(boxes.to(dev), scores.to(dev), thr, offset=offset)
    assert keep.cpu().tolist() == nms_reference(boxes, scores, thr, offset)
    assert torch.equal(dets[:, :4].cpu(), boxes[keep.cpu()])


def test_nms_offset_changes_the_answer():
    boxes = torch.tensor([[0.0, 0.0, 2.0, 2.0], [1.0, 0.0, 3.0, 2.0]])  # IoU 1/3 (offset 0), 1/2 (offset 1)
    scores = torch.tensor([0.9, 0.8])
    assert nms(boxes, scores, 0.4, offset=0)[1].tolist() == [0, 1]
    assert nms(boxes, scores, 0.4, offset=1)[1].tolist() == [0]


def test_nms_empty_and_batched():
    dets, keep = nms(torch.zeros(0, 4), torch.zeros(0), 0.5)
    assert dets.shape == (0, 5) and keep.numel() == 0
    gen = torch.Generator().manual_seed(3)
    boxes, scores = random_boxes(50, gen), torch.rand(50, generator=gen)
    labels = torch.randint(0, 3, (50,), generator=gen)
    _, keep = batched_nms(boxes, scores, labels, dict(type="nms", iou_threshold=0.5))
    expected = torchvision.ops.batched_nms(boxes, scores, labels, 0.5)
    assert keep.tolist() == expected.tolist()


def _bilinear(feat: torch.Tensor, y: float, x: float) -> torch.Tensor:
    """mmcv / torchvision bilinear sample of feat [C, H, W] at (y, x): zero outside [-1, H] x [-1, W]."""
    height, width = feat.shape[-2:]
    if y < -1.0 or y > height or x < -1.0 or x > width:
        return feat.new_zeros(feat.shape[0])
    y, x = max(y, 0.0), max(x, 0.0)
    y0, x0 = int(math.floor(y)), int(math.floor(x))
    if y0 >= height - 1:
        y0 = y1 = height - 1
        y = float(y0)
    else:
        y1 = y0 + 1
    if x0 >= width - 1:
        x0 = x1 = width - 1
        x = float(x0)
    else:
        x1 = x0 + 1
    ly, lx = y - y0, x - x0
    hy, hx = 1 - ly, 1 - lx
    return hy * hx * feat[:, y0, x0] + hy * lx * feat[:, y0, x1] + ly * hx * feat[:, y1, x0] + ly * lx * feat[:, y1, x1]


def roi_align_reference(feat, rois, out_size, scale, sampling_ratio, aligned):
    """RoIAlign (avg) by definition, differentiable in ``feat`` (used in float64)."""
    out = []
    shift = 0.5 if aligned else 0.0
    for roi in rois.tolist():
        b = int(roi[0])
        x1, y1, x2, y2 = (v * scale - shift for v in roi[1:])
        roi_w, roi_h = x2 - x1, y2 - y1
        if not aligned:
            roi_w, roi_h = max(roi_w, 1.0), max(roi_h, 1.0)
        bin_w, bin_h = roi_w / out_size, roi_h / out_size
        gw = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_w / out_size)
        gh = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_h / out_size)
        bins = []
        for py in range(out_size):
            for px in range(out_size):
                acc = 0
                for iy in range(gh):
                    for ix in range(gw):
                        y = y1 + py * bin_h + (iy + 0.5) * bin_h / gh
                        x = x1 + px * bin_w + (ix + 0.5) * bin_w / gw
                        acc = acc + _bilinear(feat[b], y, x)
                bins.append(acc / max(gh * gw, 1))
        out.append(torch.stack(bins, dim=1).reshape(feat.shape[1], out_size, out_size))
    return torch.stack(out)


def _rois(gen: torch.Generator, n: int = 6) -> torch.Tensor:
    boxes = random_boxes(n, gen, size=30.0) - 4  # some reach outside the 16x16 map (scale 1/4 -> 64 px)
    batch = torch.randint(0, 2, (n, 1), generator=gen).float()
    return torch.cat([batch, boxes], dim=1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("sampling_ratio", [0, 2])
def test_roi_align_forward_backward(device, aligned, sampling_ratio):
    dev = _device(device)
    gen = torch.Generator().manual_seed(7 + sampling_ratio + int(aligned))
    feat = torch.randn(2, 3, 16, 16, generator=gen)
    rois = _rois(gen)
    grad = torch.randn(len(rois), 3, 5, 5, generator=gen)
    args = (5, 0.25, sampling_ratio, "avg", aligned)

    x = feat.clone().to(dev).requires_grad_(True)
    out = roi_align(x, rois.to(dev), *args)
    out.backward(grad.to(dev))

    # 1) the same numbers as a direct torchvision call (same kernel family)
    y = feat.clone().to(dev).requires_grad_(True)
    ref_tv = torchvision.ops.roi_align(y, rois.to(dev), 5, 0.25, sampling_ratio, aligned)
    ref_tv.backward(grad.to(dev))
    torch.testing.assert_close(out, ref_tv, rtol=0, atol=0)
    torch.testing.assert_close(x.grad, y.grad, rtol=0, atol=0)

    # 2) the definition, in float64 (forward value, and the backward through autograd of the definition)
    z = feat.clone().double().requires_grad_(True)
    ref = roi_align_reference(z, rois.double(), 5, 0.25, sampling_ratio, aligned)
    ref.backward(grad.double())
    torch.testing.assert_close(out.detach().cpu().double(), ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.cpu().double(), z.grad, rtol=1e-5, atol=1e-5)

    # 3) in float64 our op is the definition to rounding
    w = feat.clone().double().to(dev).requires_grad_(True)
    out64 = RoIAlign(5, 0.25, sampling_ratio, "avg", aligned)(w, rois.double().to(dev))
    out64.backward(grad.double().to(dev))
    torch.testing.assert_close(out64.detach().cpu(), ref.detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(w.grad.cpu(), z.grad, rtol=1e-10, atol=1e-10)


def test_roi_align_max_mode_is_refused():
    feat, rois = torch.randn(1, 2, 8, 8), torch.tensor([[0.0, 1.0, 1.0, 6.0, 6.0]])
    with pytest.raises(NotImplementedError, match="pool_mode='max'"):
        roi_align(feat, rois, 2, 1.0, 0, "max", True)


def test_missing_op_names_op_and_setting():
    boxes, scores = torch.tensor([[0.0, 0.0, 4.0, 4.0]]), torch.tensor([0.9])
    with pytest.raises(NotImplementedError, match=r"'softnms'.*soft_nms"):
        soft_nms(boxes, scores, 0.5)
    ext = mmcv_ext.install()
    with pytest.raises(NotImplementedError, match=r"'deform_conv_forward'.*DCN"):
        ext.deform_conv_forward()
    with pytest.raises(NotImplementedError, match="'some_future_op'"):
        ext.some_future_op(1, 2)


def test_install_is_idempotent_and_registered():
    import sys

    ext = mmcv_ext.install()
    assert mmcv_ext.install() is ext
    assert sys.modules["mmcv._ext"] is ext
    assert callable(ext.nms) and callable(ext.roi_align_forward) and callable(ext.roi_align_backward)
