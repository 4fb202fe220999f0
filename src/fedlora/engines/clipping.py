"""Update clipping (`federation.update_clip`): bound how far one client can move what the server aggregates.

A client's update is the state it sends minus what it started from (`ServerAlgorithm.update_reference`:
the state it received, FedALT's previous Individual LoRA, the cluster LoRA IFCA's client chose; else, for a
LoRA the server never sent (FedLEASE's warm-up LoRA, a first Individual LoRA), the run's shared seeded LoRA
init every client starts one from, as DP's clip takes it), or the state itself where no start is known. An
update whose L2 norm exceeds the bound is scaled down to it: the bound is a fixed norm, or `update_clip_factor`
x the median norm of the round's updates of that kind (state name, with or without a start), which an honest
majority sets.
"""

from __future__ import annotations

import statistics
from dataclasses import replace

from ..algorithms import Payload, Reply, ServerAlgorithm
from ..core.config import FederationConfig
from ..core.tensors import StateDict, norm, same_layout, start_if_fresh

MIN_FOR_MEDIAN = 3  # with fewer updates one poisoned update can be the median itself


def clip_updates(server: ServerAlgorithm, payloads: dict[str, Payload], replies: dict[str, Reply],
                 cfg: FederationConfig) -> tuple[dict[str, Reply], dict[str, dict[str, float]]]:
    """The replies with every update above its bound scaled down to it, and {client: {state: factor}} of the
    updates that were clipped (factor < 1)."""
    if cfg.update_clip is None or not replies:
        return replies, {}
    updates: dict[tuple[str, str], tuple[StateDict | None, float]] = {}
    for cid, reply in replies.items():
        for name, state in reply.states.items():
            ref = server.update_reference(cid, name, payloads[cid], reply)
            if ref is None:  # a fresh LoRA: without its init as the start, its A (kaiming, not small) is "the update"
                ref = start_if_fresh(server.lora_init(), state)
            elif not same_layout(ref, state):
                ref = None  # a start of another shape (a router, HetLoRA at a new rank): the state is the update
            delta = state if ref is None else {k: state[k] - ref[k] for k in state}
            updates[cid, name] = ref, norm(delta)
    bounds = _bounds(updates, cfg)
    clipped: dict[str, dict[str, float]] = {}
    out = dict(replies)
    for (cid, name), (ref, size) in updates.items():
        bound = bounds.get((name, ref is not None))
        if bound is None or size <= bound:
            continue
        factor = bound / size
        state = replies[cid].states[name]
        scaled = {k: (v * factor if ref is None else ref[k] + (v - ref[k]) * factor) for k, v in state.items()}
        out[cid] = replace(out[cid], states={**out[cid].states, name: scaled})
        clipped.setdefault(cid, {})[name] = factor
    return out, clipped


def _bounds(updates: dict[tuple[str, str], tuple[StateDict | None, float]],
            cfg: FederationConfig) -> dict[tuple[str, bool], float]:
    """The clip norm per kind of update (state name, whether it has a start)."""
    kinds: dict[tuple[str, bool], list[float]] = {}
    for (_, name), (ref, size) in updates.items():
        kinds.setdefault((name, ref is not None), []).append(size)
    if cfg.update_clip != "adaptive":
        return {kind: float(cfg.update_clip) for kind in kinds}
    return {kind: cfg.update_clip_factor * statistics.median(sizes)
            for kind, sizes in kinds.items() if len(sizes) >= MIN_FOR_MEDIAN}
