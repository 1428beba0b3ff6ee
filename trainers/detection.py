"""Detector training on mmengine/mmdetection: ``python trainers/detection.py --config det_demo [--resume]``.

Loads an mmengine config from ``configs/``, resolves its data settings (``data_root``, ``class_agnostic``,
classes from the annotation files), and trains with ``Runner.from_cfg``: TensorBoard, CocoMetric (bbox mAP,
AP50) at each evaluation, the best checkpoint kept and exported as ``mAPxx.x.pth``.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from trainers import det_checkpoint, mmcv_ext  # noqa: E402

mmcv_ext.install()  # before anything imports mmcv.ops

from mmengine.config import Config, DictAction  # noqa: E402
from mmengine.hooks import Hook  # noqa: E402
from mmengine.runner import CheckpointLoader, Runner  # noqa: E402

from trainers.checkpoint import save_best  # noqa: E402
from trainers.det_options import check_cfg_options  # noqa: E402
from trainers.detection_data import DetrCocoDataset, category_names  # noqa: E402

log = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[1]


def _load_local_checkpoint(filename: str, map_location=None):
    """mmengine's loader for local files: always weights-only (see ``trainers/det_checkpoint.py``)."""
    return det_checkpoint.load(filename, map_location=map_location)


CheckpointLoader.register_scheme(prefixes="", loader=_load_local_checkpoint, force=True)


def load_det_config(name_or_path: str | os.PathLike, cfg_options: dict | None = None) -> Config:
    """The mmengine config ``configs/NAME.py`` (or a file path) with ``--cfg-options`` merged in."""
    path = Path(name_or_path)
    if not path.is_file():
        from configs import config_kind, config_path

        path = config_path(str(name_or_path))
        if config_kind(str(name_or_path)) != "mmengine":
            raise ValueError(f"config {name_or_path!r} is a dataclass config; use trainers/retrieval.py for it")
    cfg = Config.fromfile(str(path))
    if cfg_options:
        check_cfg_options(cfg, cfg_options)
        cfg.merge_from_dict(cfg_options)
    return cfg


def _datasets(node):
    """Every dataset dict under a dataset config (through ConcatDataset / RepeatDataset / MultiImageMix wrappers)."""
    if isinstance(node, list):
        for item in node:
            yield from _datasets(item)
    elif isinstance(node, dict):
        children = node.get("datasets", node.get("dataset"))
        if children is None:
            yield node
        else:
            yield from _datasets(children)


def _set_num_classes(node, n: int) -> int:
    """Set every ``num_classes`` key in the model config; returns how many were set."""
    count = 0
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "num_classes":
                node[key] = n
                count += 1
            else:
                count += _set_num_classes(value, n)
    elif isinstance(node, list):
        count += sum(_set_num_classes(v, n) for v in node)
    return count


def _resolve_root(data_root: str) -> str:
    """A relative ``data_root`` is taken from the working directory when it exists there, else from the repo."""
    root = Path(data_root)
    if not root.is_absolute() and not root.exists():
        root = REPO / root
    return str(root) + os.sep


def resolve_data(cfg: Config) -> list[str]:
    """Copy ``data_root`` / ``class_agnostic`` into every dataset, set heads' ``num_classes``; returns the classes."""
    data_root = _resolve_root(cfg.get("data_root", ""))
    if cfg.get("make_sample") and not Path(data_root, "query.json").is_file():
        from datasets.sample import ensure_sample

        log.info("generating the retail sample under %s", data_root)
        ensure_sample(data_root)
    agnostic = bool(cfg.get("class_agnostic", False))
    for loader in ("train_dataloader", "val_dataloader", "test_dataloader"):
        if cfg.get(loader) is None:
            continue
        for ds in _datasets(cfg[loader]["dataset"]):
            ds["data_root"] = data_root
            if ds.get("type") == "DetrCocoDataset":
                ds["class_agnostic"] = agnostic
    _check_annotations(cfg, data_root)
    train = [ds for ds in _datasets(cfg.train_dataloader["dataset"]) if ds.get("type") == "DetrCocoDataset"]
    if agnostic:
        classes = ["object"]
    elif train and train[0].get("metainfo", {}).get("classes"):
        classes = list(train[0]["metainfo"]["classes"])
    elif train:
        classes = list(category_names(Path(data_root, train[0]["ann_file"])))
    else:
        return []
    if _set_num_classes(cfg.model, len(classes)):
        log.info("%d class(es)%s: %s", len(classes), " (class-agnostic)" if agnostic else "", ", ".join(classes[:10]))
    cfg.num_classes = len(classes)
    return classes


