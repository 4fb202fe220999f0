"""FedLEASE's expert allocation (spec section 3.4): B-matrix cosine distances, agglomerative clustering,
number of clusters by silhouette score."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.cluster import AgglomerativeClustering
from sklearn.metrics import silhouette_score


def b_distances(rows: Sequence[Mapping[str, torch.Tensor]], cols: Sequence[Mapping[str, torch.Tensor]]) -> np.ndarray:
    """d(i,j) = mean over module types of the mean over layers of 1 - cos(vec B_i, vec B_j), rows x cols."""
    paths = sorted(k.removesuffix(".lora_B") for k in rows[0] if k.endswith(".lora_B"))
    by_type: dict[str, list[str]] = {}
    for p in paths:
        by_type.setdefault(p.rsplit(".", 1)[-1], []).append(p)

    def stacked(loras: Sequence[Mapping[str, torch.Tensor]], p: str) -> torch.Tensor:
        return torch.stack([lora[f"{p}.lora_B"].flatten().double() for lora in loras])  # [n, d_out * r]

    dist = np.zeros((len(rows), len(cols)))
    for type_paths in by_type.values():
        for p in type_paths:
            r, c = stacked(rows, p), stacked(cols, p)
            cos = (r @ c.T) / (r.norm(dim=1)[:, None] * c.norm(dim=1)[None, :] + 1e-8)
            dist += (1.0 - cos).numpy() / len(type_paths)
    return np.clip(dist / len(by_type), 0.0, None)


def b_distance_matrix(loras: Sequence[Mapping[str, torch.Tensor]]) -> np.ndarray:
    """The symmetric client-by-client B distance matrix with a zero diagonal (clustering input)."""
    dist = b_distances(loras, loras)
    np.fill_diagonal(dist, 0.0)
    return (dist + dist.T) / 2


@dataclass
class Clustering:
    """The chosen clustering: labels per client (canonical order), M, and the silhouette curve."""

    labels: list[int]
    n_clusters: int
    silhouette: dict[int, float]


def choose_clusters(dist: np.ndarray, max_clusters: int) -> Clustering:
    """Average-linkage agglomerative clustering for K = 2..min(max_clusters, N-1) (the silhouette's range);
    M = argmax silhouette (smallest K on ties)."""
    n = dist.shape[0]
    if n < 3:  # silhouette needs 2 <= K <= n-1: with 1 or 2 clients each is its own cluster
        return Clustering(list(range(n)), n, {})
    curve: dict[int, float] = {}
    candidates: dict[int, np.ndarray] = {}
    for k in range(2, min(max_clusters, n - 1) + 1):
        labels = AgglomerativeClustering(n_clusters=k, metric="precomputed", linkage="average").fit_predict(dist)
        try:
            curve[k] = float(silhouette_score(dist, labels, metric="precomputed"))
        except ValueError:  # degenerate labelling: scored as the worst, as the official code does
            curve[k] = -1.0
        candidates[k] = labels
    best = max(curve, key=lambda k: (curve[k], -k))
    return Clustering(canonical(candidates[best]), best, curve)


def canonical(labels: Sequence[int]) -> list[int]:
    """Relabel clusters in order of their first member, so the same partition always has the same labels."""
    mapping: dict[int, int] = {}
    return [mapping.setdefault(int(x), len(mapping)) for x in labels]

