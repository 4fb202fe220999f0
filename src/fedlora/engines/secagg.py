"""Secure aggregation (SecAgg+, Bell et al. 2020) with Flower's own protocol code: the server learns the weighted
mean of a round's replies and the sum of their weights, never one client's update.

Client side (`client_reply`): Flower's `secaggplus_mod`, unchanged. Each client agrees keys with its neighbours,
Shamir-shares its mask seed and key, then quantizes [w_k, w_k x_k], adds its private and pairwise masks and uploads.

Server side (`secure_mean`): the four stages of Flower's `SecAggPlusWorkflow`, driven over fedlora's own payloads
(the workflow sends one legacy FitIns per node and hands the result to a Strategy). Every stage reply is checked
before use: a malformed one counts as that node dropping out, whose masks the others' shares remove. Fewer than
`threshold` survivors fail the round (nothing aggregated), never the run. tests/test_secagg.py shows that both
drivers give the same result on the same inputs.

The transport only moves records: `exchange(stage, {client: content}) -> {client: reply content or failure}`, in
this process or as Flower messages. Imported lazily (it imports Flower): the in-process engine needs it only when
`federation.secure_aggregation` is on.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, Metadata, RecordDict
from flwr.app.message_type import MessageType
from flwr.client.mod import secaggplus_mod
from flwr.common import Code, FitRes, Status, bytes_to_ndarray, ndarrays_to_parameters
from flwr.common.secure_aggregation.crypto.shamir import combine_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
from flwr.common.secure_aggregation.ndarrays_arithmetic import (factor_extract, parameters_addition, parameters_mod,
                                                                 parameters_subtraction)
from flwr.common.secure_aggregation.quantization import dequantize
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.compat.common import recorddict_compat as compat
from flwr.supercore.primitives.asymmetric import bytes_to_private_key, bytes_to_public_key

from ..algorithms import Payload, Reply, SecureMean, ServerAlgorithm
from ..core.config import Config, SecAggConfig
from ..core.seeding import derive_seed
from ..core.tensors import StateDict
from .privacy import NOISE_SHARE

Layout = list[tuple[str, str, tuple[int, ...]]]  # (state name, tensor key, shape) in upload order
Exchange = Callable[[str, dict[str, RecordDict]], dict[str, "RecordDict | str"]]


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


@dataclass(frozen=True)
class Protocol:
    """One round's SecAgg+ parameters, as Flower's workflow derives them from the number of sampled clients."""

    num_shares: int
    threshold: int
    clipping_range: float
    quantization_range: int
    modulus_range: int
    max_weight: float

    @classmethod
    def for_round(cls, cfg: SecAggConfig, n_sampled: int, max_weight: float) -> "Protocol":
        """Shares and threshold for `n_sampled` clients (a fraction of them, or a count), as SecAggPlusWorkflow."""
        shares = cfg.num_shares
        if isinstance(shares, float):
            shares = round(shares * n_sampled)
            if shares < n_sampled and shares % 2 == 0:
                shares += 1
            if shares <= 2:
                shares = n_sampled
        shares = min(int(shares), n_sampled)
        threshold = cfg.reconstruction_threshold
        threshold = max(round(threshold * shares), 2) if isinstance(threshold, float) else int(threshold)
        return cls(shares, min(threshold, shares), cfg.clipping_range, cfg.quantization_range, cfg.modulus_range,
                   float(max_weight))

    def setup_record(self, n_sampled: int) -> dict[str, Any]:
        """The setup stage's config, as SecAggPlusWorkflow sends it."""
        return {Key.STAGE: Stage.SETUP, Key.SAMPLE_NUMBER: n_sampled, Key.SHARE_NUMBER: self.num_shares,
                Key.THRESHOLD: self.threshold, Key.CLIPPING_RANGE: float(self.clipping_range),
                Key.TARGET_RANGE: self.quantization_range, Key.MOD_RANGE: self.modulus_range,
                Key.MAX_WEIGHT: float(self.max_weight)}


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


