"""Retrieval post-processing (the PyRetri set): L2 normalisation, PCA / PCA-whitening (fitted, saved,
re-applied), database-side augmentation (DBA) and alpha query expansion (alpha-QE)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from inference.distance import as_features, check_same_dim


def l2_normalize(x, eps: float = 1e-12) -> torch.Tensor:
    """Rows scaled to unit L2 norm (all-zero rows stay zero)."""
    return F.normalize(as_features(x), dim=1, eps=eps)


class PCA:
    """PCA fitted on a gallery or training set; ``whiten`` divides each component by its standard deviation."""

    def __init__(self, mean: torch.Tensor, components: torch.Tensor, variances: torch.Tensor, whiten: bool) -> None:
        self.mean, self.components, self.variances, self.whiten = mean, components, variances, whiten

    @classmethod
    def fit(cls, x, dim: int, whiten: bool = False, eps: float = 1e-8) -> PCA:
        """Fit ``dim`` components on rows of ``x`` (float64 covariance, deterministic signs)."""
        x = as_features(x, "PCA training features").double()
        n, d = x.shape
        limit = min(n - 1, d)
        if not 1 <= dim <= limit:
            raise ValueError(
                f"PCA dimension {dim} is larger than the data allows: at most min(num_samples - 1, feature_dim) = "
                f"min({n - 1}, {d}) = {limit}"
            )
        mean = x.mean(0)
        xc = x - mean
        evals, evecs = torch.linalg.eigh(xc.T @ xc / (n - 1))
        order = torch.argsort(evals, descending=True)[:dim]
        comps, var = evecs[:, order], evals[order].clamp(min=0) + eps
        sign = torch.sign(comps.gather(0, comps.abs().argmax(0, keepdim=True)))  # largest entry positive
        return cls(mean.float(), (comps * sign).float(), var.float(), whiten)

    def transform(self, x) -> torch.Tensor:
        x = as_features(x)
        if x.shape[1] != self.mean.shape[0]:
            raise ValueError(f"features have dimension {x.shape[1]} but the PCA was fitted on {self.mean.shape[0]}")
        y = (x.float() - self.mean.to(x.device)) @ self.components.to(x.device)
        return y / self.variances.to(x.device).sqrt() if self.whiten else y

    def state_dict(self) -> dict:
        return {"mean": self.mean, "components": self.components, "variances": self.variances, "whiten": self.whiten}

    @classmethod
    def from_state_dict(cls, state: dict) -> PCA:
        return cls(state["mean"], state["components"], state["variances"], bool(state["whiten"]))


class PostProcess:
    """The chain applied to every embedding before search: [L2] -> [PCA / whitening] -> [L2]."""

    def __init__(self, normalize: bool = True, pca: PCA | None = None) -> None:
        self.normalize, self.pca = normalize, pca

    @classmethod
    def fit(cls, x, normalize: bool = True, pca_dim: int = 0, whiten: bool = False) -> PostProcess:
        """Fit the PCA (when ``pca_dim`` > 0) on the normalised rows of ``x``."""
        x = as_features(x)
        pca = PCA.fit(l2_normalize(x) if normalize else x, pca_dim, whiten) if pca_dim else None
        return cls(normalize, pca)

    def __call__(self, x) -> torch.Tensor:
        x = as_features(x).float()
        if self.normalize:
            x = l2_normalize(x)
        if self.pca is not None:
            x = self.pca.transform(x)
            if self.normalize:
                x = l2_normalize(x)
        return x

    @property
    def output_dim(self) -> int | None:
        return None if self.pca is None else int(self.pca.components.shape[1])

    def state_dict(self) -> dict:
        return {"normalize": self.normalize, "pca": None if self.pca is None else self.pca.state_dict()}

    @classmethod
    def from_state_dict(cls, state: dict) -> PostProcess:
        pca = state.get("pca")
        return cls(bool(state["normalize"]), None if pca is None else PCA.from_state_dict(pca))


def _weighted_neighbours(x: torch.Tensor, base: torch.Tensor, k: int, alpha: float, chunk_size: int) -> torch.Tensor:
    """For each row of x: sum over its k most similar rows of ``base`` of (similarity^alpha) * row."""
    out = torch.empty_like(x)
    k = min(k, base.shape[0])
    for s in range(0, x.shape[0], chunk_size):
        sim, idx = torch.topk(x[s : s + chunk_size] @ base.T, k, dim=1)
        w = sim.clamp(min=0).pow(alpha) if alpha else torch.ones_like(sim)
        out[s : s + chunk_size] = (w[..., None] * base[idx]).sum(1)
    return out


def database_augment(gallery, k: int = 10, alpha: float = 0.0, chunk_size: int = 1024) -> torch.Tensor:
    """DBA: each (L2-normalised) gallery item becomes the normalised weighted mean of its k nearest gallery
    items, itself included; ``alpha`` = 0 weighs them equally, > 0 by similarity^alpha."""
    if k < 1:
        raise ValueError(f"DBA k={k} must be >= 1")
    g = l2_normalize(gallery)
    return F.normalize(_weighted_neighbours(g, g, k, alpha, chunk_size), dim=1)


def alpha_query_expansion(query, gallery, k: int = 5, alpha: float = 3.0, chunk_size: int = 1024) -> torch.Tensor:
    """alpha-QE (Radenovic et al.): query + sum of its k nearest gallery items weighted by similarity^alpha,
    normalised (inputs are L2-normalised first)."""
    if k < 1:
        raise ValueError(f"query expansion k={k} must be >= 1")
    q, g = l2_normalize(query), l2_normalize(gallery)
    check_same_dim(q, g)
    return F.normalize(q + _weighted_neighbours(q, g, k, alpha, chunk_size), dim=1)
