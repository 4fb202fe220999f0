"""Seeded partitioners: which example indices each client gets.

Written here rather than taken from flwr-datasets because they must work on plain lists of records,
split several tasks independently, and draw from fedlora's derived seeds.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..core.errors import DataError


def iid(n_examples: int, n_clients: int, rng: np.random.Generator) -> list[list[int]]:
    """Shuffle and deal the indices round-robin: sizes differ by at most one."""
    order = rng.permutation(n_examples)
    return [sorted(order[c::n_clients].tolist()) for c in range(n_clients)]


def dirichlet(labels: Sequence[object], n_clients: int, alpha: float, rng: np.random.Generator,
              min_per_client: int = 1, max_tries: int = 100) -> list[list[int]]:
    """Label skew: each class is split over clients with proportions drawn from Dir(alpha).

    Smaller alpha gives more skewed clients. Redraws until every client has `min_per_client` examples.
    """
    if alpha <= 0:
        raise DataError(f"dirichlet alpha must be positive, got {alpha}")
    labels = np.asarray([str(x) for x in labels])
    if len(labels) < n_clients * min_per_client:
        raise DataError(f"{len(labels)} examples cannot give {n_clients} clients {min_per_client} each")
    classes = sorted(set(labels.tolist()))
    for _ in range(max_tries):
        parts: list[list[int]] = [[] for _ in range(n_clients)]
        for cls in classes:
            idx = rng.permutation(np.flatnonzero(labels == cls))
            cuts = (np.cumsum(rng.dirichlet([alpha] * n_clients)) * len(idx)).astype(int)[:-1]
            for c, chunk in enumerate(np.split(idx, cuts)):
                parts[c].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_per_client:
            return [sorted(p) for p in parts]
    raise DataError(f"could not give every one of {n_clients} clients {min_per_client} examples with "
                    f"alpha={alpha} in {max_tries} draws; raise data.dirichlet_alpha or lower the client count")


def train_test_split(indices: Sequence[int], n_train: int, n_test: int, rng: np.random.Generator) -> tuple[list[int], list[int]]:
    """Disjoint train/test subsets of a client's indices; test takes its share first so it never comes up empty."""
    order = rng.permutation(np.asarray(indices, dtype=int))
    n_test = min(n_test, max(1, len(order) // 5))
    test, rest = order[:n_test], order[n_test:]
    return sorted(rest[:n_train].tolist()), sorted(test.tolist())
