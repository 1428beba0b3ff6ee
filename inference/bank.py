"""Gallery bank: gallery embeddings with their labels and fitted post-processing, one file on disk, and
faiss search (exact for small banks, IVF or HNSW for large ones), top-k, classification and open-set rejection."""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np
import torch

from inference.distance import as_features, as_labels
from inference.postprocess import PostProcess
from inference.serialization import load_weights_only

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
INDEX_KINDS = ("auto", "flat", "ivf", "hnsw")


def _np32(x: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(x.detach().cpu().float().numpy())


@dataclass
class GalleryBank:
    """Post-processed gallery features with per-item labels/identities/cameras/sources.

    Scores are inner products of L2-normalised features (cosine similarity) when ``postprocess.normalize``,
    else negative squared euclidean distances: higher is always better.
    """

    features: torch.Tensor
    labels: torch.Tensor
    identities: torch.Tensor
    cameras: torch.Tensor
    sources: list[str]
    postprocess: PostProcess = field(default_factory=PostProcess)
    index: object | None = field(default=None, repr=False)
    _exact: object | None = field(default=None, repr=False, compare=False)

    @classmethod
    def build(cls, features, labels=None, identities=None, cameras=None, sources=None, postprocess=None):
        """Bank of raw embeddings ``features`` ([N, D]); ``postprocess`` (default: L2 only) is applied here."""
        raw = as_features(features, "gallery features")
        n = raw.shape[0]
        post = postprocess or PostProcess()
        ids = as_labels(identities if identities is not None else np.full(n, -1), "gallery identities", n)
        lab = as_labels(labels if labels is not None else ids, "gallery labels", n)
        cams = as_labels(cameras if cameras is not None else np.full(n, -1), "gallery cameras", n)
        src = list(sources) if sources is not None else [""] * n
        if len(src) != n:
            raise ValueError(f"gallery sources has {len(src)} entries but the features have {n} rows")
        feats = post(raw).float().cpu().contiguous()
        return cls(feats, torch.from_numpy(lab), torch.from_numpy(ids), torch.from_numpy(cams), src, post)

    @property
    def metric(self) -> str:
        return "ip" if self.postprocess.normalize else "l2"

    def __len__(self) -> int:
        return self.features.shape[0]

    def build_index(self, kind: str = "auto", exact_limit: int = 100_000, nlist: int = 0, nprobe: int = 16):
        """Exact (flat) index up to ``exact_limit`` items for ``auto``, else IVF-Flat (nlist ~ 4 sqrt(N))."""
        if kind not in INDEX_KINDS:
            raise ValueError(f"index kind {kind!r} is not valid; choose one of {list(INDEX_KINDS)}")
        if kind == "auto":
            kind = "flat" if len(self) <= exact_limit else "ivf"
        d, x = self.features.shape[1], _np32(self.features)
        faiss_metric = faiss.METRIC_INNER_PRODUCT if self.metric == "ip" else faiss.METRIC_L2
        if kind == "flat":
            index = faiss.IndexFlatIP(d) if self.metric == "ip" else faiss.IndexFlatL2(d)
        elif kind == "hnsw":
            index = faiss.IndexHNSWFlat(d, 32, faiss_metric)
            index.hnsw.efSearch = max(64, nprobe * 4)
        else:
            nlist = nlist or max(1, min(len(self) // 39, int(4 * math.sqrt(len(self)))))
            quantizer = faiss.IndexFlatIP(d) if self.metric == "ip" else faiss.IndexFlatL2(d)
            index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss_metric)
            sample = x[np.random.default_rng(0).permutation(len(x))[: nlist * 64]]
            index.train(sample)
            index.nprobe = min(nprobe, nlist)
        index.add(x)
        self.index = index
        log.info("gallery bank: %s index over %d items of dimension %d", kind, len(self), d)
        return index

    def _exact_index(self):
        if isinstance(self.index, faiss.IndexFlat):
            return self.index
        if self._exact is None:
            d = self.features.shape[1]
            self._exact = faiss.IndexFlatIP(d) if self.metric == "ip" else faiss.IndexFlatL2(d)
            self._exact.add(_np32(self.features))
        return self._exact

    def prepare_query(self, query, raw: bool = True) -> np.ndarray:
        """Query rows as float32 numpy, post-processed like the gallery unless ``raw`` is False."""
        q = as_features(query, "query features")
        expected = self.postprocess.pca.mean.shape[0] if raw and self.postprocess.pca is not None else None
        expected = expected or self.features.shape[1]
        if q.shape[1] != expected:
            raise ValueError(f"query features have dimension {q.shape[1]} but the gallery bank expects {expected}")
        return _np32(self.postprocess(q) if raw else q)

    def search(self, query, k: int = 10, raw: bool = True, exact: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k (scores [Q, k], gallery indices [Q, k]), best first; ``exact`` bypasses an approximate index."""
        if k < 1:
            raise ValueError(f"k={k} must be >= 1")
        q = self.prepare_query(query, raw)
        k = min(k, len(self))
        index = self._exact_index() if exact or self.index is None else self.index
        scores, idx = index.search(q, k)
        scores = torch.from_numpy(scores if self.metric == "ip" else -scores)
        return scores, torch.from_numpy(idx)

    def classify(self, query, k: int = 1, vote: str = "best", threshold: float | None = None, raw: bool = True):
        """Label of each query by its best match (``best``) or a score-weighted k-NN ``knn`` vote.

        Returns a dict: "labels", "identities" (-1 when the best score is below ``threshold``: open set),
        "scores" (best score per query), "indices" (top-k gallery indices).
        """
        if vote not in ("best", "knn"):
            raise ValueError(f"vote={vote!r} is not valid; choose 'best' or 'knn'")
        scores, idx = self.search(query, k if vote == "knn" else 1, raw)
        labels = self.labels[idx]
        if vote == "knn":
            weights = scores - scores.min() + 1e-6 if self.metric == "l2" else scores.clamp(min=0) + 1e-6
            uniq, inverse = torch.unique(labels, return_inverse=True)
            votes = torch.zeros(labels.shape[0], len(uniq), dtype=weights.dtype).scatter_add_(1, inverse, weights)
            pick = uniq[votes.argmax(1)]
            chosen = (labels == pick[:, None]).float().argmax(1)  # best-ranked gallery item of the winning label
        else:
            chosen = torch.zeros(labels.shape[0], dtype=torch.long)
        rows = torch.arange(labels.shape[0])
        best = idx[rows, chosen]
        out_labels, out_ids = self.labels[best].clone(), self.identities[best].clone()
        best_scores = scores[rows, chosen]
        if threshold is not None:
            unknown = best_scores < threshold
            out_labels[unknown], out_ids[unknown] = -1, -1
        return {"labels": out_labels, "identities": out_ids, "scores": best_scores, "indices": idx}

    def recall_vs_exact(self, query, k: int = 1, raw: bool = True) -> float:
        """Fraction of the exact top-1 neighbours that the current index returns within its top-k."""
        _, exact = self.search(query, 1, raw, exact=True)
        _, approx = self.search(query, k, raw)
        return float((approx == exact).any(1).float().mean())

    def save(self, path: str | Path, with_index: bool = True) -> None:
        """One file (torch.save of plain tensors/lists/dicts, loadable with weights_only=True), written atomically."""
        path = Path(path)
        state = {
            "format_version": FORMAT_VERSION,
            "features": self.features,
            "labels": self.labels,
            "identities": self.identities,
            "cameras": self.cameras,
            "sources": list(self.sources),
            "postprocess": self.postprocess.state_dict(),
            "index": torch.from_numpy(faiss.serialize_index(self.index)) if with_index and self.index else None,
        }
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, tmp)
        with open(tmp, "rb") as fh:  # on disk before the rename: a crash must not publish an empty file
            os.fsync(fh.fileno())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path) -> GalleryBank:
        path = Path(path)
        state = load_weights_only(path, "gallery bank file")
        if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{path} is not a gallery bank file (format version {FORMAT_VERSION})")
        n = state["features"].shape[0]
        for key in ("labels", "identities", "cameras", "sources"):
            if len(state[key]) != n:
                raise ValueError(f"{path}: {key} has {len(state[key])} entries but there are {n} features")
        index = state.get("index")
        bank = cls(
            state["features"],
            state["labels"],
            state["identities"],
            state["cameras"],
            list(state["sources"]),
            PostProcess.from_state_dict(state["postprocess"]),
        )
        bank.index = faiss.deserialize_index(index.numpy()) if index is not None else None
        return bank
