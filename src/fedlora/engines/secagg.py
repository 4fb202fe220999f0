"""Secure aggregation (SecAgg+, Bell et al. 2020) with Flower's own protocol code: the server learns the weighted
mean of a round's replies and the sum of their weights, never one client's update.

Client side (`client_reply`): Flower's `secaggplus_mod`, unchanged. Each client agrees keys with its neighbours,
Shamir-shares its mask seed and key, then quantizes [w_k, w_k x_k], adds its private and pairwise masks and uploads.
Server side: `secure_round.py`. `fit_secure` is one round of the loop under secure aggregation: the payloads given
their layout, the protocol over the transport's nodes, the server's `aggregate_secure` of the mean.

The transport only moves records: `exchange(stage, {client: content}) -> {client: reply content or failure}`, in
this process (`InProcessNodes`) or as Flower messages. Imported lazily (it imports Flower): the in-process engine
needs it only when `federation.secure_aggregation` is on.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from flwr.app import Context, Message, Metadata, RecordDict
from flwr.app.message_type import MessageType
from flwr.client.mod import secaggplus_mod
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.compat.common import recorddict_compat as compat

from ..algorithms import Payload, Reply, SecureMean, ServerAlgorithm
from ..core.config import Config
from ..core.seeding import derive_seed
from ..core.tensors import StateDict
from .privacy import NOISE_SHARE
from .secure_round import Protocol, secure_mean

__all__ = ["InProcessNodes", "Protocol", "client_reply", "fit_secure", "flatten", "layout_of", "node_reply", "pack",
           "secure_mean", "unflatten"]

Layout = list[tuple[str, str, tuple[int, ...]]]  # (state name, tensor key, shape) in upload order


def layout_of(states: dict[str, StateDict]) -> Layout:
    """The order in which the states' tensors travel as one vector: states and keys sorted by name."""
    return [(name, key, tuple(states[name][key].shape)) for name in sorted(states) for key in sorted(states[name])]


def flatten(states: dict[str, StateDict], layout: Layout) -> np.ndarray:
    """The states as one float64 vector in `layout`'s order (a ValueError if they do not fit it)."""
    keys = [(name, key) for name in sorted(states) for key in sorted(states[name])]
    if keys != [(name, key) for name, key, _ in layout]:
        raise ValueError(f"the reply's tensors {keys[:3]}... are not the {len(layout)} the server expects")
    parts = []
    for name, key, shape in layout:
        tensor = states[name][key]
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{name}.{key} has shape {tuple(tensor.shape)}, the server expects {shape}")
        parts.append(tensor.detach().double().reshape(-1).cpu().numpy())
    return np.concatenate(parts) if parts else np.zeros(0)


def unflatten(vector: np.ndarray, layout: Layout) -> dict[str, StateDict]:
    """The states of a vector in `layout`'s order (float32 tensors)."""
    out: dict[str, StateDict] = {}
    at = 0
    for name, key, shape in layout:
        size = math.prod(shape)
        out.setdefault(name, {})[key] = torch.from_numpy(np.array(vector[at:at + size])).float().reshape(shape)
        at += size
    return out


@contextmanager
def seeded_numpy(seed: int) -> Iterator[None]:
    """Seed numpy's global generator (Flower's stochastic rounding draws from it) for a block, then restore it."""
    saved = np.random.get_state()
    np.random.seed(seed % 2**32)
    try:
        yield
    finally:
        np.random.set_state(saved)


def node_reply(content: RecordDict, context: Context, produce: Callable[[], tuple[np.ndarray, int, dict[str, float]]],
               seed: int) -> RecordDict:
    """`client_reply` to a train message's content on the node of `context` (as its ClientApp received it)."""
    msg = Message(content, metadata=Metadata(
        run_id=context.run_id, message_id="", src_node_id=0, dst_node_id=context.node_id, reply_to_message_id="",
        group_id="", created_at=time.time(), ttl=86400.0, message_type=MessageType.TRAIN))
    return client_reply(msg, context, produce, seed).content


def is_secure(content: RecordDict) -> bool:
    """Whether a train message is a SecAgg+ stage."""
    return RECORD_KEY_CONFIGS in content.config_records


def client_reply(msg: Message, context: Context, produce: Callable[[], tuple[np.ndarray, int, dict[str, float]]],
                 seed: int) -> Message:
    """A node's answer to one SecAgg+ stage, by Flower's `secaggplus_mod`; `produce` trains and returns (vector,
    weight, metrics) in the collect stage only. The stochastic rounding is seeded, so a rerun masks the same sums."""

    def train(message: Message, ctxt: Context) -> Message:
        vector, weight, metrics = produce()
        if not np.isfinite(vector).all():  # NaN would quantize to an arbitrary integer inside the sum
            raise ValueError("the update holds non-finite values")
        fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([vector]), int(weight),
                        {k: v if isinstance(v, int) else float(v) for k, v in metrics.items()})
        return Message(compat.fitres_to_recorddict(fitres, False), reply_to=message)

    with seeded_numpy(seed):
        return secaggplus_mod(msg, context, train)


EXAMPLES = "fedlora.num_examples"  # the reply's example count, beside its metrics (the weight may be 1)
LAYOUT_KEY, WEIGHT_KEY = "fedlora.secure_layout", "fedlora.secure_weight"  # what the collect stage's payload adds


def pack(reply: Reply, layout: Layout, weight: float) -> tuple[np.ndarray, int, dict[str, float]]:
    """What a client masks and uploads: its reply's states as one vector in `layout`, its integer weight, metrics."""
    names = {name for name, _, _ in layout}
    missing = sorted(names - set(reply.states))
    if missing:
        raise ValueError(f"the reply carries no {missing}")
    if not float(weight).is_integer() or weight < 1:
        raise ValueError(f"SecAgg+ weights are positive integers, the server's weight is {weight}")
    return (flatten({n: reply.states[n] for n in names}, layout), int(weight),
            {**reply.metrics, EXAMPLES: int(reply.num_examples)})


