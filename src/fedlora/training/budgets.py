"""Per-client compute budgets: data-parallel workers, local steps or epochs, batch size and LoRA rank.

`[clients]` settings are resolved here against the clients' training-set sizes, so every process that
builds the same split (the in-process engine, every Flower SuperNode) gives a client the same budget.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..core.config import Config, TrainingConfig
from ..core.per_client import ProportionalRule
from ..core.errors import ConfigError


@dataclass(frozen=True)
class ClientBudget:
    """What one client trains with: its worker count, its local-training settings and its LoRA rank."""

    workers: int
    training: TrainingConfig
    lora_r: int


def per_client(value: Any, key: str, sizes: dict[str, int], default: float | None,
               whole_split: bool = True) -> dict[str, float | None]:
    """Resolve one `[clients]` setting to a value per client id (`sizes`: training examples, in client order).

    None keeps `default` everywhere; a number applies to every client; a list gives one value per client in
    client order; a mapping overrides the clients it names; the proportional rule gives client k
    base * n_k / n_max clipped to [min, max] (rounding is the caller's: epochs stay fractional).
    Not `whole_split` (a data owner that sees only its own data): a mapping may name other clients, and
    lists and the rule, which need every client, are refused.
    """
    ids = list(sizes)
    if value is None:
        return dict.fromkeys(ids, default)
    if not whole_split and isinstance(value, (list, ProportionalRule)):
        raise ConfigError(f"clients.{key} needs every client's place or data size, but this data owner sees only "
                          f"its own data; give a mapping client id -> value instead")
    if isinstance(value, list):
        if len(value) != len(ids):
            raise ConfigError(f"clients.{key} has {len(value)} entries for {len(ids)} clients; give one per client, "
                              f"in client order ({', '.join(ids)}), or use a mapping client id -> value")
        return dict(zip(ids, value))
    if isinstance(value, dict):
        unknown = sorted(set(value) - set(ids))
        if unknown and whole_split:
            raise ConfigError(f"clients.{key} names unknown clients {unknown}; the clients are {', '.join(ids)}")
        return {cid: value.get(cid, default) for cid in ids}
    if isinstance(value, ProportionalRule):
        base = value.base if value.base is not None else default
        if base is None:
            raise ConfigError(f"clients.{key} = proportional needs a base value: set clients.{key}.base")
        top, low, high = max(sizes.values()), value.min, value.max if value.max is not None else base
        if low > high:
            raise ConfigError(f"clients.{key}: min {low} is larger than max {high}")
        return {cid: min(high, max(low, base * n / top)) for cid, n in sizes.items()}
    return dict.fromkeys(ids, value)


def client_budgets(cfg: Config, sizes: dict[str, int], whole_split: bool = True) -> dict[str, ClientBudget]:
    """Every client's budget from the config and the clients' training-set sizes (client order)."""
    c, t = cfg.clients, cfg.training
    as_int = lambda v: None if v is None else max(1, int(v + 0.5))  # noqa: E731  (half up, not to even)
    resolve = lambda value, key, default: per_client(value, key, sizes, default, whole_split)  # noqa: E731
    workers = resolve(c.workers, "workers", None)
    batch = resolve(c.batch_size, "batch_size", t.batch_size)
    ranks = resolve(c.lora_r, "lora_r", cfg.lora.r)
    steps = resolve(c.local_steps, "local_steps", t.local_steps)
    epochs = resolve(c.local_epochs, "local_epochs", t.local_epochs)
    budgets = {}
    for cid in sizes:
        budget = {"batch_size": as_int(batch[cid])}
        if c.local_steps is not None:  # a per-client step count replaces a global epoch count, and vice versa
            budget.update(local_steps=as_int(steps[cid]), local_epochs=None)
        elif c.local_epochs is not None:
            budget.update(local_steps=None, local_epochs=float(epochs[cid]))
        # workers have no global setting: a client a mapping leaves out has one (and the rule needs a base)
        budgets[cid] = ClientBudget(as_int(workers[cid]) or 1, t.model_copy(update=budget), as_int(ranks[cid]))
    return budgets
