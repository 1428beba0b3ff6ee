"""Matching query embeddings against a gallery bank: top-k distinct SKUs per query, optional alpha query
expansion and k-reciprocal re-ranking against the bank, open-set rejection, and the documented score rule.

Score rule: ``score = det_score * (1 + similarity) / 2``, where ``similarity`` is the cosine similarity of the
query crop to its best gallery item (the bank is L2-normalised, so it lies in [-1, 1]). A detection the
detector is sure of but that matches nothing well therefore ranks low, and a ground-truth box (det_score 1)
is ranked by its similarity alone. A best similarity below the unknown threshold labels the box unknown
(``category_id`` -1): product libraries change, and a new product should not take a neighbour's label.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from inference.bank import GalleryBank
from inference.postprocess import alpha_query_expansion
from inference.rerank import k_reciprocal_rerank

UNKNOWN = -1


@dataclass
class MatchOptions:
    """How query crops are matched against the bank."""

    topk: int = 5
    """distinct SKUs kept per box (the best first)"""
    unknown_threshold: float | None = None
    """cosine similarity below which the best match is 'unknown' (None = closed set)"""
    query_expansion: int = 0
    """alpha-QE with this many gallery neighbours (0 = off)"""
    rerank: bool = False
    """k-reciprocal re-ranking of the query against the bank (k1=20, k2=6, lambda=0.3)"""
    rerank_exact_max: int = 10000
    """a bank of up to this many rows is re-ranked whole, with the batch's queries; a larger one per query
    among its ``rerank_shortlist`` nearest rows (exact re-ranking builds the neighbourhoods of the whole bank
    for every batch: (Q+G)^2 distances, 2.5e11 at 500k rows)"""
    rerank_shortlist: int = 1000
    """nearest rows re-ranked per query when the bank is larger than ``rerank_exact_max`` (at least the
    candidates the matcher needs: max(64, 8 x topk))"""

    def __post_init__(self) -> None:
        if self.topk < 1:
            raise ValueError(f"topk={self.topk} must be >= 1")
        if self.unknown_threshold is not None and not -1.0 <= self.unknown_threshold <= 1.0:
            raise ValueError(f"unknown threshold {self.unknown_threshold} must be a cosine similarity in [-1, 1]")
        if self.query_expansion < 0:
            raise ValueError(f"query expansion k={self.query_expansion} must be >= 0")
        if self.rerank_shortlist < 1:
            raise ValueError(f"rerank shortlist={self.rerank_shortlist} must be >= 1")
        if self.rerank_exact_max < 0:
            raise ValueError(f"rerank exact max={self.rerank_exact_max} must be >= 0")


def combined_score(det_score: float, similarity: float) -> float:
    """The score rule of the module docstring."""
    return float(det_score) * (1.0 + float(similarity)) / 2.0


def _search(bank: GalleryBank, q: torch.Tensor, k: int) -> torch.Tensor:
    """The bank index's top-k rows; a query for which an approximate index (IVF probing too few lists) found no
    row at all is searched exactly. (A row it filled in part keeps its -1 padding, which ``match`` skips.)"""
    idx = bank.search(q, k, raw=False)[1]
    empty = (idx < 0).all(1)
    if empty.any():
        idx[empty] = bank.search(q[empty], k, raw=False, exact=True)[1]
    return idx


def _candidates(bank: GalleryBank, q: torch.Tensor, k: int, opts: MatchOptions) -> torch.Tensor:
    """Gallery indices [Q, k] in ranking order (re-ranked order when asked; -1 pads a short row).

    A bank of at most ``opts.rerank_exact_max`` rows is re-ranked whole, with the batch's queries. A larger one
    is re-ranked per query among the query's ``rerank_shortlist`` nearest rows (from the bank's index), the
    usual way to afford k-reciprocal re-ranking on a large gallery: its k1 = 20 neighbourhoods lie far inside
    the shortlist, and a query's result no longer depends on the other crops of its batch."""
    if not opts.rerank:
        return _search(bank, q, k)
    if len(bank) <= opts.rerank_exact_max:
        dist = k_reciprocal_rerank(q, bank.features, metric="cosine")
        return torch.topk(dist, k, dim=1, largest=False).indices
    shortlists = _search(bank, q, max(opts.rerank_shortlist, k))
    out = torch.full((q.shape[0], k), -1, dtype=torch.long)
    for row, rows in enumerate(shortlists):
        rows = rows[rows >= 0]  # an approximate index may return fewer rows
        if len(rows) == 0:
            continue
        dist = k_reciprocal_rerank(q[row : row + 1], bank.features[rows], metric="cosine")[0]
        order = torch.topk(dist, min(k, len(rows)), largest=False).indices
        out[row, : len(order)] = rows[order]
    return out


def match(bank: GalleryBank, raw_features: torch.Tensor, opts: MatchOptions) -> list[dict]:
    """One dict per query row: ``category_id`` (UNKNOWN when rejected), ``similarity``, ``index`` (bank row of
    the best match) and ``alternatives`` (up to ``topk`` distinct SKUs with their best similarity and row)."""
    if raw_features.shape[0] == 0:
        return []
    if bank.metric != "ip":
        raise ValueError("the recogniser needs an L2-normalised bank (cosine similarities)")
    q = torch.from_numpy(bank.prepare_query(raw_features))
    ranker = alpha_query_expansion(q, bank.features, k=opts.query_expansion) if opts.query_expansion else q
    k = min(len(bank), max(64, 8 * opts.topk))  # enough rows to find topk distinct SKUs among their views
    idx = _candidates(bank, ranker, k, opts)
    # QE and re-ranking only order the candidates: the reported similarity (threshold, score rule) is the
    # crop's own cosine, since an expanded query is pulled towards the bank and would hide unknown products
    sims = (q[:, None, :] * bank.features[idx.clamp(min=0)]).sum(-1)
    out = []
    for row_sims, row_idx in zip(sims.tolist(), idx.tolist()):
        alternatives, seen = [], set()
        for s, i in zip(row_sims, row_idx):
            sku = int(bank.identities[i])
            if i < 0 or sku in seen:
                continue
            seen.add(sku)
            alternatives.append({"category_id": sku, "similarity": round(float(s), 5), "index": int(i)})
            if len(alternatives) == opts.topk:
                break
        best = alternatives[0]
        rejected = opts.unknown_threshold is not None and best["similarity"] < opts.unknown_threshold
        out.append({"category_id": UNKNOWN if rejected else best["category_id"], "similarity": best["similarity"],
                     "index": best["index"], "alternatives": alternatives})  # fmt: skip
    return out
