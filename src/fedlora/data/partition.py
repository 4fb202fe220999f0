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


def dirichlet(labels: Sequence[object], n_clients: int, alpha: float, size: int,
              rng: np.random.Generator) -> list[list[int]]:
    """Label skew with equal client sizes: client k draws class proportions q_k ~ Dir(alpha), then `size`
    examples in those proportions, without replacement across clients. A class that runs out is topped up
    from the classes with examples left, in proportion to q_k. Smaller alpha gives more skewed clients."""
    if alpha <= 0:
        raise DataError(f"dirichlet alpha must be positive, got {alpha}")
    labels = np.asarray([str(x) for x in labels])
    if len(labels) < n_clients * size:
        raise DataError(f"{len(labels)} examples cannot give {n_clients} clients {size} each")
    classes = sorted(set(labels.tolist()))
    remaining = {c: rng.permutation(np.flatnonzero(labels == c)).tolist() for c in classes}
    parts = []
    for _ in range(n_clients):
        q = rng.dirichlet([alpha] * len(classes))
        part: list[int] = []
        for c, n in zip(classes, rng.multinomial(size, q)):
            part += remaining[c][:n]
            remaining[c] = remaining[c][n:]
        while len(part) < size:
            left = [i for i, c in enumerate(classes) if remaining[c]]
            weights = q[left] + 1e-12
            c = classes[left[rng.choice(len(left), p=weights / weights.sum())]]
            part.append(remaining[c].pop(0))
        parts.append(sorted(part))
    return parts


def train_test_split(indices: Sequence[int], n_train: int, n_test: int, rng: np.random.Generator) -> tuple[list[int], list[int]]:
    """Disjoint train/test subsets of a client's indices; when there are too few, both shrink in proportion
    (at least one example each)."""
    order = rng.permutation(np.asarray(indices, dtype=int))
    if len(order) < n_train + n_test:
        if len(order) < 2:
            raise DataError(f"a client with {len(order)} example(s) cannot have both a train and a test split")
        n_test = min(max(1, round(len(order) * n_test / (n_train + n_test))), len(order) - 1)
        n_train = len(order) - n_test
    return sorted(order[n_test: n_test + n_train].tolist()), sorted(order[:n_test].tolist())


def by_key(keys: Sequence[object], n_clients: int) -> list[list[int]]:
    """Natural partition: the distinct values of a key (language, category, ...) dealt round-robin to clients,
    so with as many clients as values each client holds exactly one value."""
    values = sorted({str(k) for k in keys})
    if len(values) < n_clients:
        raise DataError(f"{len(values)} distinct key values cannot fill {n_clients} clients; lower clients_per_task")
    owner = {v: i % n_clients for i, v in enumerate(values)}
    parts: list[list[int]] = [[] for _ in range(n_clients)]
    for i, k in enumerate(keys):
        parts[owner[str(k)]].append(i)
    return parts
