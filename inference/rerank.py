"""k-reciprocal re-ranking (Zhong et al., CVPR 2017) in bounded memory, in torch (CPU or GPU).

Computes what the reference implementation (torchreid's ``re_ranking``) computes from the ``metric`` distance
matrices, up to float32 near-ties: where two neighbours' distances tie at the k-th place, the reference keeps the
order of numpy's argsort and this keeps topk's, so the k-reciprocal sets, and the distances that depend on them,
can differ (measured: at most 4.8e-7 on ``bench/market_like.py``; at Market size with other 2,048-d clustered
features, 1,760 of 53.6M distances differed by up to 9.1e-3, with identical re-ranked mAP and CMC; see
BENCHMARKS.md). It never builds a dense (Q+G)^2 matrix: the all-pairs distances are
computed in row chunks and reduced to each row's maximum and nearest neighbours, the k-reciprocal
encodings V are sparse (COO), and the Jaccard distance is a sparse join, chunked over queries.
"""

from __future__ import annotations

import numpy as np
import torch

from inference.distance import as_features, check_same_dim, pairwise_distance

_LOOKUP_K = 32  # nearest neighbours whose distances are kept per row; the rest are recomputed on demand


def _squared(distance_fn, a: torch.Tensor, b: torch.Tensor, metric: str) -> torch.Tensor:
    """The reference's original distance, ``metric(a, b) ** 2`` in float32 (euclidean: squared directly)."""
    if metric == "euclidean":
        return distance_fn(a, b, "sqeuclidean").float()
    return distance_fn(a, b, metric).pow_(2).float()


def _merge_top(vals: torch.Tensor, idx: torch.Tensor, new_vals: torch.Tensor, new_idx: torch.Tensor):
    """Keep the smallest ``vals.shape[1]`` of two (values, indices) candidate lists per row, sorted."""
    v, pos = torch.topk(torch.cat([vals, new_vals], 1), vals.shape[1], dim=1, largest=False, sorted=True)
    return v, torch.cat([idx, new_idx], 1).gather(1, pos)


def _update(state, rows: slice, d2: torch.Tensor, col0: int) -> None:
    """Fold a block of squared distances (rows x columns from ``col0``) into the row maxima and neighbours."""
    row_max, top_d, top_i = state
    row_max[rows] = torch.maximum(row_max[rows], d2.amax(1))
    k = min(top_d.shape[1], d2.shape[1])
    v, i = torch.topk(d2, k, dim=1, largest=False, sorted=True)
    top_d[rows], top_i[rows] = _merge_top(top_d[rows], top_i[rows], v, i + col0)


