"""The mmdetection detector behind ``python -m trainers.recognize``: built from det_demo with its weights,
batched, boxes in original pixels; weights that do not fit the config are a clear error."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("mmdet")

from trainers import recognize as det_recognize  # noqa: E402  (installs the mmcv op shim first)


@pytest.fixture(scope="module")
def sample_root(tmp_path_factory) -> Path:
    from datasets.sample import ensure_sample

    return Path(ensure_sample(tmp_path_factory.mktemp("sample") / "retail"))


def random_weights(path: Path, data_root: Path, agnostic: bool) -> Path:
    """det_demo with random weights saved like the trainer's ``mAPxx.x.pth``."""
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules

    from trainers.detection import load_det_config, resolve_data

    register_all_modules()
    cfg = load_det_config("det_demo", {"data_root": f"{data_root}/", "class_agnostic": agnostic})
    resolve_data(cfg)
    torch.manual_seed(0)
    torch.save({"state_dict": MODELS.build(cfg.model).state_dict(), "meta": {}}, path)
    return path


def test_detector_runs_batched_on_rgb_arrays(tmp_path, sample_root):
    weights = random_weights(tmp_path / "mAP0.0.pth", sample_root, agnostic=False)
    det = det_recognize.load_detector("det_demo", str(weights), score_thr=0.0,
                                      cfg_options=[f"data_root={sample_root}/", "class_agnostic=False"])  # fmt: skip
    assert len(det.classes) == 24
    images = [np.zeros((240, 320, 3), np.uint8), np.full((120, 200, 3), 128, np.uint8)]
    out = det(images)
    assert len(out) == 2
    for d, img in zip(out, images):
        assert d.boxes.shape[1] == 4 and len(d.boxes) == len(d.scores) == len(d.labels)
        assert (d.boxes[:, 2] <= img.shape[1] + 1e-3).all() and (d.boxes[:, 3] <= img.shape[0] + 1e-3).all()
        assert set(d.labels.tolist()) <= set(range(24))
    with pytest.raises(ValueError, match="has 24 classes but config det_demo resolves 1.*class_agnostic=False"):
        det_recognize.load_detector("det_demo", str(weights), cfg_options=[f"data_root={sample_root}/"])


def test_a_file_that_could_run_code_is_refused(tmp_path, sample_root):
    state = tmp_path / "epoch_1.pth"
    torch.save({"state_dict": {}, "message_hub": argparse.Namespace(step=1)}, state)  # not weights-only
    with pytest.raises(ValueError, match="holds Python objects besides tensors"):
        det_recognize.load_detector("det_demo", str(state), cfg_options=[f"data_root={sample_root}/"])


@pytest.mark.slow  # minutes on a loaded 2-core machine: a random detector's many boxes are all embedded
def test_demo_reuses_checkpoints_builds_the_bank_and_prints_the_table(tmp_path, sample_root, capsys):
    from tests.recognition_helpers import make_retriever_run
    from trainers import recognize_demo

    work = tmp_path / "demo"
    (work / "det").mkdir(parents=True)
    random_weights(work / "det" / "mAP0.0.pth", sample_root, agnostic=True)
    make_retriever_run(work / "retr", sample_root)
    args = ["--work-dir", str(work), "--data-root", str(sample_root), "--det-score", "0.6", "--pictures", "2",
            "--no-progress"]  # fmt: skip
    assert recognize_demo.main(args) == 0
    out = capsys.readouterr().out
    assert "| (a) | detector | one class |" in out and "| (d) | ground truth | retrieval |" in out
    assert "images/s" in out and (work / "results.json").is_file() and (work / "bank" / "CURRENT").is_file()
    assert len(list((work / "results_pictures").glob("*.png"))) == 2 and list((work / "tb").glob("events.*"))
