"""Checking a client's reply before aggregation: the server accepts tensors from parties it does not control.

Every named state in a reply must be one of the shapes an adapter state can take for this model: a whole
LoRA expert (A and B for every adapted module, one rank), one half of it (A only or B only, as FFA-LoRA and
FedSA-LoRA send), or a router (every module, one slot count); floating point, finite, and (optionally)
within a norm bound; it must carry the states its payload expects, and (unless the method takes heterogeneous
ranks) every LoRA at rank lora.r. A reply that fails is treated like a missing one and never reaches another client.

A client's evaluation is checked too (`evaluation_problem`): its metrics are averaged into the run's summary
and written to metrics.jsonl, so one NaN, infinite or out-of-range value would spoil both.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from ..adapters import AdapterSpec
from ..algorithms import Payload, Reply, lora_rank
from ..core.tensors import StateDict

if TYPE_CHECKING:  # only an annotation; the runtime pulls in the training stack
    from .runtime import Evaluation

UNIT_METRICS = ("accuracy", "macro_f1", "exact_match")  # fractions, like every rouge* score
# An evaluation's loss is a mean cross-entropy: a uniform guess over a 150k-token vocabulary gives 12, so a loss
# above LOSS_LIMIT is no measurement; any other metric a task does not declare is bounded by METRIC_LIMIT (a
# perplexity of a random 150k-vocabulary model is 1.5e5). Either way one node cannot make the run's mean absurd.
LOSS_LIMIT = 1e4
METRIC_LIMIT = 1e6
# an example count beyond this is a lie (and near it float weights lose their meaning)
MAX_EXAMPLES = 10**12


def _number_problem(what: str, value: object) -> str | None:
    # bool is an int subclass, but a JSON `true` is no measurement
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"{what} is not a number: {value!r:.80}"
    if not math.isfinite(value):
        return f"{what} is not a finite number: {value!r}"
    return None


def metrics_problem(metrics: object, what: str = "metric") -> str | None:
    """Why `metrics` is not a dict of str -> finite number, or None."""
    if not isinstance(metrics, dict):
        return f"the {what}s are a {type(metrics).__name__}, not a mapping"
    for key, value in metrics.items():
        if not isinstance(key, str):
            return f"{what} name {key!r:.80} is not a string"
        problem = _number_problem(f"{what} {key!r:.80}", value)
        if problem:
            return problem
    return None


def count_problem(value: object, minimum: int = 0) -> str | None:
    """Why `value` is not a usable example count (an int in [minimum, MAX_EXAMPLES]), or None."""
    if isinstance(value, bool) or not isinstance(value, int):
        return f"num_examples must be an integer, got {value!r:.80}"
    if not minimum <= value <= MAX_EXAMPLES:
        shown = repr(value) if abs(value) < 10**15 else f"an integer of {value.bit_length()} bits"
        return f"num_examples must be between {minimum} and {MAX_EXAMPLES:.0e}, got {shown}"
    return None


def evaluation_problem(evaluation: Evaluation) -> str | None:
    """Why a client's evaluation cannot enter the run's records: a metric that is not a finite number or
    lies outside its range (accuracy, macro_f1, exact_match, rouge* in [0, 1]; loss >= 0), or diagnostics
    that are not numbers or {name: number} dicts; None when it is acceptable."""
    problem = metrics_problem(evaluation.metrics)
    if problem:
        return problem
    for key, value in evaluation.metrics.items():
        if (key in UNIT_METRICS or key.startswith("rouge")) and not 0 <= value <= 1:
            return f"metric {key!r} is {value!r}, outside [0, 1]"
        if key == "loss" and not 0 <= value <= LOSS_LIMIT:
            return f"metric 'loss' is {value!r}, outside [0, {LOSS_LIMIT:g}]"
        if key != "loss" and abs(value) > METRIC_LIMIT:
            return f"metric {key!r:.80} is {value!r}, beyond +-{METRIC_LIMIT:g}"
    if not isinstance(evaluation.diagnostics, dict):
        return f"the diagnostics are a {type(evaluation.diagnostics).__name__}, not a mapping"
    for key, value in evaluation.diagnostics.items():
        what = f"diagnostic {key!r:.80}"
        if not isinstance(key, str):
            return f"{what} has a name that is not a string"
        problem = metrics_problem(value, what) if isinstance(value, dict) else _number_problem(what, value)
        if problem:
            return problem
    return None


def state_problem(name: str, state: StateDict, spec: AdapterSpec, max_norm: float | None) -> str | None:
    """Why this adapter state is unacceptable, or None."""
    dims = {path: (d_in, d_out) for path, d_in, d_out in spec.modules}
    suffixes = {k.rsplit(".", 1)[-1] for k in state}
    if not state:
        return f"state {name!r} is empty"
    if suffixes == {"router"}:
        expected = {f"{p}.router" for p in dims}
    elif suffixes <= {"lora_A", "lora_B"}:
        expected = {f"{p}.{s}" for p in dims for s in suffixes}
    else:
        return f"state {name!r} has keys that are neither LoRA nor router tensors: {sorted(suffixes)[:4]}"
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        return f"state {name!r} has the wrong keys (missing {missing[:2]}, unexpected {extra[:2]})"
    ranks = set()
    for key, value in state.items():
        path, kind = key.rsplit(".", 1)
        d_in, d_out = dims[path]
        if not torch.is_tensor(value) or not value.is_floating_point():
            return f"{name}/{key} is not a floating-point tensor"
        if value.dtype != torch.float32:
            return f"{name}/{key} has dtype {value.dtype}; adapter states travel as float32"
        if value.dim() != 2:
            return f"{name}/{key} has shape {tuple(value.shape)}, expected a matrix"
        if kind == "lora_A" and value.shape[1] != d_in or kind == "router" and value.shape[1] != d_in:
            return f"{name}/{key} has shape {tuple(value.shape)}, but the module's input size is {d_in}"
        if kind == "lora_B" and value.shape[0] != d_out:
            return f"{name}/{key} has shape {tuple(value.shape)}, but the module's output size is {d_out}"
        ranks.add(value.shape[0] if kind in ("lora_A", "router") else value.shape[1])
        if not bool(torch.isfinite(value).all()):
            return f"{name}/{key} holds NaN or infinite values"
    if len(ranks) != 1:
        return f"state {name!r} mixes ranks or slot counts {sorted(ranks)} across modules"
    if max_norm is not None:
        norm = math.sqrt(sum(float(v.double().pow(2).sum()) for v in state.values()))
        if norm > max_norm:
            return f"state {name!r} has norm {norm:.3g} > federation.max_state_norm={max_norm}"
    return None


def reply_problem(reply: Reply, payload: Payload, spec: AdapterSpec, max_norm: float | None = None,
                  any_rank: bool = False) -> str | None:
    """Why a client's reply to `payload` must be rejected, or None when it is acceptable."""
    problem = count_problem(reply.num_examples) or metrics_problem(reply.metrics)
    if problem:
        return problem
    missing = sorted(payload.expects - set(reply.states))
    if missing:
        return f"the reply lacks the state(s) {missing} this method aggregates this round"
    for name, state in reply.states.items():
        problem = state_problem(name, state, spec, max_norm)
        if problem:
            return problem
        rank = lora_rank(state)
        if not any_rank and rank is not None and rank != spec.r:
            return f"state {name!r} has LoRA rank {rank}, but this method aggregates rank lora.r={spec.r} only"
    return None