def _neighbours(feats: torch.Tensor, num_query: int, metric: str, keep: int, block: int):
    """Row maxima of the squared distances, the ``keep`` nearest neighbours (sorted) with their normalised
    distances, and the normalised query-to-gallery block. Each symmetric block pair is computed once."""
    n, dev = feats.shape[0], feats.device
    row_max = torch.zeros(n, dtype=torch.float32, device=dev)
    top_d = torch.full((n, keep), float("inf"), dtype=torch.float32, device=dev)
    top_i = torch.zeros(n, keep, dtype=torch.long, device=dev)
    qg = torch.empty(num_query, n - num_query, dtype=torch.float32, device=dev)
    starts = range(0, n, block)
    for a0 in starts:
        a1 = min(a0 + block, n)
        for b0 in starts[a0 // block :]:
            b1 = min(b0 + block, n)
            d2 = _squared(pairwise_distance, feats[a0:a1], feats[b0:b1], metric)
            _update((row_max, top_d, top_i), slice(a0, a1), d2, b0)
            if b0 != a0:
                _update((row_max, top_d, top_i), slice(b0, b1), d2.T.contiguous(), a0)
            if a0 < num_query and b1 > num_query:  # blocks are contiguous and b0 >= a0: only this orientation
                qg[a0 : min(a1, num_query), max(b0, num_query) - num_query : b1 - num_query] = d2[
                    : num_query - a0, max(num_query - b0, 0) :
                ]
    top_d /= row_max[:, None]
    qg /= row_max[:num_query, None]
    return row_max, top_d, top_i, qg


def _reciprocal(ranks: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """mask[i, t]: row i is among the neighbours of its t-th neighbour (both lists of length ranks.shape[1])."""
    out = torch.empty_like(ranks, dtype=torch.bool)
    for s in range(0, len(ranks), chunk_size):
        r = ranks[s : s + chunk_size]
        me = torch.arange(s, s + len(r), device=ranks.device)
        out[s : s + len(r)] = (ranks[r] == me[:, None, None]).any(-1)
    return out


def _expansion(rows, r1, m1, r2, m2, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, col) of the k-reciprocal set plus the accepted half-size sets of each row, sorted and unique."""
    c1, ok1 = r1[rows], m1[rows]
    in_r = torch.zeros(len(rows), n + 1, dtype=torch.bool, device=r1.device)  # chunk-local dense sets R(i)
    in_r.scatter_(1, torch.where(ok1, c1, n), True)
    in_r[:, n] = False
    half = r2[c1]  # [C, k1+1, k1/2+1] the half-size reciprocal set of each candidate
    half_ok = m2[c1] & ok1[..., None]
    inside = in_r.gather(1, half.flatten(1)).view_as(half) & half_ok
    size = half_ok.sum(-1).double()
    accept = ok1 & (inside.sum(-1).double() > (2.0 / 3.0) * size)  # the reference's float comparison
    extra = torch.where(half_ok & accept[..., None], half, torch.full_like(half, n)).flatten(1)
    cand = torch.cat([torch.where(ok1, c1, n), extra], dim=1)
    local = torch.arange(len(rows), device=r1.device)[:, None].expand_as(cand)
    key = torch.unique((local * (n + 1) + cand)[cand < n])  # sorted by row, then column; duplicates merged
    return rows[key // (n + 1)], key % (n + 1)


def _lookup(r, c, top_d, top_i, feats, row_max, metric):
    """Normalised squared distances O[r, c], from the kept neighbour lists when there, else recomputed."""
    hit = top_i[r] == c[:, None]  # [E, K]: cheaper than any dense [rows, Q+G] scratch on CPU
    found = hit.any(1)
    vals = top_d.view(-1).index_select(0, r * top_d.shape[1] + hit.byte().argmax(1))
    miss = (~found).nonzero().flatten()
    if miss.numel():
        a, b = feats.index_select(0, r[miss]), feats.index_select(0, c[miss])
        vals[miss] = _squared(pairwise_distance_pairs, a, b, metric) / row_max[r[miss]]
    return vals


def pairwise_distance_pairs(a: torch.Tensor, b: torch.Tensor, metric: str) -> torch.Tensor:
    """Distances between matching rows of ``a`` and ``b`` (same formulas as ``pairwise_distance``)."""
    dot = (a[:, None, :] @ b[:, :, None]).flatten()  # one pass over the rows
    if metric == "cosine":
        return 1.0 - dot / (a.norm(dim=1).clamp(min=1e-12) * b.norm(dim=1).clamp(min=1e-12))
    d = ((a * a).sum(1) + (b * b).sum(1) - 2.0 * dot).clamp_(min=0)
    return d.sqrt_() if metric == "euclidean" else d


def _encode(feats, top_d, top_i, row_max, k1, metric, chunk_size):
    """Sparse k-reciprocal encodings V as COO (rows, cols, values), sorted by row then column."""
    n = feats.shape[0]
    r1, r2 = top_i[:, : k1 + 1], top_i[:, : int(round(k1 / 2.0)) + 1]
    m1, m2 = _reciprocal(r1, chunk_size), _reciprocal(r2, chunk_size)
    parts = []
    for s in range(0, n, chunk_size):
        r, c = _expansion(torch.arange(s, min(s + chunk_size, n), device=feats.device), r1, m1, r2, m2, n)
        w = torch.exp(-_lookup(r, c, top_d, top_i, feats, row_max, metric))
        total = torch.zeros(n, dtype=w.dtype, device=w.device).index_add_(0, r, w)
        parts.append((r, c, w / total[r]))
    return tuple(torch.cat(p) for p in zip(*parts))


def _segment_arange(counts: torch.Tensor) -> torch.Tensor:
    """Concatenated ``arange(c)`` for each c in counts (the offset of every item within its segment)."""
    total = int(counts.sum())
    return torch.arange(total, device=counts.device) - (counts.cumsum(0) - counts).repeat_interleave(counts)


def _query_expand(rows, cols, vals, neighbours: torch.Tensor, n: int, chunk_size: int):
    """V_qe[i] = mean of V over the rows ``neighbours[i]`` (the k2 nearest), as COO sorted by row then column."""
    counts = torch.bincount(rows, minlength=n)
    ptr = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    parts = []
    for s in range(0, n, chunk_size):
        src = neighbours[s : s + chunk_size].flatten()
        dst = torch.arange(len(src), device=rows.device) // neighbours.shape[1]
        take = counts[src]
        pos = ptr[src].repeat_interleave(take) + _segment_arange(take)
        key = dst.repeat_interleave(take) * n + cols[pos]
        uniq, inverse = torch.unique(key, return_inverse=True)  # sorted: by row, then column
        acc = torch.zeros(len(uniq), dtype=vals.dtype, device=vals.device).index_add_(0, inverse, vals[pos])
        parts.append((uniq // n + s, uniq % n, acc / neighbours.shape[1]))
    return tuple(torch.cat(p) for p in zip(*parts))


def _jaccard_into(out: torch.Tensor, rows, cols, vals, num_query: int, lambda_value: float, pair_budget: int):
    """out (the normalised query-gallery distances) <- (1 - lambda) * Jaccard(V_q, V_g) + lambda * out."""
    num_gallery = out.shape[1]
    g = rows >= num_query
    order = torch.from_numpy(np.argsort(cols[g].cpu().numpy(), kind="stable")).to(cols.device)  # numpy: faster
    g_cols, g_rows, g_vals = cols[g][order], rows[g][order] - num_query, vals[g][order]
    col_count = torch.bincount(g_cols, minlength=int(rows.max()) + 1 if rows.numel() else 1)
    col_ptr = torch.cat([col_count.new_zeros(1), col_count.cumsum(0)])
    q = rows < num_query
    q_rows, q_cols, q_vals = rows[q], cols[q], vals[q]
    pairs = col_count[q_cols]
    row_pairs = torch.bincount(q_rows, weights=pairs.double(), minlength=num_query).cumsum(0)
    entry_end = torch.bincount(q_rows, minlength=num_query).cumsum(0)
    start = 0
    while start < num_query:
        done = float(row_pairs[start - 1]) if start else 0.0
        stop = int(torch.searchsorted(row_pairs, torch.tensor(done + pair_budget, dtype=row_pairs.dtype)))
        stop = min(max(stop, start + 1), num_query)
        e0, e1 = (int(entry_end[start - 1]) if start else 0), int(entry_end[stop - 1])
        n_pairs = pairs[e0:e1]
        rep = torch.arange(e0, e1, device=rows.device).repeat_interleave(n_pairs)
        pos = col_ptr[q_cols[rep]] + _segment_arange(n_pairs)
        m = torch.minimum(q_vals[rep], g_vals[pos])
        acc = torch.zeros((stop - start) * num_gallery, dtype=torch.float32, device=out.device)
        acc.index_add_(0, (q_rows[rep] - start) * num_gallery + g_rows[pos], m)
        acc = acc.view(stop - start, num_gallery)
        jaccard = 1.0 - acc / (2.0 - acc)
        out[start:stop].mul_(lambda_value).add_(jaccard, alpha=1.0 - lambda_value)
        start = stop
    return out


def k_reciprocal_rerank(
    query,
    gallery,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
    metric: str = "euclidean",
    device: str | torch.device | None = None,
    chunk_size: int = 2048,
    pair_budget: int = 1 << 24,
) -> torch.Tensor:
    """Re-ranked [Q, G] distances (float32) of query and gallery features (k1=20, k2=6, lambda=0.3 as the paper).

    The original distance is ``metric`` squared and divided by its row maximum, as in the reference.
    Memory grows with (Q+G) * chunk_size, Q * G (the result) and the sparse encodings, not (Q+G)^2.
    """
    if k1 < 1 or not 1 <= k2 <= k1 + 1:
        raise ValueError(f"need k1 >= 1 and 1 <= k2 <= k1 + 1, got k1={k1}, k2={k2}")
    if not 0.0 <= lambda_value <= 1.0:
        raise ValueError(f"lambda_value={lambda_value} must be in [0, 1]")
    q, g = as_features(query, "query features"), as_features(gallery, "gallery features")
    check_same_dim(q, g)
    device = torch.device(device) if device is not None else q.device
    feats = torch.cat([q.to(device), g.to(device, q.dtype)])
    n, num_query = feats.shape[0], q.shape[0]
    k1 = min(k1, n - 1)
    keep = min(max(_LOOKUP_K, k1 + 1), n)
    row_max, top_d, top_i, out = _neighbours(feats, num_query, metric, keep, chunk_size)
    rows_per_chunk = max(1, chunk_size // 4)  # the sparse steps use dense [rows_per_chunk, Q+G] scratch
    rows, cols, vals = _encode(feats, top_d, top_i, row_max, k1, metric, rows_per_chunk)
    if k2 != 1:
        rows, cols, vals = _query_expand(rows, cols, vals, top_i[:, :k2], n, rows_per_chunk)
    del top_d, top_i
    return _jaccard_into(out, rows, cols, vals, num_query, lambda_value, pair_budget)