@dataclass
class SecureResult:
    """What a secure round gives the server: the weighted mean vector and the survivors' metrics, or why it failed."""

    mean: np.ndarray | None
    weight: float = 0.0                                            # the sum of the survivors' weights
    clients: list[str] = field(default_factory=list)               # whose updates are in the mean
    metrics: dict[str, tuple[int, dict[str, float]]] = field(default_factory=dict)  # cid -> (weight, metrics)
    failures: dict[str, str] = field(default_factory=dict)
    problem: str | None = None                                     # why nothing was aggregated


def _configs(reply: RecordDict | str) -> ConfigRecord:
    if isinstance(reply, str):
        raise ValueError(reply)
    record = reply.config_records.get(RECORD_KEY_CONFIGS)
    if record is None:
        raise ValueError("its reply holds no SecAgg+ record")
    return record


def _list_of(value: Any, kind: type, name: str) -> list:
    if not isinstance(value, list) or any(type(v) is not kind for v in value):  # noqa: E721 (bool is an int)
        raise ValueError(f"{name} is not a list of {kind.__name__}")
    return value


class SecureRound:
    """The server's side of one SecAgg+ round between `node_ids` (client id -> SecAgg+ node id)."""

    def __init__(self, protocol: Protocol, node_ids: dict[str, int], length: int, seed: int, rnd: int) -> None:
        self.p, self.length = protocol, length
        self.node_ids = node_ids
        self.cid_of = {nid: cid for cid, nid in node_ids.items()}
        order = sorted(node_ids)
        random.Random(derive_seed(seed, "secagg-neighbours", rnd)).shuffle(order)
        half = protocol.num_shares >> 1
        self.neighbours = {cid: {order[(i + o) % len(order)] for o in range(-half, half + 1)}
                           for i, cid in enumerate(order)}
        self.active = set(order)
        self.sampled = set(order)
        self.failures: dict[str, str] = {}
        self.public_keys: dict[str, tuple[bytes, bytes]] = {}

    def _drop(self, cid: str, stage: str, reason: Any) -> None:
        self.active.discard(cid)
        self.failures[cid] = f"secure aggregation, {stage} stage: {reason}"

    def _enough(self, nodes: set[str]) -> str | None:
        for cid in sorted(nodes):
            alive = len(self.neighbours[cid] & self.active)
            if alive < self.p.threshold:
                return (f"{cid} has {alive} live neighbours, fewer than the reconstruction threshold "
                        f"{self.p.threshold}: nothing aggregated")
        return None

    def run(self, exchange: Exchange) -> SecureResult:
        """The four stages; a SecureResult with the mean, or with the problem that stopped the round."""
        for stage in (self._setup, self._share_keys, self._collect, self._unmask):
            problem = stage(exchange)
            if problem:
                return SecureResult(None, failures=self.failures, problem=problem)
        return self.result

    def _ask(self, exchange: Exchange, stage: str, contents: dict[str, dict[str, Any]]) -> dict[str, ConfigRecord]:
        replies = exchange(stage, {cid: RecordDict({RECORD_KEY_CONFIGS: ConfigRecord(c)}) for cid, c in contents.items()})
        out = {}
        for cid in contents:
            try:
                out[cid] = _configs(replies.get(cid, "no reply"))
            except Exception as exc:  # any malformed reply: that node is out, never the round
                self._drop(cid, stage, exc)
        return out

    def _setup(self, exchange: Exchange) -> str | None:
        record = self.p.setup_record(len(self.sampled))
        for cid, configs in self._ask(exchange, Stage.SETUP, {cid: dict(record) for cid in sorted(self.active)}).items():
            try:
                pk1, pk2 = configs[Key.PUBLIC_KEY_1], configs[Key.PUBLIC_KEY_2]
                if not (isinstance(pk1, bytes) and isinstance(pk2, bytes)):
                    raise ValueError("its public keys are not bytes")
                bytes_to_public_key(pk1), bytes_to_public_key(pk2)
                self.public_keys[cid] = (pk1, pk2)
            except Exception as exc:
                self._drop(cid, Stage.SETUP, exc)
        owners: dict[bytes, list[str]] = {}
        for cid, pair in self.public_keys.items():
            for key in set(pair):
                owners.setdefault(key, []).append(cid)
        for cid, pair in list(self.public_keys.items()):  # a replayed key would let its sender read another's shares
            if pair[0] == pair[1] or any(len(owners[k]) > 1 for k in pair):
                self._drop(cid, Stage.SETUP, "a public key that another node also sent")
        return self._enough(self.active)

    def _share_keys(self, exchange: Exchange) -> str | None:
        contents, keyed = {}, set(self.active)
        for cid in sorted(self.active):
            keys = {str(self.node_ids[n]): list(self.public_keys[n]) for n in self.neighbours[cid] & self.active}
            contents[cid] = {**keys, Key.STAGE: Stage.SHARE_KEYS}
        self.forward: dict[str, tuple[list[int], list[bytes]]] = {cid: ([], []) for cid in self.active}
        self.sources: dict[str, set[str]] = {cid: set() for cid in self.active}  # whose shares each node holds
        for cid, configs in self._ask(exchange, Stage.SHARE_KEYS, contents).items():
            try:
                dsts = _list_of(configs[Key.DESTINATION_LIST], int, "dsts")
                ciphertexts = _list_of(configs[Key.CIPHERTEXT_LIST], bytes, "ctxts")
                if len(dsts) != len(ciphertexts):
                    raise ValueError("as many destinations as ciphertexts expected")
                expected = {self.node_ids[n] for n in self.neighbours[cid] & keyed if n != cid}
                if sorted(dsts) != sorted(expected):  # else its neighbours would lack its shares
                    raise ValueError(f"its shares go to nodes {sorted(dsts)[:5]}, not to its {len(expected)} neighbours")
            except Exception as exc:
                self._drop(cid, Stage.SHARE_KEYS, exc)
                continue
            for dst, ciphertext in zip(dsts, ciphertexts):
                target = self.cid_of.get(dst)
                if target in self.forward and target in self.neighbours[cid]:
                    self.forward[target][0].append(self.node_ids[cid])
                    self.forward[target][1].append(ciphertext)
                    self.sources[target].add(cid)
        self.shared = set(self.active)  # their shares are out: each is unmasked below, alive or not
        return self._enough(self.active)

    def _collect(self, exchange: Exchange) -> str | None:
        contents = {cid: {Key.STAGE: Stage.COLLECT_MASKED_VECTORS, Key.CIPHERTEXT_LIST: self.forward[cid][1],
                          Key.SOURCE_LIST: self.forward[cid][0]} for cid in sorted(self.active)}
        replies = exchange(Stage.COLLECT_MASKED_VECTORS,
                           {cid: RecordDict({RECORD_KEY_CONFIGS: ConfigRecord(c)}) for cid, c in contents.items()})
        masked: list[np.ndarray] | None = None
        self.metrics: dict[str, tuple[int, dict[str, float]]] = {}
        for cid in contents:
            reply = replies.get(cid, "no reply")
            try:
                blobs = _list_of(_configs(reply)[Key.MASKED_PARAMETERS], bytes, "masked_params")
                vector = [bytes_to_ndarray(b) for b in blobs]
                shapes = [v.shape for v in vector]
                if shapes != [(1,), (self.length,)] or any(v.dtype.kind not in "iu" for v in vector):
                    raise ValueError(f"its masked vector has shapes {shapes}, expected [(1,), ({self.length},)]")
                fitres = compat.recorddict_to_fitres(reply, keep_input=True)
                metrics = {k: v for k, v in fitres.metrics.items()
                           if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
                weight = int(fitres.num_examples)
            except Exception as exc:
                self._drop(cid, Stage.COLLECT_MASKED_VECTORS, exc)
                continue
            vector = [v.astype(np.int64) for v in vector]
            masked = vector if masked is None else parameters_addition(masked, vector)
            self.metrics[cid] = (weight, metrics)
        self.masked = None if masked is None else parameters_mod(masked, self.p.modulus_range)
        self.contributed = set(self.metrics)
        return self._enough(self.shared) or (None if self.masked is not None else "no masked vector arrived")

    def _unmask(self, exchange: Exchange) -> str | None:
        alive, dead = self.contributed, self.shared - self.contributed
        held = {cid: self.sources.get(cid, set()) | {cid} for cid in self.active}  # each node's shares: its own too
        contents = {cid: {Key.STAGE: Stage.UNMASK,
                          Key.ACTIVE_NODE_ID_LIST: [self.node_ids[n] for n in sorted(held[cid] & alive)],
                          Key.DEAD_NODE_ID_LIST: [self.node_ids[n] for n in sorted(held[cid] & dead)]}
                    for cid in sorted(self.active)}
        shares: dict[str, list[bytes]] = {cid: [] for cid in self.shared}
        for cid, configs in self._ask(exchange, Stage.UNMASK, contents).items():
            try:
                nids = _list_of(configs[Key.NODE_ID_LIST], int, "nids")
                blobs = _list_of(configs[Key.SHARE_LIST], bytes, "shares")
                if len(nids) != len(blobs):
                    raise ValueError("as many node ids as shares expected")
            except Exception as exc:
                self.failures.setdefault(cid, f"secure aggregation, {Stage.UNMASK} stage: {exc}")
                continue
            for nid, share in zip(nids, blobs):
                owner = self.cid_of.get(nid)
                if owner in shares and owner in held[cid]:
                    shares[owner].append(share)
        vector = self.masked
        shapes = [v.shape for v in vector]
        for owner, owner_shares in sorted(shares.items()):
            if len(owner_shares) < self.p.threshold:
                return f"only {len(owner_shares)} shares of {owner}'s secrets arrived, fewer than the threshold {self.p.threshold}"
            try:
                secret = combine_shares(owner_shares[:self.p.threshold])  # any t of them: Lagrange is O(t^2)
                if owner in alive:  # remove its private mask
                    vector = parameters_subtraction(vector, pseudo_rand_gen(secret, self.p.modulus_range, shapes))
                    continue
                key = bytes_to_private_key(secret)  # a dropped node: rebuild its pairwise masks with the live ones
                for other in sorted(alive):
                    if owner not in self.sources.get(other, set()):  # it never masked against the dropped node
                        continue
                    mask = pseudo_rand_gen(generate_shared_key(key, bytes_to_public_key(self.public_keys[other][0])),
                                           self.p.modulus_range, shapes)
                    mine = self.node_ids[owner] > self.node_ids[other]
                    vector = parameters_addition(vector, mask) if mine else parameters_subtraction(vector, mask)
            except Exception as exc:  # forged shares: the sum cannot be trusted
                return f"the shares of {owner}'s secrets do not combine ({exc}): nothing aggregated"
        total_q, quantized = factor_extract(parameters_mod(vector, self.p.modulus_range))
        if total_q <= 0:
            return "the unmasked weights sum to zero: nothing aggregated"
        (mean,) = dequantize(quantized, self.p.clipping_range, self.p.quantization_range)
        mean = (mean - (len(alive) - 1) * self.p.clipping_range) * (self.p.quantization_range / float(total_q))
        self.result = SecureResult(mean, weight=float(sum(w for w, _ in self.metrics.values())),
                                   clients=sorted(alive), metrics=self.metrics,
                                   failures={c: r for c, r in self.failures.items() if c not in alive})
        return None


def secure_mean(protocol: Protocol, node_ids: dict[str, int], length: int, exchange: Exchange, seed: int,
                rnd: int) -> SecureResult:
    """The weighted mean of the clients' vectors of `length` by SecAgg+: only the mean and the survivors are known."""
    return SecureRound(protocol, node_ids, length, seed, rnd).run(exchange)


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
    result = secure_mean(protocol, node_ids, length, counted, config.seed, rnd)
    if result.problem is None and len(result.clients) < config.federation.min_clients:
        result.problem = (f"only {len(result.clients)} clients' updates arrived, fewer than federation.min_clients="
                          f"{config.federation.min_clients}: nothing aggregated")
    replies = {}
    for cid, (_, metrics) in result.metrics.items():
        examples = int(metrics.pop(EXAMPLES, 0))
        replies[cid] = Reply({}, examples, metrics, protocol_bytes=(sizes[cid][0], sizes[cid][1]))
    if result.problem is None:  # the weights the server assigned, not those the replies claim
        total = sum(weights[cid] for cid in result.clients)
        server.aggregate_secure(rnd, SecureMean(unflatten(result.mean, layout), total, result.clients))
    return replies, dict(result.failures), result.problem
