"""The TensorBoard rank-list picture: a few queries and their top-k gallery matches, green = hit, red = miss.

It embeds the first queries and (up to ``max_gallery``) gallery samples itself on the main process, keeping
small thumbnails, so it needs nothing from the evaluator beyond the eval stream.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from configs import ExperimentConfig
from inference.extract import embed
from trainers.monitor import rank_list_image

THUMB_HEIGHT = 64


def _thumbs(images: torch.Tensor, cfg: ExperimentConfig) -> torch.Tensor:
    mean = torch.tensor(cfg.data.augment.mean).view(1, 3, 1, 1)
    std = torch.tensor(cfg.data.augment.std).view(1, 3, 1, 1)
    x = (images.float().cpu() * std + mean).clamp(0, 1)
    width = max(1, round(x.shape[-1] * THUMB_HEIGHT / x.shape[-2]))
    x = F.interpolate(x, size=(THUMB_HEIGHT, width), mode="bilinear", align_corners=False)
    return (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1)


@torch.no_grad()
def embed_first(model: torch.nn.Module, cfg: ExperimentConfig, split: str, device, limit: int) -> dict:
    """Embeddings, identities, cameras and thumbnails of the samples with ``index < limit`` of ``split``."""
    from datasets.stream import eval_loader

    feats, ids, cams, thumbs, index = [], [], [], [], []
    for batch in eval_loader(cfg, split, 0, 1):
        keep = batch["index"] < limit
        if keep.any():
            images = batch["image"][keep]
            feats.append(F.normalize(embed(model, images.to(device)).float(), dim=1).cpu())
            ids.append(batch["identity"][keep])
            cams.append(batch["camera"][keep])
            thumbs.append(_thumbs(images, cfg))
            index.append(batch["index"][keep])
        if sum(len(i) for i in index) >= limit:
            break
    order = torch.argsort(torch.cat(index))
    return {k: torch.cat(v)[order] for k, v in zip(("feat", "id", "cam", "thumb"), (feats, ids, cams, thumbs))}


def rank_list(
    model: torch.nn.Module,
    cfg: ExperimentConfig,
    device,
    num_queries: int = 4,
    top_k: int = 10,
    max_gallery: int = 2000,
) -> np.ndarray:
    """HWC uint8 picture of ``num_queries`` queries and their ``top_k`` matches (reid: same-camera hits skipped)."""
    was_training = model.training
    model.eval()
    q = embed_first(model, cfg, cfg.data.query_split, device, num_queries)
    g = embed_first(model, cfg, cfg.data.gallery_split, device, max_gallery)
    model.train(was_training)
    sim = q["feat"] @ g["feat"].t()
    if cfg.eval.protocol == "reid":  # the Market-1501 rule: same identity seen by the same camera is junk
        junk = (q["id"][:, None] == g["id"][None]) & (q["cam"][:, None] == g["cam"][None]) & (q["cam"][:, None] >= 0)
        sim = sim.masked_fill(junk, float("-inf"))
    top = sim.topk(min(top_k, sim.shape[1]), dim=1).indices
    queries = [t.numpy() for t in q["thumb"]]
    galleries = [[g["thumb"][j].numpy() for j in row] for row in top]
    hits = [[bool(g["id"][j] == q["id"][i]) for j in row] for i, row in enumerate(top)]
    return rank_list_image(queries, galleries, hits)
