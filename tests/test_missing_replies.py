"""What a missing reply means for each method, and that a malformed reply is exactly a missing one.

Part 1 drives every registered ServerAlgorithm by hand: some client does not reply in some round, and the
server's new state is checked against numbers computed by hand (FedIT and friends average over the repliers,
FedALT keeps the silent client's last Individual LoRA, FedLEASE averages each expert over the members that
replied, FDLoRA's outer step uses the repliers' mean, ...).
Part 2 runs the shared RoundLoop with scripted clients: a reply made malformed at random is rejected by
`reply_problem` and leaves the server exactly as if that client had not replied at all.
"""

from __future__ import annotations

import math
import tempfile
from functools import cache
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedlora import run_experiment
from fedlora.adapters import AdapterSpec
from fedlora.algorithms import METHODS, ClientInfo, ClientState, Payload, Reply, build
from fedlora.algorithms.flora import stack_delta
from fedlora.core.config import build_config
from fedlora.core.errors import ClientFailure, ConfigError
from fedlora.engines.loop import federate
from fedlora.engines.runtime import ClientRuntime, Evaluation
from fedlora.engines.validation import reply_problem

from .conftest import tiny_config

# -- part 1: each method's meaning of a missing reply, on hand-made tensors -------------------------------

SPEC = AdapterSpec((("m", 3, 2),), r=2, alpha=4)
IDS = ["c0", "c1", "c2", "c3"]
SIZES = {"c0": 1, "c1": 2, "c2": 3, "c3": 4}  # example counts: the weights where a method weights by examples


def lora(a: float, b: float) -> dict[str, torch.Tensor]:
    """A LoRA whose A is filled with a and B with b."""
    return {"m.lora_A": torch.full((2, 3), float(a)), "m.lora_B": torch.full((2, 2), float(b))}


def half(a: float, b: float, part: str) -> dict[str, torch.Tensor]:
    """One half of `lora(a, b)`: 'A', 'B' or both ('AB')."""
    return {k: v for k, v in lora(a, b).items() if k[-1] in part}


def server(method: str, options: dict | None = None):
    s, _ = build(method, options or {}, SPEC, seed=0)
    s.setup([ClientInfo(cid, SIZES[cid]) for cid in IDS], rounds=10)
    return s


def assert_state(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, atol=1e-6, rtol=0)


# fedex's: tests/test_fedex.py::test_a_client_merges_every_residual_it_missed_once_and_ends_on_the_federation_s_model
# rolora's: tests/test_rolora.py (c silent in an A-round); flexlora's: its server is HetLoRA's (averaging the repliers only) with the mean truncated (tests/test_flexlora.py)
COVERED = {"local", "fedit", "ffa", "fedsa", "feddpa", "hetlora", "ifca", "flora", "fedalt", "fedlease", "fdlora",
           "fedex", "flexlora", "rolora"}


def test_every_registered_method_has_a_missing_reply_test_here():
    """A new method must come with its missing-reply test below and its scripted client (`_states`)."""
    assert set(METHODS) == COVERED


BROADCAST = [("fedit", "global", "AB"), ("ffa", "b", "B"), ("fedsa", "a", "A"), ("feddpa", "global", "AB"),
             ("hetlora", "global", "AB")]


@pytest.mark.parametrize("method,name,part", BROADCAST)
def test_broadcast_methods_average_over_the_repliers_only(method, name, part):
    s = server(method)
    s.aggregate(1, {cid: Reply({name: half(v, v + 1, part)}, SIZES[cid]) for cid, v in zip(IDS, [9, 9, 9, 9])})
    # round 2: c2 is silent; had it replied with 10 the example-weighted mean would be 5.1, not 3
    s.aggregate(2, {"c0": Reply({name: half(1, 2, part)}, 1), "c1": Reply({name: half(2, 4, part)}, 2),
                    "c3": Reply({name: half(4, 8, part)}, 4)})
    want = half((1 * 1 + 2 * 2 + 4 * 4) / 7, (1 * 2 + 2 * 4 + 4 * 8) / 7, part)  # = A 3, B 6
    assert_state(s.state_dict()["tensors"][name], want)
    assert_state(s.configure(3, ["c2"])["c2"].states[name], want)  # the silent client gets the new global


