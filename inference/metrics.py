"""Ranking metrics (CMC / Recall@k, mAP, mINP) for ReID (Market-1501 rules) and retail retrieval, chunked.

Market-1501 protocol: gallery items with the query's identity *and* camera are ignored, gallery items whose
identity is junk (-1) are ignored, distractors (identity 0, or any identity no query has) are ordinary
negatives, and queries without a valid positive are skipped and counted. ``retail`` drops the camera rule.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from inference.distance import as_features, as_labels, check_same_dim, pairwise_distance

log = logging.getLogger(__name__)

PROTOCOLS = ("reid", "retail")


def _distance_chunks(distmat_or_features, metric: str, chunk_size: int):
    """(num_query, num_gallery, iterator of numpy row chunks) for a distance matrix or (query, gallery) features."""
    if isinstance(distmat_or_features, tuple | list):
        if len(distmat_or_features) != 2:
            raise ValueError("features must be a (query_features, gallery_features) pair")
        q = as_features(distmat_or_features[0], "query features")
        g = as_features(distmat_or_features[1], "gallery features").to(q.device, q.dtype)
        check_same_dim(q, g)

        def gen():
            for s in range(0, q.shape[0], chunk_size):
                yield pairwise_distance(q[s : s + chunk_size], g, metric).cpu().numpy()

        return q.shape[0], g.shape[0], gen()
    d = distmat_or_features
    if isinstance(d, torch.Tensor):
        d = d.detach().cpu().numpy()
    d = np.asarray(d)
    if d.ndim != 2:
        raise ValueError(f"distmat must be 2-D [num_query, num_gallery], got shape {d.shape}")
    if d.shape[0] == 0 or d.shape[1] == 0:
        raise ValueError(f"empty query or gallery: distmat has shape {d.shape}")

    def gen_d():
        for s in range(0, d.shape[0], chunk_size):
            chunk = d[s : s + chunk_size]
            if not np.isfinite(chunk).all():
                raise ValueError(f"distmat has NaN/inf values in rows {s}..{s + len(chunk) - 1}")
            yield chunk

    return d.shape[0], d.shape[1], gen_d()


def _rank_chunk(dist: np.ndarray, q_ids, q_cams, g_ids, g_cams, g_junk, max_rank: int):
    """Per-query AP, INP, first-positive kept rank (1-based) and validity for one chunk of queries."""
    order = np.argsort(dist, axis=1)
    gid = g_ids[order]
    match = gid == q_ids[:, None]
    ignore = g_junk[order]
    if q_cams is not None:
        ignore |= match & (g_cams[order] == q_cams[:, None])
    keep = ~ignore
    pos = match & keep
    num_pos = pos.sum(1)
    valid = num_pos > 0
    kept_rank = np.cumsum(keep, axis=1, dtype=np.int32)  # 1-based rank among kept items, at kept positions
    rows, cols = np.nonzero(pos)  # row-major: positives of each query in rank order
    ranks = kept_rank[rows, cols].astype(np.float64)
    starts = np.concatenate([[0], np.cumsum(num_pos)[:-1]])
    hit_index = np.arange(rows.size) - starts[rows] + 1.0  # how many positives up to and including this one
    ap = np.bincount(rows, weights=hit_index / ranks, minlength=len(dist)) / np.maximum(num_pos, 1)
    first = np.zeros(len(dist), dtype=np.int64)
    last = np.zeros(len(dist), dtype=np.int64)
    first[valid] = ranks[starts[valid]]
    last[valid] = ranks[starts[valid] + num_pos[valid] - 1]
    inp = num_pos / np.maximum(last, 1)
    return ap, inp, first, valid


def evaluate_ranking(
    distmat_or_features,
    q_ids,
    g_ids,
    q_cams=None,
    g_cams=None,
    protocol: str = "reid",
    max_rank: int = 50,
    metric: str = "sqeuclidean",
    chunk_size: int = 256,
    junk_id: int | None = -1,
) -> dict:
    """CMC, mAP and mINP of a [Q, G] distance matrix, or of ``(query_features, gallery_features)``.

    Returns fractions in [0, 1]: "mAP", "mINP", "rank1", "rank5", "rank10", "cmc" (list of ``max_rank``),
    plus "num_valid_queries" and "num_skipped_queries" (queries with no valid positive in the gallery).
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol={protocol!r} is not valid; choose one of {list(PROTOCOLS)}")
    if max_rank < 1:
        raise ValueError(f"max_rank={max_rank} must be >= 1")
    num_q, num_g, chunks = _distance_chunks(distmat_or_features, metric, chunk_size)
    q_ids, g_ids = as_labels(q_ids, "query ids", num_q), as_labels(g_ids, "gallery ids", num_g)
    if protocol == "reid":
        if q_cams is None or g_cams is None:
            raise ValueError("protocol='reid' needs query and gallery cameras (use protocol='retail' without them)")
        q_cams, g_cams = as_labels(q_cams, "query cameras", num_q), as_labels(g_cams, "gallery cameras", num_g)
    else:
        q_cams = g_cams = None
    g_junk = g_ids == junk_id if junk_id is not None else np.zeros(num_g, dtype=bool)
    max_rank = min(max_rank, num_g)
    aps, inps, firsts, valids = [], [], [], []
    start = 0
    for dist in chunks:
        sl = slice(start, start + len(dist))
        qc = None if q_cams is None else q_cams[sl]
        ap, inp, first, valid = _rank_chunk(dist, q_ids[sl], qc, g_ids, g_cams, g_junk, max_rank)
        aps.append(ap), inps.append(inp), firsts.append(first), valids.append(valid)
        start += len(dist)
    valid = np.concatenate(valids)
    if junk_id is not None:
        valid &= q_ids != junk_id
    num_valid = int(valid.sum())
    if num_valid == 0:
        raise ValueError("no query has a valid positive in the gallery (check the identities and cameras)")
    if num_valid < num_q:
        log.info("ranking: %d of %d queries have no valid gallery positive and are skipped", num_q - num_valid, num_q)
    first = np.concatenate(firsts)[valid]
    cmc = (first[None, :] <= np.arange(1, max_rank + 1)[:, None]).mean(1)
    cmc_list = [float(c) for c in cmc]
    return {
        "mAP": float(np.concatenate(aps)[valid].mean()),
        "mINP": float(np.concatenate(inps)[valid].mean()),
        "rank1": cmc_list[0],
        "rank5": cmc_list[min(5, max_rank) - 1],
        "rank10": cmc_list[min(10, max_rank) - 1],
        "cmc": cmc_list,
        "num_valid_queries": num_valid,
        "num_skipped_queries": num_q - num_valid,
    }
