"""One seed fixes everything: every random stream is derived from it by name."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from contextlib import contextmanager

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


class RandomStream:
    """A saved state of torch's global generators (CPU, and CUDA when present), to be resumed later.

    Several clients trained in one pass each keep their own dropout stream this way: torch's dropout (and the
    dropout inside scaled_dot_product_attention) take no generator, so a client's draws are made with its
    stream put in place of the global one (`active`), exactly as they would be when it trains alone.
    """

    def __init__(self) -> None:
        self.capture()

    def capture(self) -> None:
        """Save the global generators' current state into this stream."""
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None

    def copy(self) -> "RandomStream":
        """An independent copy of this stream at its current state."""
        twin = RandomStream.__new__(RandomStream)
        twin.load(self)
        return twin

    def load(self, other: "RandomStream") -> None:
        """Set this stream to another's state (this object, which others may hold, stays the one that advances)."""
        self.cpu, self.cuda = other.cpu.clone(), None if other.cuda is None else [s.clone() for s in other.cuda]

    def restore(self) -> None:
        """Make this stream's state the global generators' state."""
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)

    @contextmanager
    def active(self) -> Iterator[None]:
        """Within the block the global generators draw from this stream (which advances); outside they are as before."""
        outside = RandomStream()
        self.restore()
        try:
            yield
        finally:
            self.capture()
            outside.restore()