def test_fedalt_keeps_the_silent_clients_last_individual_lora_in_everyone_elses_rest_of_world():
    s = server("fedalt")  # uniform weighting
    s.aggregate(1, {cid: Reply({"individual": lora(v, 10 * v)}, SIZES[cid]) for cid, v in zip(IDS[:3], [1, 2, 3])})
    assert_state(s.rest_of_world("c0"), lora(2.5, 25))  # c3 never replied: not counted (not as zeros either)
    sent_by_c2 = s.individual["c2"]
    s.aggregate(2, {"c0": Reply({"individual": lora(5, 50)}, 1), "c1": Reply({"individual": lora(6, 60)}, 2),
                    "c3": Reply({"individual": lora(8, 80)}, 4)})  # c2 is silent
    assert s.individual["c2"] is sent_by_c2 and torch.equal(s.individual["c2"]["m.lora_A"], lora(3, 30)["m.lora_A"])
    rows = {cid: p.states["row"] for cid, p in s.configure(3, IDS).items()}
    assert_state(rows["c0"], lora((6 + 3 + 8) / 3, (60 + 30 + 80) / 3))  # the stale c2 LoRA counts exactly once
    assert_state(rows["c1"], lora((5 + 3 + 8) / 3, (50 + 30 + 80) / 3))
    assert_state(rows["c3"], lora((5 + 6 + 3) / 3, (50 + 60 + 30) / 3))
    assert_state(rows["c2"], lora((5 + 6 + 8) / 3, (50 + 60 + 80) / 3))  # its own stale LoRA is left out


X, Y = torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([[0.0, 1.0], [0.0, 1.0]])  # two B directions


def warm(a: float, b: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"m.lora_A": torch.full((2, 3), float(a)), "m.lora_B": b.clone()}


def router(v: float) -> dict[str, torch.Tensor]:
    return {"m.router": torch.full((3, 3), float(v))}  # 2M - 1 = 3 slots for M = 2


def test_fedlease_averages_each_expert_over_the_members_that_replied():
    s = server("fedlease", {"warmup_rounds": 1})  # uniform weighting
    s.aggregate(1, {"c0": Reply({"lora": warm(1, X)}, 1), "c1": Reply({"lora": warm(3, 2 * X)}, 2),
                    "c2": Reply({"lora": warm(5, Y)}, 3), "c3": Reply({"lora": warm(7, 3 * Y)}, 4)})
    assert s.assignment == {"c0": 0, "c1": 0, "c2": 1, "c3": 1}
    assert_state(s.experts[0], warm(2, 1.5 * X))
    assert_state(s.experts[1], warm(6, 2 * Y))
    # round 2: c1 is silent, so expert 0 is c0's alone; cluster 1 replied in full
    s.aggregate(2, {"c0": Reply({"expert": lora(10, 10), "router": router(1)}, 1),
                    "c2": Reply({"expert": lora(20, 20), "router": router(2)}, 3),
                    "c3": Reply({"expert": lora(40, 40), "router": router(4)}, 4)})
    assert_state(s.experts[0], lora(10, 10))
    assert_state(s.routers[0], router(1))
    assert_state(s.experts[1], lora(30, 30))
    assert_state(s.routers[1], router(3))
    # round 3: nobody of cluster 1 replies: its expert and router are kept as they were
    expert_1, router_1 = s.experts[1], s.routers[1]
    s.aggregate(3, {"c0": Reply({"expert": lora(0, 0), "router": router(0)}, 1),
                    "c1": Reply({"expert": lora(4, 2), "router": router(6)}, 2)})
    assert_state(s.experts[0], lora(2, 1))
    assert_state(s.routers[0], router(3))
    assert s.experts[1] is expert_1 and s.routers[1] is router_1
    assert [s.configure(4, [c])[c].config["expert"] for c in IDS] == [0, 0, 1, 1]  # silent clients keep their cluster


