"""One seed fixes everything: every random stream is derived from it by name."""

from __future__ import annotations

import hashlib
import random

import numpy as np
import torch


def derive_seed(seed: int, *names: object) -> int:
    """Return a 63-bit seed that depends only on `seed` and the names (stable across processes)."""
    digest = hashlib.sha256(repr((int(seed),) + tuple(str(n) for n in names)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def generator(seed: int, *names: object) -> torch.Generator:
    """A torch CPU generator seeded with `derive_seed(seed, *names)`."""
    return torch.Generator().manual_seed(derive_seed(seed, *names))


def numpy_rng(seed: int, *names: object) -> np.random.Generator:
    """A numpy generator seeded with `derive_seed(seed, *names)`."""
    return np.random.default_rng(derive_seed(seed, *names))


def seed_everything(seed: int, *names: object) -> None:
    """Seed Python, numpy and torch's global generators (dropout draws from torch's)."""
    value = derive_seed(seed, *names)
    random.seed(value)
    np.random.seed(value % (2**32))
    torch.manual_seed(value)
