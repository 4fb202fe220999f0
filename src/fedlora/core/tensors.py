"""Math on flat adapter-state dicts (`dict[str, Tensor]`), the unit that crosses every boundary."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch

StateDict = dict[str, torch.Tensor]


def weighted_mean(states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float] | None = None) -> StateDict:
    """Key-wise weighted mean of state dicts with identical keys; weights are normalised to sum 1."""
    keys = _same_keys(states)
    if weights is None:
        weights = [1.0] * len(states)
    if len(weights) != len(states):
        raise ValueError(f"got {len(states)} states but {len(weights)} weights")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError(f"weights must sum to a positive number, got {list(weights)}")
    out: StateDict = {}
    for k in keys:
        acc = torch.zeros_like(states[0][k], dtype=torch.float64)
        for s, w in zip(states, weights):
            acc += s[k].to(torch.float64) * (w / total)
        out[k] = acc.to(states[0][k].dtype)
    return out


def _same_keys(states: Sequence[Mapping[str, torch.Tensor]]) -> list[str]:
    if not states:
        raise ValueError("aggregation needs at least one state")
    keys = list(states[0])
    for s in states[1:]:
        if set(s) != set(keys):
            raise ValueError(f"states have different keys: {sorted(set(s) ^ set(keys))[:5]}")
    return keys


def coordinate_median(states: Sequence[Mapping[str, torch.Tensor]]) -> StateDict:
    """Key-wise, element-wise median of state dicts (the mean of the two middle values for an even count)."""
    keys = _same_keys(states)
    return {k: torch.stack([s[k].to(torch.float64) for s in states]).quantile(0.5, dim=0).to(states[0][k].dtype)
            for k in keys}


def trimmed_mean(states: Sequence[Mapping[str, torch.Tensor]], fraction: float) -> StateDict:
    """Key-wise, element-wise mean after dropping the floor(fraction * n) largest and smallest values of each
    element (Yin et al. 2018); fraction 0 is the plain mean."""
    keys = _same_keys(states)
    n, cut = len(states), int(fraction * len(states))  # fraction < 0.5 always leaves at least one value
    out: StateDict = {}
    for k in keys:
        values = torch.stack([s[k].to(torch.float64) for s in states]).sort(dim=0).values
        out[k] = values[cut : n - cut].mean(0).to(states[0][k].dtype)
    return out


def same_layout(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> bool:
    """Whether two states have the same keys with the same shapes (one can be the start of the other)."""
    return set(a) == set(b) and all(a[k].shape == b[k].shape for k in a)


def start_if_fresh(init: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> StateDict | None:
    """The seeded LoRA init as the start of `state` when it has the init's layout (a fresh LoRA's first upload,
    which starts from it), else None."""
    return dict(init) if same_layout(init, state) else None


def norm(state: Mapping[str, torch.Tensor]) -> float:
    """The L2 norm of a whole state (every tensor as one vector)."""
    return float(sum(float(v.double().pow(2).sum()) for v in state.values())) ** 0.5


def add(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], alpha: float = 1.0) -> StateDict:
    """Return a + alpha * b, key by key."""
    return {k: a[k] + alpha * b[k] for k in a}


def scale(a: Mapping[str, torch.Tensor], factor: float) -> StateDict:
    """Return factor * a, key by key."""
    return {k: v * factor for k, v in a.items()}


def zeros_like(a: Mapping[str, torch.Tensor]) -> StateDict:
    """A state of zeros with a's keys, shapes and dtypes."""
    return {k: torch.zeros_like(v) for k, v in a.items()}


def clone(a: Mapping[str, torch.Tensor]) -> StateDict:
    """A detached deep copy."""
    return {k: v.detach().clone() for k, v in a.items()}


def num_bytes(states: Iterable[Mapping[str, torch.Tensor]]) -> int:
    """Bytes of all tensors in the given states, as they would be sent."""
    return sum(v.numel() * v.element_size() for s in states for v in s.values())


def flatten(named: Mapping[str, Mapping[str, torch.Tensor]], sep: str = "/") -> StateDict:
    """{"global": {"x": t}} -> {"global/x": t}: named states into one flat dict for files and wires."""
    out: StateDict = {}
    for name, state in named.items():
        if sep in name:
            raise ValueError(f"state name {name!r} may not contain {sep!r}")
        for k, v in state.items():
            out[f"{name}{sep}{k}"] = v
    return out


def unflatten(flat: Mapping[str, torch.Tensor], sep: str = "/") -> dict[str, StateDict]:
    """Inverse of `flatten`."""
    out: dict[str, StateDict] = {}
    for key, v in flat.items():
        name, _, k = key.partition(sep)
        out.setdefault(name, {})[k] = v
    return out