def test_fedlease_clusters_only_the_clients_that_uploaded_a_warm_up_lora():
    s = server("fedlease", {"warmup_rounds": 1})
    s.aggregate(1, {"c0": Reply({"lora": warm(1, X)}, 1), "c1": Reply({"lora": warm(3, 2 * X)}, 2),
                    "c2": Reply({"lora": warm(5, Y)}, 3)})  # c3 is silent in the last warm-up round
    assert s.assignment == {"c0": 0, "c1": 0, "c2": 1}
    assert_state(s.experts[0], warm(2, 1.5 * X))
    assert_state(s.experts[1], warm(5, Y))
    returning = s.configure(2, ["c3"])["c3"]  # it warms up when it returns, and uploads its warm-up LoRA
    assert returning.config == {"phase": "warmup"} and returning.expects == {"lora"}


def test_fdlora_outer_nesterov_step_uses_the_mean_over_the_repliers():
    s = server("fdlora", {"stage1_rounds": 1})  # lr 1, momentum 0.5, Nesterov, uniform mean
    s.aggregate(1, {"c0": Reply({"stage1": lora(1, 2)}, 1), "c1": Reply({"stage1": lora(3, 4)}, 2),
                    "c2": Reply({"stage1": lora(5, 0)}, 3)})  # c3 silent: theta_0 = mean of the three
    assert_state(s.outer.value(), lora(3, 2))
    # round 2, c1 silent: mean (2, 2), g = theta_0 - mean = (1, 0); buf = g; theta_1 = theta_0 - (g + 0.5 buf)
    s.aggregate(2, {"c0": Reply({"global": lora(2, 1)}, 1), "c2": Reply({"global": lora(4, 3)}, 3),
                    "c3": Reply({"global": lora(0, 2)}, 4)})
    assert_state(s.outer.value(), lora(1.5, 2))
    # round 3, c0 and c2 silent: mean (1, 3), g = (0.5, -1); buf = 0.5 buf + g = (1, -1); step g + 0.5 buf
    s.aggregate(3, {"c1": Reply({"global": lora(0.5, 3)}, 2), "c3": Reply({"global": lora(1.5, 3)}, 4)})
    assert_state(s.outer.value(), lora(0.5, 3.5))
    assert_state(s.state_dict()["tensors"]["momentum"], lora(1, -1))


def test_ifca_averages_each_cluster_over_its_repliers_and_leaves_other_clusters_alone():
    s = server("ifca", {"clusters": 2})  # weighted by examples (1, 2, 3, 4)
    def rep(v: float, c: int, n: int) -> Reply:
        return Reply({"lora": lora(v, -v)}, n, {"cluster": c})

    s.aggregate(1, {"c0": rep(1, 0, 1), "c1": rep(4, 0, 2), "c2": rep(1, 1, 3), "c3": rep(8, 1, 4)})
    assert_state(s.cluster_loras[0], lora(3, -3))
    assert_state(s.cluster_loras[1], lora(5, -5))
    s.aggregate(2, {"c0": rep(5, 0, 1), "c2": rep(2, 1, 3), "c3": rep(9, 1, 4)})  # c1 silent
    assert_state(s.cluster_loras[0], lora(5, -5))
    assert_state(s.cluster_loras[1], lora(6, -6))
    cluster_1 = s.cluster_loras[1]
    s.aggregate(3, {"c0": rep(2, 0, 1), "c1": rep(8, 0, 2)})  # cluster 1 silent
    assert_state(s.cluster_loras[0], lora(6, -6))
    assert s.cluster_loras[1] is cluster_1
    assert s.diagnostics()["assignment"] == {"c0": 0, "c1": 0, "c2": 1, "c3": 1}


def random_lora(r: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"m.lora_A": torch.randn(r, 3, generator=g), "m.lora_B": torch.randn(2, r, generator=g)}


