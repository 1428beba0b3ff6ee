"""Recognition with a trained mmdetection detector: ``python -m trainers.recognize --detector CKPT --det-config
NAME --retriever CKPT|model.onnx --bank BANK --images DIR|ANN.json --out results.json [--eval GT.json]``.

The pipeline, options and output are those of ``python -m inference.recognize`` (which takes the detector as
an object and needs no detection framework); this module only builds that object from an mmengine config and
its weights, with our mmcv op shim installed first. It lives here because loading the detector needs
``trainers`` (the shim, the config resolution), and ``inference`` never imports ``trainers``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from trainers import mmcv_ext

mmcv_ext.install()  # before anything imports mmcv.ops

from inference import recognize as rec  # noqa: E402
from trainers import det_checkpoint  # noqa: E402
from trainers.detection import load_det_config, parse_cfg_options, resolve_data  # noqa: E402

log = logging.getLogger(__name__)


class MMDetector:
    """A trained mmdetection model as ``inference.recognize.Detector``: RGB arrays in (batched), boxes in the
    original image's pixels out, detections under ``score_thr`` dropped. ``classes``: its class names."""

    def __init__(self, model, pipeline, classes: list[str], score_thr: float) -> None:
        self.model, self.pipeline, self.classes, self.score_thr = model, pipeline, classes, score_thr

    @torch.no_grad()
    def __call__(self, images: list[np.ndarray]) -> list[rec.Detections]:
        from mmengine.dataset import pseudo_collate

        items = [
            self.pipeline({"img": np.ascontiguousarray(img[..., ::-1]), "img_id": i, "img_path": ""})
            for i, img in enumerate(images)
        ]  # fmt: skip  (mmdet reads BGR, as cv2 loads files)
        out = []
        for sample in self.model.test_step(pseudo_collate(items)):
            pred = sample.pred_instances
            keep = pred.scores >= self.score_thr
            out.append(rec.Detections(pred.bboxes[keep].cpu().numpy(), pred.scores[keep].cpu().numpy(),
                                      pred.labels[keep].cpu().numpy()))  # fmt: skip
        return out


def _num_classes_in(state: dict) -> int | None:
    """Classes of a detector's weights, read from its (last) box classifier: rows = classes + background."""
    heads = [k for k in state if k.endswith("fc_cls.weight")]
    return int(state[sorted(heads)[-1]].shape[0]) - 1 if heads else None


def load_detector(config: str, checkpoint: str, device: str = "cpu", score_thr: float = 0.3,
                  cfg_options: Sequence[str] | dict | None = None) -> MMDetector:  # fmt: skip
    """Build the detector of an mmengine config (``configs/NAME.py`` or a file) and load its weights."""
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    from mmengine.dataset import Compose
    from mmengine.runner import load_checkpoint

    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"detector checkpoint {path} does not exist")
    register_all_modules()
    cfg = load_det_config(config, parse_cfg_options(cfg_options))
    classes = resolve_data(cfg)
    state = det_checkpoint.load(path, map_location="cpu")  # weights-only, errors name the file
    state = state.get("state_dict", state)
    found = _num_classes_in(state)
    if found is not None and found != len(classes):
        hint = " (per-class weights: add --det-cfg-options class_agnostic=False)" if found > 1 else ""
        raise ValueError(f"detector checkpoint {path} has {found} classes but config {config} resolves "
                         f"{len(classes)}{hint}")  # fmt: skip
    model = MODELS.build(cfg.model)
    load_checkpoint(model, str(path), map_location="cpu", logger="silent")
    model.to(device).eval()
    resize = next(t for t in cfg.test_dataloader.dataset.pipeline if t["type"] == "Resize")
    pipeline = Compose([
        dict(type="mmdet.LoadImageFromNDArray"),
        dict(resize),
        dict(type="mmdet.PackDetInputs", meta_keys=("img_id", "img_path", "ori_shape", "img_shape", "scale_factor")),
    ])  # fmt: skip
    log.info("detector %s (%s): %d class(es), boxes with score >= %.2f", path, config, len(classes), score_thr)
    return MMDetector(model, pipeline, classes, score_thr)


def detector_from_args(args) -> MMDetector:
    if not args.det_config:
        raise ValueError("--detector needs --det-config NAME (the detector's mmengine config, e.g. det_demo)")
    return load_detector(args.det_config, args.detector, args.device, args.det_score, args.det_cfg_options)


def main(argv: Sequence[str] | None = None) -> int:
    parser = rec.build_parser()
    parser.prog = "python -m trainers.recognize"
    parser.add_argument("--det-cfg-options", nargs="+", default=[], help="key=value overrides of the det config")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return rec.run_cli(args, detector_from_args)
    except (FileNotFoundError, ValueError) as exc:
        log.error("%s", exc)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
