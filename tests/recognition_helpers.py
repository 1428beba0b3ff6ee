"""Shared pieces of the recognition tests: a tiny random retriever run, library records of the sample, a bank."""

from __future__ import annotations

from pathlib import Path

import torch

from configs import load_config, save_config


def make_retriever_run(folder: Path, sample_root: Path, seed: int = 0, overrides: tuple[str, ...] = ()) -> Path:
    """A retrieval "run directory" like the trainer's: best weights ``mAP1.0.pth`` + ``config.json``
    (retr_demo with timm's tiny ``test_resnet`` backbone, random weights)."""
    from inference.models import build_model

    cfg = load_config("retr_demo", ["model.backbone=test_resnet", f"data.root={sample_root}", *overrides])
    torch.manual_seed(seed)
    model = build_model(cfg.model, 24, img_size=(cfg.data.height, cfg.data.width)).eval()
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), folder / "mAP1.0.pth")
    save_config(cfg, folder / "config.json")
    return folder / "mAP1.0.pth"


def library(sample_root: Path, per_sku: int = 1):
    """The sample's library records, ``per_sku`` images of each SKU (fewer crops keep tests fast)."""
    from datasets.coco import read_coco

    records, seen = [], {}
    for rec in read_coco(sample_root)["gallery"]:
        seen[rec.identity] = seen.get(rec.identity, 0) + 1
        if seen[rec.identity] <= per_sku:
            records.append(rec)
    return records