def test_flora_stacks_the_repliers_only_and_resends_what_the_silent_client_missed():
    s = server("flora")  # weighted by examples, alpha 4
    ranks = dict(zip(IDS, [2, 1, 2, 1]))  # clients.lora_r: the stack takes each reply's own rank
    s.aggregate(1, {cid: Reply({"lora": random_lora(ranks[cid], i)}, SIZES[cid]) for i, cid in enumerate(IDS)})
    sent = {cid: random_lora(ranks[cid], 10 + i) for i, cid in enumerate(IDS) if cid != "c1"}
    s.aggregate(2, {cid: Reply({"lora": lo}, SIZES[cid]) for cid, lo in sent.items()})  # c1 silent
    stacked = s.stacks[2]
    p = {"c0": 1 / 8, "c2": 3 / 8, "c3": 4 / 8}  # weights normalised over the repliers
    scale = {cid: p[cid] * 4 / ranks[cid] for cid in p}  # p_k * alpha / r_k
    assert_state(stacked, {"m.lora_A": torch.cat([sent[c]["m.lora_A"] for c in p]),
                           "m.lora_B": torch.cat([scale[c] * sent[c]["m.lora_B"] for c in p], dim=1)})
    torch.testing.assert_close(stack_delta(stacked)["m"], sum(scale[c] * sent[c]["m.lora_B"] @ sent[c]["m.lora_A"]
                                                              for c in p), atol=1e-6, rtol=0)
    payloads = s.configure(3, IDS)
    assert set(payloads["c1"].states) == {"stack_1", "stack_2"} and set(payloads["c0"].states) == {"stack_2"}


def test_local_server_keeps_nothing_whoever_replies():
    s = server("local")
    s.aggregate(1, {"c0": Reply(num_examples=1)})
    assert s.state_dict() == {"tensors": {}, "meta": {}}
    assert all(p.states == {} for p in s.configure(2, IDS).values())


# -- scripted clients: the replies each method's client would send, from the payload it received ----------

# The tiny-bert spec (tests/conftest.py tiny_adapted); test_tiny_spec_is_the_tiny_models checks it.
TINY_SPEC = AdapterSpec(tuple((f"bert.encoder.layer.{i}.attention.self.{m}", 32, 32) for i in range(2)
                              for m in ("query", "value")), r=4, alpha=8)
OPTIONS = {"fedlease": {"warmup_rounds": 1}, "fdlora": {"stage1_rounds": 1}, "ifca": {"clusters": 2}}
ROUNDS = 3


def _noise(cid: str, rnd: int) -> torch.Generator:
    return torch.Generator().manual_seed(1000 * IDS.index(cid) + rnd)


def _moved(state: dict[str, torch.Tensor], g: torch.Generator) -> dict[str, torch.Tensor]:
    return {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in state.items()}


def _fresh(g: torch.Generator, r: int | None = None) -> dict[str, torch.Tensor]:
    return {k: torch.randn(shape, generator=g) for k, shape in TINY_SPEC.lora_shapes(r).items()}


def _states(method: str, payload: Payload, g: torch.Generator, cid: str) -> tuple[dict, dict]:
    """(states, extra metrics) of a valid reply of `method`'s client to `payload`."""
    cfg, got = payload.config, payload.states
    if method in ("fedit", "feddpa", "hetlora", "fedex", "flexlora"):
        return {"global": _moved(got["global"], g)}, {}
    if method == "rolora":
        return {cfg["train"]: _moved(got[cfg["train"]], g)}, {}
    if method in ("ffa", "fedsa"):
        name = "b" if method == "ffa" else "a"
        return {name: _moved(got[name], g)}, {}
    if method == "ifca":
        c = int(cfg.get("cluster", IDS.index(cid) % 2))
        return {"lora": _moved(got[f"cluster_{c}"], g)}, {"cluster": c}
    if method == "flora":
        return {"lora": _fresh(g)}, {}
    if method == "fedalt":
        return {"individual": _fresh(g)}, {}
    if method == "fedlease":
        if cfg["phase"] == "warmup":
            return ({"lora": _fresh(g)} if "lora" in payload.expects else {}), {}
        return {"expert": _moved(got[f"expert_{cfg['expert']}"], g), "router": _moved(got["router"], g)}, {}
    if method == "fdlora":
        if cfg["stage"] == "local":
            return ({"stage1": _fresh(g)} if "stage1" in payload.expects else {}), {}
        return {"global": _moved(got["global"], g)}, {}
    assert method == "local"
    return {}, {}