def secure_payload(payload: Payload, layout: Layout, weight: float, protocol: Protocol) -> Payload:
    """The collect stage's payload: the method's, plus the layout and weight the client packs its reply with and,
    for privacy.dp = local, its share of the noise (any sum the server unmasks holds `threshold` clients or more)."""
    return replace(payload, config={**payload.config, LAYOUT_KEY: [[n, k, list(s)] for n, k, s in layout],
                                    WEIGHT_KEY: weight, NOISE_SHARE: 1 / math.sqrt(protocol.threshold)})


def unpack_payload(payload: Payload) -> tuple[Payload, Layout, float]:
    """The method's payload, the layout and the weight of a collect stage's payload (`secure_payload`)."""
    config = dict(payload.config)
    layout = [(str(n), str(k), tuple(int(d) for d in s)) for n, k, s in config.pop(LAYOUT_KEY)]
    return replace(payload, config=config), layout, float(config.pop(WEIGHT_KEY))


class InProcessNodes:
    """The round's clients as SecAgg+ nodes in this process: each stage's record goes through Flower's
    `secaggplus_mod` with that client's own context, as a SuperNode's ClientApp would run it."""

    def __init__(self, rnd: int, payloads: dict[str, Payload], fit: Callable[[str, Payload], Reply],
                 seed: int) -> None:
        self.rnd, self.payloads, self.fit, self.seed = rnd, payloads, fit, seed
        self.node_ids = {cid: i + 1 for i, cid in enumerate(sorted(payloads))}
        self.contexts = {cid: Context(run_id=0, node_id=nid, node_config={}, state=RecordDict(), run_config={})
                         for cid, nid in self.node_ids.items()}

    def produce(self, cid: str) -> tuple[np.ndarray, int, dict[str, float]]:
        """Train client `cid` on its collect-stage payload and pack its reply."""
        payload, layout, weight = unpack_payload(self.payloads[cid])
        return pack(self.fit(cid, payload), layout, weight)

    def exchange(self, stage: str, contents: dict[str, RecordDict]) -> dict[str, RecordDict | str]:
        """Each client's answer to its stage record, or its failure."""
        out: dict[str, RecordDict | str] = {}
        for cid, content in contents.items():
            content = recorddict_from_proto(recorddict_to_proto(content))  # as over the wire: nothing shared
            try:
                reply = node_reply(content, self.contexts[cid], lambda cid=cid: self.produce(cid),
                                   derive_seed(self.seed, "secagg-rounding", cid, self.rnd))
                out[cid] = recorddict_from_proto(recorddict_to_proto(reply))
            except Exception as exc:  # a failing client drops out of the protocol, as a node would
                out[cid] = f"{type(exc).__name__}: {exc}"
        return out


def fit_secure(rnd: int, config: Config, server: ServerAlgorithm, transport: Any, payloads: dict[str, Payload],
               show: Any) -> tuple[dict[str, Reply], dict[str, str], str | None]:
    """One round's fits under SecAgg+ and the server's `aggregate_secure` of their mean: (the replies, carrying their
    metrics only, the failures, and why nothing was aggregated or None)."""
    if len(payloads) < 3:  # with two, each client could subtract its own update from the mean
        return {}, {}, f"secure aggregation needs 3 or more clients in a round, {len(payloads)} were sampled"
    expects = {p.expects for p in payloads.values()}
    if len(expects) != 1:
        raise RuntimeError(f"{type(server).__name__} expects different states from the clients of one round "
                           f"({sorted(map(sorted, expects))}); secure aggregation sums one layout")
    names = next(iter(expects))
    templates = {n: next((p.states[n] for p in payloads.values() if n in p.states), server.lora_init()) for n in names}
    layout = layout_of(templates)
    weights = {cid: server.weight(cid) for cid in payloads}
    protocol = Protocol.for_round(config.federation.secagg, len(payloads), max(weights.values()))
    node_ids, exchange = transport.secure_nodes(
        rnd, {cid: secure_payload(p, layout, weights[cid], protocol) for cid, p in payloads.items()}, show)
    sizes: dict[str, list[int]] = {cid: [0, 0] for cid in payloads}  # bytes up, down of the protocol's messages

    def counted(stage: str, contents: dict[str, RecordDict]) -> dict[str, RecordDict | str]:
        answers = exchange(stage, contents)
        for cid, content in contents.items():
            sizes[cid][1] += recorddict_to_proto(content).ByteSize()
            if isinstance(answers.get(cid), RecordDict):
                sizes[cid][0] += recorddict_to_proto(answers[cid]).ByteSize()
        return answers

    length = sum(math.prod(shape) for _, _, shape in layout)
    result = secure_mean(protocol, node_ids, length, counted, config.seed, rnd,
                         {cid: int(w) for cid, w in weights.items()}, max(3, config.federation.min_clients))
    replies = {}
    for cid, (_, metrics) in result.metrics.items():
        examples = int(metrics.pop(EXAMPLES, 0))
        replies[cid] = Reply({}, examples, metrics, protocol_bytes=(sizes[cid][0], sizes[cid][1]))
    if result.problem is None:  # the weights the server assigned, not those the replies claim
        total = sum(weights[cid] for cid in result.clients)
        server.aggregate_secure(rnd, SecureMean(unflatten(result.mean, layout), total, result.clients))
    return replies, dict(result.failures), result.problem
