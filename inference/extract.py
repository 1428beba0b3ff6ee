"""Embedding extraction: any module mapping images to vectors, over an evaluation loader, ordered by index."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

META_KEYS = ("identity", "camera", "label", "index")


def input_dtype(model: nn.Module) -> torch.dtype:
    """The dtype the model's weights are in (DeepSpeed fp16/bf16 converts them); float32 for none."""
    for param in model.parameters():
        if param.is_floating_point():
            return param.dtype
    return torch.float32


def embed(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The model's embedding of a batch (a dict output gives its ``embedding``); images are cast to the
    weights' dtype."""
    out = model(images.to(input_dtype(model)))
    if isinstance(out, dict):
        out = out["embedding"]
    elif isinstance(out, tuple | list):
        out = out[0]
    if out.dim() != 2:
        raise ValueError(f"the model must map images to vectors [B, D]; it returned shape {tuple(out.shape)}")
    return out


@torch.no_grad()
def extract_features(model: nn.Module, loader: Iterable[dict], device, flip: bool = False) -> dict:
    """Embed every batch of ``loader`` (dicts with "image" and the META_KEYS); ``flip`` averages the embedding
    of each image and its horizontal mirror. Returns "features" [N, D] (float32, CPU) and the META_KEYS as
    LongTensors, all ordered by "index"."""
    was_training = model.training
    model.eval()
    feats: list[torch.Tensor] = []
    meta: dict[str, list[torch.Tensor]] = {k: [] for k in META_KEYS}
    seen = 0
    batches = iter(loader)
    try:
        for batch in batches:
            x = batch["image"].to(device, non_blocking=True)
            f = embed(model, x)
            if flip:
                f = (f + embed(model, x.flip(3))) / 2
            feats.append(f.float().cpu())
            n = x.shape[0]
            for k in META_KEYS:
                default = torch.arange(seen, seen + n) if k == "index" else torch.full((n,), -1)
                meta[k].append(torch.as_tensor(batch.get(k, default)).long().cpu())
            seen += n
    finally:
        model.train(was_training)
        getattr(batches, "close", lambda: None)()  # stops a stream's DataLoader workers even after an error
    out = {"features": torch.cat(feats) if feats else torch.zeros(0, 0)}
    out.update({k: torch.cat(v) if v else torch.zeros(0, dtype=torch.long) for k, v in meta.items()})
    return sort_by_index(out)


def sort_by_index(parts: dict) -> dict:
    """Reorder all entries by "index"; a ValueError when an index appears twice."""
    index = parts["index"]
    if index.numel() and torch.unique(index).numel() != index.numel():
        dup = index.sort().values
        twice = dup[1:][dup[1:] == dup[:-1]]
        raise ValueError(f"sample index {int(twice[0])} was embedded more than once ({twice.numel()} duplicates)")
    order = torch.argsort(index)
    return {k: v[order] for k, v in parts.items()}
