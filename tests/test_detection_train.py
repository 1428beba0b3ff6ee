"""End to end: det_demo trains a few iterations on the generated sample on CPU, evaluates, and resumes."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch

pytest.importorskip("mmdet")

from mmengine.config import Config  # noqa: E402
from mmengine.logging import HistoryBuffer  # noqa: E402

from configs import config_path  # noqa: E402
from trainers import det_checkpoint, detection  # noqa: E402  (installs mmcv._ext first)


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
    second = detection._load_local_checkpoint(str(run_dir / "epoch_2.pth"))
    assert second["meta"]["epoch"] == 2
    assert first.stat().st_mtime_ns == stamp
    logs = "".join(p.read_text() for p in run_dir.rglob("*.log"))
    assert "resumed epoch: 1" in logs


class _Planted:
    """A pickle another user could leave in a run directory: loading it with full unpickling creates a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_checkpoints_are_weights_only_and_planted_files_run_no_code(tmp_path, trained):
    run_dir = trained[1]
    ours = run_dir / "epoch_1.pth"
    assert torch.serialization.get_unsafe_globals_in_checkpoint(ours) == []  # no pickled Python objects
    state = detection._load_local_checkpoint(str(ours))
    assert state["meta"][det_checkpoint.FORMAT_KEY] == det_checkpoint.FORMAT
    buffers = state["message_hub"]["log_scalars"]
    assert buffers and all(isinstance(b, HistoryBuffer) for b in buffers.values())
    assert "state_dict" in detection._load_local_checkpoint(str(next(run_dir.glob("mAP*.pth"))))

    marker = tmp_path / "code-ran"
    planted = run_dir / "epoch_9.pth"  # inside our own run directory
    torch.save({"meta": {"epoch": 9}, "state_dict": {}, "message_hub": _Planted(marker)}, planted)
    try:
        with pytest.raises(ValueError, match=f"checkpoint {planted} holds Python objects") as err:
            detection._load_local_checkpoint(str(planted))
        assert "weights_only=False" not in str(err.value)
        # a weights-only file whose meta.config is Python source: mmengine's resume would execute it
        foreign = dict(torch.load(ours, weights_only=True))
        foreign["meta"] = {**foreign["meta"], "config": f"open({str(marker)!r}, 'w')\n"}
        torch.save(foreign, planted)
        assert "config" not in detection._load_local_checkpoint(str(planted))["meta"]
        del foreign["meta"][det_checkpoint.FORMAT_KEY]
        torch.save(foreign, planted)
        with pytest.raises(ValueError, match="without the 'detretr_format' marker"):
            detection._load_local_checkpoint(str(planted))
        planted.write_bytes(ours.read_bytes()[:5000])
        with pytest.raises(ValueError, match="is not a torch file, or it is truncated"):
            detection._load_local_checkpoint(str(planted))
    finally:
        planted.unlink()
    assert not marker.exists(), "a planted checkpoint ran code"


def test_missing_load_from_is_a_clear_error(tmp_path, sample_root):
    config = tiny_demo(tmp_path, sample_root)
    with pytest.raises(FileNotFoundError, match="load_from"):
        detection.run(config, run_dir=tmp_path / "run", cfg_options={"load_from": "weights/nope.pth"})


@pytest.mark.parametrize(
    "options, message",
    [
        (["train_cfg.max_epoch=2"], "--cfg-options train_cfg.max_epoch: unknown key 'max_epoch' in train_cfg"),
        (["train_cfg.max_epochs=two"], "--cfg-options train_cfg.max_epochs='two': expected an integer"),
        (["model.backbone.depthx=3"], "unknown key 'depthx' in model.backbone"),
        (["make_sample=False", "data_root=NOWHERE"], "train_dataloader: annotation file NOWHERE/query.json does not"),
    ],
)
def test_bad_options_and_data_are_one_line_and_leave_no_run_dir(tmp_path, capsys, options, message):
    from configs.cli import run_cli

    options = [o.replace("NOWHERE", str(tmp_path / "nowhere")) for o in options]
    message = message.replace("NOWHERE", str(tmp_path / "nowhere"))
    runs = detection.REPO / "runs" / "det_demo"
    before = set(runs.iterdir()) if runs.is_dir() else set()
    work = tmp_path / "run"
    for where in (["--work-dir", str(work)], []):  # an explicit run dir, and the default runs/det_demo/<time>
        assert run_cli(detection.main, ["--config", "det_demo", *where, "--cfg-options", *options]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
    assert not work.exists()
    assert (set(runs.iterdir()) if runs.is_dir() else set()) == before, "a failed try left a run directory"
    assert detection.load_det_config("det_demo", {"model.backbone.drop_path_rate": 0.3}).model.backbone.drop_path_rate


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
