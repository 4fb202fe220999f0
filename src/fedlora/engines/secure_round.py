"""The server's side of secure aggregation: SecAgg+'s four stages (setup, share keys, collect masked vectors,
unmask) as Flower's `SecAggPlusWorkflow` runs them, driven over any transport and checking every stage reply.

Flower's workflow sends one legacy FitIns per node and hands the result to a Strategy; `SecureRound` leaves the
payloads to the transport (`exchange(stage, {client: record}) -> {client: reply or failure}`) and returns the mean.
A malformed reply counts as that node dropping out, whose masks the others' shares remove. Fewer than `threshold`
survivors fail the round (nothing aggregated), never the run. tests/test_secagg.py shows that both drivers give the
same mean on the same inputs.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, RecordDict
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.crypto.shamir import combine_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
from flwr.common.secure_aggregation.ndarrays_arithmetic import (factor_extract, parameters_addition, parameters_mod,
                                                                 parameters_subtraction)
from flwr.common.secure_aggregation.quantization import dequantize
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen
from flwr.compat.common import recorddict_compat as compat
from flwr.supercore.primitives.asymmetric import bytes_to_private_key, bytes_to_public_key

from ..core.config import SecAggConfig
from ..core.errors import ConfigError
from ..core.seeding import derive_seed

Exchange = Callable[[str, dict[str, RecordDict]], dict[str, "RecordDict | str"]]


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
        problem = cfg.wrap_problem(n_sampled)
        if problem:
            raise ConfigError(problem)
        shares = round(cfg.num_shares * n_sampled) if isinstance(cfg.num_shares, float) else cfg.num_shares
        if shares < n_sampled and shares % 2 == 0:  # neighbourhoods are odd: Flower's workflow bumps an even count
            shares += 1                             # too, but only after telling the clients the even one
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

    def __init__(self, protocol: Protocol, node_ids: dict[str, int], length: int, seed: int, rnd: int,
                 weights: dict[str, int] | None = None, fewest: int = 3) -> None:
        self.p, self.length = protocol, length
        self.weights = weights  # what the server assigned each client; None: the weights the replies state
        self.fewest = max(fewest, 1)  # updates a sum needs before it is unmasked: of two, each would read the other's
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

    def _ask(self, exchange: Exchange, stage: str,
             contents: dict[str, dict[str, Any]]) -> dict[str, tuple[ConfigRecord, RecordDict]]:
        """Send each node its stage record; the nodes whose reply carries a config record: (that record, the reply)."""
        replies = exchange(stage, {cid: RecordDict({RECORD_KEY_CONFIGS: ConfigRecord(c)}) for cid, c in contents.items()})
        out = {}
        for cid in contents:
            reply = replies.get(cid, "no reply")
            try:
                out[cid] = (_configs(reply), reply)
            except Exception as exc:  # any malformed reply: that node is out, never the round
                self._drop(cid, stage, exc)
        return out

    def _setup(self, exchange: Exchange) -> str | None:
        record = self.p.setup_record(len(self.sampled))
        asked = self._ask(exchange, Stage.SETUP, {cid: dict(record) for cid in sorted(self.active)})
        for cid, (configs, _) in asked.items():
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
        for cid, (configs, _) in self._ask(exchange, Stage.SHARE_KEYS, contents).items():
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
        masked: list[np.ndarray] | None = None
        self.metrics: dict[str, tuple[int, dict[str, float]]] = {}
        for cid, (configs, reply) in self._ask(exchange, Stage.COLLECT_MASKED_VECTORS, contents).items():
            try:
                blobs = _list_of(configs[Key.MASKED_PARAMETERS], bytes, "masked_params")
                vector = [bytes_to_ndarray(b) for b in blobs]
                shapes = [v.shape for v in vector]
                if shapes != [(1,), (self.length,)] or any(v.dtype.kind not in "iu" for v in vector):
                    raise ValueError(f"its masked vector has shapes {shapes}, expected [(1,), ({self.length},)]")
                fitres = compat.recorddict_to_fitres(reply, keep_input=True)
                metrics = {k: v for k, v in fitres.metrics.items()
                           if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
                weight = int(fitres.num_examples)
                if self.weights is not None and weight != self.weights[cid]:
                    raise ValueError(f"its reply states weight {weight}, the server assigned {self.weights[cid]}")
            except Exception as exc:
                self._drop(cid, Stage.COLLECT_MASKED_VECTORS, exc)
                continue
            vector = [v.astype(np.int64) for v in vector]
            masked = vector if masked is None else parameters_addition(masked, vector)
            self.metrics[cid] = (weight, metrics)
        self.masked = None if masked is None else parameters_mod(masked, self.p.modulus_range)
        self.contributed = set(self.metrics)
        problem = self._enough(self.shared)
        if problem is None and len(self.contributed) < self.fewest:  # here, before the unmask stage reveals the sum
            problem = (f"only {len(self.contributed)} clients' updates arrived, fewer than the {self.fewest} a sum "
                       "needs before it is unmasked: nothing aggregated")
        return problem

    def _unmask(self, exchange: Exchange) -> str | None:
        alive, dead = self.contributed, self.shared - self.contributed
        held = {cid: self.sources.get(cid, set()) | {cid} for cid in self.active}  # each node's shares: its own too
        contents = {cid: {Key.STAGE: Stage.UNMASK,
                          Key.ACTIVE_NODE_ID_LIST: [self.node_ids[n] for n in sorted(held[cid] & alive)],
                          Key.DEAD_NODE_ID_LIST: [self.node_ids[n] for n in sorted(held[cid] & dead)]}
                    for cid in sorted(self.active)}
        shares: dict[str, dict[str, bytes]] = {cid: {} for cid in self.shared}  # owner -> {holder: share}
        for cid, (configs, _) in self._ask(exchange, Stage.UNMASK, contents).items():
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
                    shares[owner].setdefault(cid, share)  # one per holder: a repeat would break the combination
        vector = self.masked
        shapes = [v.shape for v in vector]
        for owner, held_shares in sorted(shares.items()):
            owner_shares = list(held_shares.values())
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
        # A client knows its own masks, so it can put any value modulo modulus_range into the sum; honest ones
        # give exactly these weight factors and coordinates of at most quantization_range each
        levels = self.p.quantization_range
        expected_q = sum(round(self.metrics[cid][0] / self.p.max_weight * levels) for cid in alive)
        if total_q != expected_q or total_q <= 0:
            return (f"the unmasked weight factors sum to {total_q}, not the {expected_q} the survivors' weights give: "
                    "a client masked a forged weight; nothing aggregated")
        if quantized[0].size and int(quantized[0].max()) > len(alive) * levels:
            return (f"an unmasked coordinate is above what {len(alive)} clients' quantized values can sum to: a client "
                    "sent values outside the protocol's range; nothing aggregated")
        (mean,) = dequantize(quantized, self.p.clipping_range, self.p.quantization_range)
        mean = (mean - (len(alive) - 1) * self.p.clipping_range) * (self.p.quantization_range / float(total_q))
        self.result = SecureResult(mean, weight=float(sum(w for w, _ in self.metrics.values())),
                                   clients=sorted(alive), metrics=self.metrics,
                                   failures={c: r for c, r in self.failures.items() if c not in alive})
        return None


def secure_mean(protocol: Protocol, node_ids: dict[str, int], length: int, exchange: Exchange, seed: int,
                rnd: int, weights: dict[str, int] | None = None, fewest: int = 3) -> SecureResult:
    """The weighted mean of the clients' vectors of `length` by SecAgg+: only the mean and the survivors are known."""
    return SecureRound(protocol, node_ids, length, seed, rnd, weights, fewest).run(exchange)