def valid_reply(method: str, cid: str, rnd: int, payload: Payload) -> Reply:
    """The reply `method`'s client would send: deterministic in (client, round, payload)."""
    states, metrics = _states(method, payload, _noise(cid, rnd), cid)
    return Reply(states, 10 + IDS.index(cid), {"train_loss": 1.0, **metrics})


class ScriptedLoop:
    """The shared round loop (`federate`) over a transport of scripted clients: `script[(round, client)]` is
    'silent' (no reply) or a function that turns the client's valid reply into the one it sends."""

    def __init__(self, method: str, run_dir: Path, script: dict, rounds: int = ROUNDS, min_clients: int = 1) -> None:
        self.config = build_config(tiny_config(run_dir, output_dir=str(run_dir), federation={
            "rounds": rounds, "eval_at_start": False, "eval_every": 1, "min_clients": min_clients},
            engine={"progress": False, "checkpoint_every": 0},
            algorithm={"name": method, "options": OPTIONS.get(method, {})}))
        self.server, _ = build(method, self.config.algorithm.options, TINY_SPEC, self.config.seed)
        self.clients = [ClientInfo(cid, 10 + i, "t") for i, cid in enumerate(IDS)]
        self.run_dir, self.method, self.script = run_dir, method, script
        self.states = {cid: ClientState() for cid in IDS}
        self.snapshots: list[dict] = []  # the server's state after each round
        self.records: list[dict] = []

    def run(self) -> None:
        """Every round through the one round loop."""
        self.records = federate(self.config, self.server, self, self.clients, self.run_dir).rounds

    def fit(self, rnd, payloads, show):
        replies, failures = {}, {}
        for cid, payload in payloads.items():
            action = self.script.get((rnd, cid))
            if action == "silent":
                failures[cid] = "no reply"
                continue
            reply = valid_reply(self.method, cid, rnd, payload)
            replies[cid] = action(reply) if action else reply
        return replies, failures

    def evaluate(self, rnd, payloads, show):  # called after every round's aggregate (eval_every = 1)
        self.snapshots.append(_copy(self.server.state_dict()))
        return {cid: Evaluation({"loss": 0.0}) for cid in payloads}, {}


def _copy(state):
    if isinstance(state, dict):
        return {k: _copy(v) for k, v in state.items()}
    return state.clone() if torch.is_tensor(state) else state


def run_loop(method: str, script: dict, **kwargs) -> ScriptedLoop:
    """A finished ScriptedLoop (its run directory is removed; snapshots and records stay in memory)."""
    with tempfile.TemporaryDirectory(prefix=f"fedlora-{method}-") as tmp:
        loop = ScriptedLoop(method, Path(tmp), script, **kwargs)
        loop.run()
    return loop