def _check_annotations(cfg: Config, data_root: str) -> None:
    """Every dataset's annotation file exists, before a run directory or a Runner is made."""
    for loader in ("train_dataloader", "val_dataloader", "test_dataloader"):
        for ds in _datasets(cfg[loader]["dataset"]) if cfg.get(loader) else ():
            ann = ds.get("ann_file")
            if ds.get("type") == "DetrCocoDataset" and ann and not Path(data_root, ann).is_file():
                raise FileNotFoundError(
                    f"{loader}: annotation file {Path(data_root, ann)} does not exist (data_root={data_root!r}; "
                    "set it with --cfg-options data_root=DIR)"
                )


class _MetricsRecorder(Hook):
    """Keeps the metrics of the latest evaluation (what ``run`` returns)."""

    priority = "LOWEST"

    def __init__(self) -> None:
        self.metrics: dict[str, float] = {}

    def after_val_epoch(self, runner, metrics=None) -> None:
        self.metrics = {k: float(v) for k, v in (metrics or {}).items() if isinstance(v, (int, float))}


def _default_run_dir(name: str, resume: bool) -> Path:
    base = REPO / "runs" / name
    if resume:
        candidates = sorted(p for p in base.glob("*") if (p / "last_checkpoint").is_file())
        if not candidates:
            raise FileNotFoundError(f"--resume: no run with a checkpoint under {base}; pass --work-dir")
        return candidates[-1]
    return base / (os.environ.get("SLURM_JOB_ID") or time.strftime("%Y%m%d_%H%M%S"))


def _export_best(runner: Runner, run_dir: Path) -> Path | None:
    """Write the best checkpoint's weights as ``mAPxx.x.pth`` (the seed's name for best weights)."""
    best = runner.message_hub.get_info("best_ckpt")
    score = runner.message_hub.get_info("best_score")
    if not best or score is None or not Path(best).is_file():
        return None
    state = _load_local_checkpoint(best, map_location="cpu")
    weights = {"state_dict": state["state_dict"], "meta": {"best_score": float(score), "source": best}}
    out = save_best(weights, run_dir, float(score))  # atomic; a full disk says so with the bytes needed
    log.info("best weights (bbox mAP %.3f) -> %s", score, out)
    return out


