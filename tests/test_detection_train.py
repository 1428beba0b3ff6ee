"""End to end: det_demo trains a few iterations on the generated sample on CPU, evaluates, and resumes."""

from __future__ import annotations

import os
import pickle
import shutil
import signal
from pathlib import Path

import pytest
import torch

pytest.importorskip("mmdet")

from mmengine.config import Config  # noqa: E402

from configs import config_path  # noqa: E402
from trainers import detection  # noqa: E402  (installs mmcv._ext first)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core CI box two OpenMP threads stall each other (10x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def sample_root(tmp_path_factory) -> Path:
    from datasets.sample import ensure_sample

    return Path(ensure_sample(tmp_path_factory.mktemp("sample") / "retail"))


def tiny_demo(tmp_path: Path, data_root: Path, epochs: int = 1) -> Path:
    """det_demo shrunk for a test: 4 + 4 training images at 128x96, 4 validation images, no workers."""
    cfg = Config.fromfile(str(config_path("det_demo")))
    cfg.data_root = str(data_root)
    for ds in detection._datasets(cfg.train_dataloader.dataset):
        ds.indices = 4
        next(t for t in ds.pipeline if t.type == "RandomResize").scale = (128, 96)
    val = cfg.val_dataloader.dataset
    val.indices = 4
    next(t for t in val.pipeline if t.type == "Resize").scale = (128, 96)
    for loader in (cfg.train_dataloader, cfg.val_dataloader):
        loader.num_workers, loader.persistent_workers = 0, False
    cfg.test_dataloader = cfg.val_dataloader
    cfg.train_cfg.max_epochs, cfg.train_cfg.val_interval = epochs, 1
    cfg.param_scheduler = [dict(type="ConstantLR", factor=1.0, by_epoch=True)]
    cfg.default_hooks.logger.interval = 1
    path = tmp_path / "det_tiny.py"
    cfg.dump(str(path))
    return path


def _scalars(tb_dir: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags: set[str] = set()
    for events in tb_dir.rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events))
        acc.Reload()
        tags.update(acc.Tags()["scalars"])
    return tags


@pytest.fixture(scope="module")
def trained(tmp_path_factory, sample_root) -> tuple[Path, Path, dict, dict]:
    """(config, run dir, metrics, preemption facts) of the tiny det_demo: stopped by SIGUSR2 in its first
    iteration (as SLURM preempts), then resumed with ``resume="auto"`` to the end of epoch 1."""
    tmp_path = tmp_path_factory.mktemp("det_run")
    config = tiny_demo(tmp_path, sample_root)
    run_dir = tmp_path / "run"
    sent = []

    def send_once(self, runner, **kwargs):
        if not sent:
            sent.append(True)
            os.kill(os.getpid(), signal.SIGUSR2)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(detection._MetricsRecorder, "after_train_iter", send_once, raising=False)
        with pytest.raises(SystemExit) as stop:
            detection.run(config, run_dir=run_dir)
    preempted = {
        "code": stop.value.code,
        "last": Path((run_dir / "last_checkpoint").read_text()),
        "handler": signal.getsignal(signal.SIGUSR2),
    }
    metrics = detection.run(config, run_dir=run_dir, resume="auto", cfg_options=["default_hooks.logger.interval=1"])
    return config, run_dir, metrics, preempted


def test_preemption_signal_saves_state_and_exits(trained):
    run_dir, preempted = trained[1], trained[3]
    assert preempted["code"] == 128 + signal.SIGUSR2
    assert preempted["last"].name.startswith("preempted_iter_") and preempted["last"].is_file()
    assert preempted["handler"] is signal.SIG_DFL  # the handler is ours only while training
    assert "resumed epoch: 0" in "".join(p.read_text() for p in run_dir.rglob("*.log"))


def test_det_demo_trains_evaluates_and_resumes(trained):
    config, run_dir, metrics, _ = trained
    assert {"coco/bbox_mAP", "coco/bbox_mAP_50", "best/coco/bbox_mAP"} <= set(metrics)
    assert 0.0 <= metrics["coco/bbox_mAP_50"] <= 1.0
    first = run_dir / "epoch_1.pth"
    assert first.is_file() and (run_dir / "last_checkpoint").is_file()
    assert list(run_dir.glob("best_coco_bbox_mAP_epoch_1.pth"))
    best = list(run_dir.glob("mAP*.pth"))
    assert len(best) == 1 and set(torch.load(best[0], weights_only=True)) == {"state_dict", "meta"}
    assert {"loss", "lr", "coco/bbox_mAP", "coco/bbox_mAP_50"} <= _scalars(run_dir / "tb")
    stamp = first.stat().st_mtime_ns

    # resume through the CLI entry point: continues at epoch 2 without redoing epoch 1
    args = ["--config", str(config), "--work-dir", str(run_dir), "--resume", "--cfg-options", "train_cfg.max_epochs=2"]
    detection.main(args)
    second = torch.load(run_dir / "epoch_2.pth", map_location="cpu", weights_only=False)
    assert second["meta"]["epoch"] == 2
    assert first.stat().st_mtime_ns == stamp
    logs = "".join(p.read_text() for p in run_dir.rglob("*.log"))
    assert "resumed epoch: 1" in logs


def test_untrusted_checkpoints_load_weights_only(tmp_path, trained):
    run_dir = trained[1]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    foreign = shutil.copy(run_dir / "epoch_1.pth", elsewhere / "epoch_1.pth")
    detection._TRUSTED_DIRS.discard(elsewhere.resolve())
    with pytest.raises(pickle.UnpicklingError):
        detection._load_local_checkpoint(str(foreign))  # mmengine's full state is refused outside our run dirs
    weights = shutil.copy(next(run_dir.glob("mAP*.pth")), elsewhere / "weights.pth")
    assert "state_dict" in detection._load_local_checkpoint(str(weights))  # plain weights load fine
    assert "message_hub" in detection._load_local_checkpoint(str(run_dir / "epoch_1.pth"))


def test_missing_load_from_is_a_clear_error(tmp_path, sample_root):
    config = tiny_demo(tmp_path, sample_root)
    with pytest.raises(FileNotFoundError, match="load_from"):
        detection.run(config, run_dir=tmp_path / "run", cfg_options={"load_from": "weights/nope.pth"})


@pytest.mark.slow
def test_two_cpu_processes_train_synced(tmp_path, sample_root):
    import subprocess
    import sys

    config = tiny_demo(tmp_path, sample_root)
    script = Path(detection.__file__)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    cmd += ["--config", str(config), "--work-dir", str(tmp_path / "run")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Distributed training: True" in proc.stdout + proc.stderr
    assert (tmp_path / "run" / "epoch_1.pth").is_file()