def same_state(a, b) -> bool:
    """Exact equality of nested server states: tensors by value and dtype, everything else by ==."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_state(a[k], b[k]) for k in a)
    if torch.is_tensor(a) or torch.is_tensor(b):
        return torch.is_tensor(a) and torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    return a == b


def test_tiny_spec_is_the_tiny_models(tiny_adapted):
    assert tiny_adapted[0].spec == TINY_SPEC


@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_round_without_replies_leaves_the_server_unchanged(method):
    """`aggregate` with no replies is a no-op for every method (the loop never calls it so: see below)."""
    loop = run_loop(method, {})
    before = loop.server.state_dict()
    summary = loop.server.diagnostics()
    loop.server.aggregate(ROUNDS + 1, {})
    assert same_state(loop.server.state_dict(), before) and loop.server.diagnostics() == summary


def test_min_clients_cannot_be_zero(tmp_path):
    """So the loop never aggregates a round without replies: it stops instead (next test)."""
    with pytest.raises(ConfigError, match="invalid value for 'federation.min_clients'"):
        build_config(tiny_config(tmp_path, federation={"min_clients": 0}))


@pytest.mark.parametrize("method", ["fedit", "fedalt", "fedlease", "fdlora"])
def test_the_loop_stops_when_no_client_replies_and_aggregates_nothing(method, tmp_path):
    after_two = run_loop(method, {}, rounds=2).server.state_dict()
    silent = {(3, cid): "silent" for cid in IDS}
    loop = ScriptedLoop(method, tmp_path, silent, rounds=3)
    with pytest.raises(ClientFailure, match="only 0 of 4 clients replied"):
        loop.run()
    assert same_state(loop.server.state_dict(), after_two)


# -- part 2: a malformed reply is rejected and counts exactly as no reply --------------------------------

def _one_key(reply: Reply, pick: int) -> tuple[str, str]:
    if not reply.states:  # a method that sends nothing this round: the client adds a state of its own
        reply.states["lora"] = _fresh(torch.Generator().manual_seed(pick))
    name = sorted(reply.states)[pick % len(reply.states)]
    keys = sorted(reply.states[name])
    return name, keys[pick % len(keys)]


def malform(reply: Reply, mutation: str, pick: int) -> Reply:
    """The reply with one malformation applied (in place; the reply is returned)."""
    if mutation == "negative_count":
        reply.num_examples = -1
        return reply
    if mutation == "nan_metric":
        reply.metrics["train_loss"] = math.nan
        return reply
    name, key = _one_key(reply, pick)
    state = reply.states[name] = dict(reply.states[name])
    value = state[key]
    if mutation in ("nan", "inf"):
        value = value.clone()
        value.view(-1)[pick % value.numel()] = math.nan if mutation == "nan" else -math.inf
        state[key] = value
    elif mutation == "wrong_shape":
        state[key] = torch.cat([value, value[:, :1]], dim=1)  # one more column: input size or rank
    elif mutation == "flattened":
        state[key] = value.flatten()
    elif mutation == "extra_key":
        state["bert.pooler.dense" + key[key.rindex("."):]] = value.clone()
    elif mutation == "missing_key":
        del state[key]
    elif mutation == "integer":
        state[key] = value.round().long()
    elif mutation == "boolean":
        state[key] = value > 0
    elif mutation == "not_a_tensor":
        state[key] = value.tolist()
    elif mutation == "empty_state":
        reply.states[name] = {}
    else:
        raise AssertionError(mutation)
    return reply


MUTATIONS = ["nan", "inf", "wrong_shape", "flattened", "extra_key", "missing_key", "integer", "boolean",
             "not_a_tensor", "empty_state", "negative_count", "nan_metric"]


@cache
def silent_run(method: str, victim: str, rnd: int):
    """The server states after each round, and the records, of a run in which `victim` is silent in round `rnd`."""
    loop = run_loop(method, {(rnd, victim): "silent"})
    return loop.snapshots, loop.records


@pytest.mark.parametrize("method", sorted(METHODS))
@settings(max_examples=25, deadline=None)
@given(mutation=st.sampled_from(MUTATIONS), victim=st.sampled_from(IDS), rnd=st.integers(1, ROUNDS),
       pick=st.integers(0, 10**6))
def test_a_malformed_reply_is_rejected_and_counts_exactly_as_no_reply(method, mutation, victim, rnd, pick):
    seen = []

    def bad(reply: Reply) -> Reply:
        seen.append(malform(reply, mutation, pick))
        return seen[-1]

    loop = run_loop(method, {(rnd, victim): bad})
    assert reply_problem(seen[0], Payload(), TINY_SPEC, any_rank=True) is not None
    assert loop.records[rnd - 1]["failures"][victim].startswith("update rejected: ")
    assert victim not in loop.records[rnd - 1]["fit"]
    snapshots, records = silent_run(method, victim, rnd)
    assert len(loop.snapshots) == ROUNDS and all(same_state(a, b) for a, b in zip(loop.snapshots, snapshots))
    assert [r.get("server") for r in loop.records] == [r.get("server") for r in records]


# -- replies that pass the shape checks but that the method cannot use: they must be rejected too ----------

def _first_state(reply: Reply) -> str:
    return min(reply.states)


def _as_dtype(dtype: torch.dtype):
    def change(reply: Reply) -> Reply:
        name = _first_state(reply)
        reply.states[name] = {k: v.to(dtype) for k, v in reply.states[name].items()}
        return reply
    return change


def _rank_plus_one(reply: Reply) -> Reply:
    """Every LoRA tensor of the first state one rank larger: consistent, so the shape checks pass."""
    name = _first_state(reply)
    reply.states[name] = {k: torch.cat([v, v[:1]]) if k.endswith("lora_A") else torch.cat([v, v[:, :1]], dim=1)
                          for k, v in reply.states[name].items()}
    return reply


def _without_states(reply: Reply) -> Reply:
    reply.states = {}
    return reply


def _cluster(value):
    def change(reply: Reply) -> Reply:
        if value is None:
            del reply.metrics["cluster"]
        else:
            reply.metrics["cluster"] = value
        return reply
    return change


def _router_slots(reply: Reply) -> Reply:
    reply.states["router"] = {k: v[:2] for k, v in reply.states["router"].items()}  # 2 slots where 2M - 1 = 3
    return reply


WITH_STATES = sorted(set(METHODS) - {"local"})
def _cases():
    for method in WITH_STATES:
        for dtype in (torch.float16, torch.bfloat16, torch.float64):
            yield pytest.param(method, _as_dtype(dtype), id=f"{method}-{str(dtype)[6:]}")
        if method != "flora":  # FLoRA stacks any rank: there a larger rank is a valid reply
            yield pytest.param(method, _rank_plus_one, id=f"{method}-rank")
        yield pytest.param(method, _without_states, id=f"{method}-no-state")
    for value in (None, 7, -1, 1.5):
        yield pytest.param("ifca", _cluster(value), id=f"ifca-cluster-{value}")
    yield pytest.param("fedlease", _router_slots, id="fedlease-router-slots")


@pytest.mark.parametrize("method,change", _cases())
def test_a_reply_the_method_cannot_use_is_rejected_and_counts_as_no_reply(method, change):
    """Round 2 (clustered for FedLEASE, stage 2 for FDLoRA): client c1's reply is valid in shape but unusable."""
    loop = run_loop(method, {(2, "c1"): change})  # a crash here (KeyError, RuntimeError) fails the test as well
    assert loop.records[1]["failures"].get("c1", "").startswith("update rejected: ")
    snapshots, _ = silent_run(method, "c1", 2)
    assert all(same_state(a, b) for a, b in zip(loop.snapshots, snapshots))