class _StopOnSignal(Hook):
    """SIGUSR2 / SIGTERM (SLURM preemption, time limit): save a resumable checkpoint after the current
    iteration, point ``last_checkpoint`` at it and exit with 128 + signal (the launcher then requeues with
    resume). A resumed run restarts the interrupted epoch's data order from its start."""

    priority = "VERY_LOW"
    SIGNALS = (signal.SIGUSR2, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self.previous: dict[int, object] = {}

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            self.previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

    def uninstall(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        log.warning("signal %d: saving a checkpoint after this iteration, then exiting", signum)
        self.signum = signum

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        if self.signum is None:
            return
        name = f"preempted_iter_{runner.iter + 1}.pth"
        runner.save_checkpoint(runner.work_dir, name, by_epoch=False)  # meta: epoch so far, iter + 1
        Path(runner.work_dir, "last_checkpoint").write_text(str(Path(runner.work_dir, name)))
        raise SystemExit(128 + self.signum)


def _cpu_distributed(cfg: Config) -> None:
    """Multi-process training on CPU: mmengine 0.10.7's pytorch launcher calls ``torch.cuda.set_device`` and
    wraps DDP with ``device_ids=[LOCAL_RANK]``; both fail without GPUs, so start gloo here and wrap without ids."""
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="gloo")
    cfg.model_wrapper_cfg = dict(
        type="MMDistributedDataParallel",
        device_ids=None,
        broadcast_buffers=False,
        find_unused_parameters=cfg.get("find_unused_parameters", False),
    )


def _prepare(cfg: Config, run_dir: Path, resume: bool | str, amp: bool) -> None:
    """Point the config at ``run_dir`` (work dir, TensorBoard in ``tb/``), resume / load_from, AMP."""
    cfg.work_dir = str(run_dir)
    cfg.resume = bool(resume)
    if resume and resume not in (True, "auto"):
        cfg.load_from = str(resume)  # resume from this checkpoint file
    elif resume:
        cfg.load_from = None  # Runner resumes from run_dir/last_checkpoint (starts fresh when there is none)
    elif cfg.get("load_from") and not Path(cfg.load_from).is_file():
        raise FileNotFoundError(
            f"load_from={cfg.load_from!r} does not exist (weights are local files here, never downloaded); "
            "put the checkpoint there or pass --cfg-options load_from=None"
        )
    if cfg.get("launcher", "none") == "none" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        cfg.launcher = "pytorch"  # torchrun / submitit exported RANK, WORLD_SIZE, MASTER_ADDR: train synced
    if cfg.get("launcher", "none") != "none" and not torch.cuda.is_available():
        _cpu_distributed(cfg)
    if amp:  # the same switch as mmdet's tools/train.py --amp
        cfg.optim_wrapper.type = "AmpOptimWrapper"
        cfg.optim_wrapper.loss_scale = "dynamic"
    cfg.get("visualizer", {}).pop("name", None)  # a fixed name would reuse an earlier run's visualiser instance
    for backend in cfg.get("visualizer", {}).get("vis_backends", []):
        if backend.get("type") == "TensorboardVisBackend" and not backend.get("save_dir"):
            backend["save_dir"] = str(run_dir / "tb")


def run(
    cfg_name_or_path: str | os.PathLike,
    run_dir: str | os.PathLike | None = None,
    resume: bool | str = False,
    cfg_options: dict | list[str] | None = None,
    amp: bool = False,
) -> dict[str, float]:
    """Train (and evaluate) a detector; returns the last evaluation's metrics plus ``best/coco/bbox_mAP``.

    ``resume``: True / "auto" = the newest checkpoint in ``run_dir``, or a checkpoint path. ``cfg_options``:
    mmengine ``--cfg-options`` as a dict (string values are parsed like the command line) or ``k=v`` strings.
    """
    cfg = load_det_config(cfg_name_or_path, parse_cfg_options(cfg_options))
    name = Path(str(cfg_name_or_path)).stem
    run_dir = Path(run_dir or _default_run_dir(name, bool(resume))).resolve()
    resolve_data(cfg)
    _prepare(cfg, run_dir, resume, amp)
    run_dir.mkdir(parents=True, exist_ok=True)  # only once the config and its data checked out
    runner = Runner.from_cfg(cfg)
    recorder, stopper = _MetricsRecorder(), _StopOnSignal()
    runner.register_hook(det_checkpoint.PlainStateHook())
    runner.register_hook(recorder)
    runner.register_hook(stopper)
    stopper.install()
    try:
        runner.train()
    finally:
        stopper.uninstall()
    metrics = dict(recorder.metrics)
    best = runner.message_hub.get_info("best_score")
    if best is not None:
        metrics["best/coco/bbox_mAP"] = float(best)
    _export_best(runner, run_dir)
    return metrics


def parse_cfg_options(options: dict | list[str] | tuple[str, ...] | None) -> dict:
    """mmengine's typed ``--cfg-options`` dict from ``["a.b=1", "c=x"]`` or ``{"a.b": "1"}``; typed values pass."""
    if not options:
        return {}
    if isinstance(options, dict):
        typed = {k: v for k, v in options.items() if not isinstance(v, str)}
        pairs = [f"{k}={v}" for k, v in options.items() if isinstance(v, str)]
    else:
        typed, pairs = {}, list(options)
    parser = argparse.ArgumentParser()
    parser.add_argument("--cfg-options", nargs="+", action=DictAction, default={})
    parsed = parser.parse_args(["--cfg-options", *pairs]).cfg_options if pairs else {}
    return {**parsed, **typed}


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description="Train a detector (mmengine Runner) from configs/NAME.py")
    parser.add_argument("--config", required=True, help="config name in configs/ (det_*) or a config file")
    parser.add_argument("--cfg-options", nargs="+", action=DictAction, default={}, help="key=value overrides")
    parser.add_argument("--resume", action="store_true", help="resume the newest run (or --work-dir)")
    parser.add_argument("--work-dir", default=None, help="run directory (default runs/NAME/<job id or time>)")
    parser.add_argument("--amp", action="store_true", help="mixed precision (AmpOptimWrapper)")
    parser.add_argument("--launcher", default="none", choices=["none", "pytorch", "slurm"], help="distributed launch")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    options = dict(args.cfg_options)
    if args.launcher != "none":
        options["launcher"] = args.launcher
    metrics = run(args.config, run_dir=args.work_dir, resume=args.resume, cfg_options=options, amp=args.amp)
    for key, value in sorted(metrics.items()):
        print(f"{key}\t{value:.4f}")
    return metrics


__all__ = ["DetrCocoDataset", "load_det_config", "main", "resolve_data", "run"]

if __name__ == "__main__":
    from configs.cli import run_cli

    sys.exit(run_cli(main))
