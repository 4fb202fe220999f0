"""Seeded client sampling, shared by every engine so that they pick the same clients."""

from __future__ import annotations

from collections.abc import Sequence

from ..core.seeding import numpy_rng


def sample_clients(client_ids: Sequence[str], per_round: int | None, seed: int, rnd: int) -> list[str]:
    """The clients of round `rnd`: all of them, or `per_round` drawn without replacement (in client order)."""
    if per_round is None or per_round >= len(client_ids):
        return list(client_ids)
    picked = set(numpy_rng(seed, "sample", rnd).choice(len(client_ids), size=per_round, replace=False).tolist())
    return [cid for i, cid in enumerate(client_ids) if i in picked]