def test_a_flora_client_whose_reply_was_rejected_merges_each_stack_once(tmp_path, monkeypatch):
    victim, original = "noun_topic-1", ClientRuntime.fit

    def fit(self, cid, rnd, payload, state):
        reply, new_state = original(self, cid, rnd, payload, state)
        if cid == victim and rnd == 2:
            reply.states["lora"] = {k: v * math.nan for k, v in reply.states["lora"].items()}
        return reply, new_state

    monkeypatch.setattr(ClientRuntime, "fit", fit)
    result = run_experiment(tiny_config(tmp_path, federation={"rounds": 3}, training={"local_steps": 1},
                                        algorithm={"name": "flora"}))
    assert result.rounds[2]["failures"][victim].startswith("update rejected")
    merged = {cid: s.states["merged"] for cid, s in result.client_states.items()}
    for path, delta in merged["noun_topic-0"].items():  # after round 3 everyone has merged stacks 1 and 2, once each
        torch.testing.assert_close(merged[victim][path], delta)


def test_a_client_whose_weight_is_zero_is_a_recorded_failure_not_an_exception(tmp_path, monkeypatch):
    """#37: one client with a zero example count once ended the run (weights must sum to a positive number)."""
    loop = ScriptedLoop("fedit", tmp_path, {})
    original = loop.server.weight
    monkeypatch.setattr(loop.server, "weight", lambda cid: 0.0 if cid == "c1" else original(cid))
    loop.run()
    assert all("aggregation weight is 0.0" in r["failures"]["c1"] for r in loop.records)
    assert all("c1" not in r["fit"] for r in loop.records)
