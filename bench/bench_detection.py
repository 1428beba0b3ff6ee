"""BCCD quality bar: the det_demo-sized Cascade R-CNN + Swin trained from scratch on CPU, train split -> val split.

``python bench/bench_detection.py --epochs 6`` converts ../shared/data/bccd (VOC) to COCO JSON, trains, and
prints a markdown table row: bbox mAP, mAP50, per-epoch time, total wall time.
"""

from __future__ import annotations

import argparse
import logging
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from datasets.voc import convert  # noqa: E402
from trainers import detection  # noqa: E402


def bccd_options(voc_root: Path, ann_dir: Path, args) -> dict:
    """--cfg-options that point det_demo at BCCD (one train dataset instead of query + gallery)."""
    images = str(voc_root / "JPEGImages") + "/"
    cfg = detection.load_det_config("det_demo")
    train = dict(
        _delete_=True,
        type="DetrCocoDataset",
        data_root=str(ann_dir),
        ann_file="train.json",
        data_prefix=dict(img=images),
        filter_cfg=dict(filter_empty_gt=True, min_size=8),
        pipeline=cfg.train_pipeline,
    )
    return {
        "data_root": str(ann_dir),
        "make_sample": False,
        "class_agnostic": args.class_agnostic,
        "train_dataloader.dataset": train,
        "train_dataloader.num_workers": args.workers,
        "train_dataloader.persistent_workers": args.workers > 0,
        "val_dataloader.num_workers": args.workers,
        "val_dataloader.persistent_workers": args.workers > 0,
        "val_dataloader.dataset.ann_file": "val.json",
        "val_dataloader.dataset.split": None,
        "val_dataloader.dataset.data_prefix": dict(img=images),
        "train_cfg.max_epochs": args.epochs,
        "train_cfg.val_interval": args.val_interval,
        "param_scheduler.1.T_max": args.epochs,
        "param_scheduler.1.end": args.epochs,
        "default_hooks.logger.interval": 20,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bccd", default=str(REPO.parent / "shared" / "data" / "bccd" / "BCCD"))
    parser.add_argument("--out", default=str(REPO / "runs" / "bench_detection"))
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--val-interval", type=int, default=2)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--class-agnostic", action="store_true")
    # one intra-op thread: on a shared 2-core machine two OpenMP threads stall each other (measured 0.2-8.6 s
    # per iteration with 2 threads vs a steady 0.32 s with 1)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    voc_root, out = Path(args.bccd), Path(args.out)
    ann_dir = out / "bccd_coco"
    convert(voc_root, ann_dir, ("train", "val"))
    start = time.perf_counter()
    metrics = detection.run(
        "det_demo", run_dir=out / time.strftime("%Y%m%d_%H%M%S"), cfg_options=bccd_options(voc_root, ann_dir, args)
    )
    wall = time.perf_counter() - start
    mode = "class-agnostic" if args.class_agnostic else "3 classes"
    device = platform.processor() or platform.machine()
    print(f"device: {device}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print("| run | epochs | bbox mAP | bbox mAP50 | wall time | s / epoch |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    print(
        f"| BCCD train -> val, det_demo, {mode} | {args.epochs} | {metrics['coco/bbox_mAP']:.3f} | "
        f"{metrics['coco/bbox_mAP_50']:.3f} | {wall / 60:.1f} min | {wall / args.epochs:.0f} |"
    )


if __name__ == "__main__":
    main()
