"""Evaluate a retrieval model on the query/gallery shards (mAP, Rank-1/5/10, mINP), in-process or as a CLI:
``python -m inference.evaluate --config NAME --checkpoint PATH [--flip] [--rerank] [overrides]``."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn

from configs import ExperimentConfig, load_config
from inference.extract import extract_features, sort_by_index
from inference.metrics import evaluate_ranking
from inference.models import load_model
from inference.postprocess import l2_normalize
from inference.rerank import k_reciprocal_rerank

log = logging.getLogger(__name__)


def gather_parts(parts: dict, world_size: int) -> dict:
    """All ranks' extracted features joined and ordered by index (each sample once)."""
    if world_size == 1:
        return parts
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(f"world_size={world_size} needs an initialised torch.distributed process group")
    gathered: list[dict | None] = [None] * world_size
    dist.all_gather_object(gathered, {k: v.cpu() for k, v in parts.items()})
    nonempty = [g for g in gathered if g["features"].numel()]
    joined = {k: torch.cat([g[k] for g in nonempty]) for k in parts} if nonempty else parts
    return sort_by_index(joined)


def rank_features(query: dict, gallery: dict, cfg: ExperimentConfig, device) -> dict:
    """Metrics of extracted query/gallery parts under cfg.eval (normalisation, re-ranking, protocol)."""
    for name, parts in (("query", query), ("gallery", gallery)):
        if parts["features"].shape[0] == 0:
            raise ValueError(f"the {name} split ({getattr(cfg.data, name + '_split')}) produced no embeddings")
    qf, gf = query["features"], gallery["features"]
    if cfg.eval.normalize:
        qf, gf = l2_normalize(qf), l2_normalize(gf)
    scores = k_reciprocal_rerank(qf, gf, device=device).cpu() if cfg.eval.rerank else (qf, gf)
    cams = (query["camera"], gallery["camera"]) if cfg.eval.protocol == "reid" else (None, None)
    return evaluate_ranking(scores, query["identity"], gallery["identity"], *cams, protocol=cfg.eval.protocol)


def evaluate_model(
    model: nn.Module, cfg: ExperimentConfig, device, rank: int = 0, world_size: int = 1, accelerator=None
) -> dict:
    """Embed the query and gallery splits (this rank's share), gather them, and return the ranking metrics
    (computed on rank 0, sent to all ranks). ``accelerator`` is accepted for the trainer's convenience."""
    from datasets.stream import eval_loader  # imported late: the metrics work without the data stack

    parts = {}
    for name, split in (("query", cfg.data.query_split), ("gallery", cfg.data.gallery_split)):
        local = extract_features(model, eval_loader(cfg, split, rank, world_size), device, cfg.eval.flip)
        parts[name] = gather_parts(local, world_size)
    result = [rank_features(parts["query"], parts["gallery"], cfg, device) if rank == 0 else None]
    if world_size > 1:
        dist.broadcast_object_list(result, src=0)
    return result[0]


def format_results(metrics: dict) -> str:
    names = (("mAP", "mAP"), ("Rank-1", "rank1"), ("Rank-5", "rank5"), ("Rank-10", "rank10"), ("mINP", "mINP"))
    lines = [f"{label:<8}: {100 * metrics[key]:.1f}%" for label, key in names]
    lines.append(f"queries : {metrics['num_valid_queries']} evaluated, {metrics['num_skipped_queries']} skipped")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m inference.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="experiment config name (configs/NAME.py)")
    parser.add_argument("--checkpoint", required=True, help="model weights (a state_dict saved with torch.save)")
    parser.add_argument("--flip", action="store_true", help="average the embeddings of each image and its mirror")
    parser.add_argument("--rerank", action="store_true", help="k-reciprocal re-ranking (k1=20, k2=6, lambda=0.3)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    args, overrides = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = load_config(args.config, overrides)
    cfg.eval.flip = cfg.eval.flip or args.flip
    cfg.eval.rerank = cfg.eval.rerank or args.rerank
    model = load_model(cfg.model, args.checkpoint, img_size=(cfg.data.height, cfg.data.width)).to(args.device)
    metrics = evaluate_model(model, cfg, args.device)
    extra = " + flip" * cfg.eval.flip + " + re-ranking" * cfg.eval.rerank
    print(f"Results of {args.checkpoint} on {cfg.data.shards} ({cfg.eval.protocol} protocol{extra})")
    print(format_results(metrics))
    return metrics


if __name__ == "__main__":
    import sys

    from configs.cli import run_cli

    sys.exit(run_cli(main))
