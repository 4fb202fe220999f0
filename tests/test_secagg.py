"""Secure aggregation (SecAgg+ with Flower's own protocol code): the server's driver against Flower's workflow, the
mean within the quantization bound, dropouts at and below the threshold, malformed messages, and the methods."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from fedlora.algorithms import Payload
from fedlora.core.config import SecAggConfig
from fedlora.engines.secagg import Protocol, client_reply, flatten, layout_of, secure_mean, unflatten, InProcessNodes

CLIP, LEVELS = 8.0, 2**22
STEP = 2 * CLIP / LEVELS  # one quantization level


def nodes(vectors: dict[str, np.ndarray], weights: dict[str, int], fail: dict[str, str] | None = None):
    """In-process SecAgg+ nodes whose fit returns a fixed vector; `fail` maps a client to the stage it drops at."""
    fail = fail or {}

    class FixedNodes(InProcessNodes):
        def produce(self, cid):
            return vectors[cid], weights[cid], {"loss": 1.0}

    local = FixedNodes(1, dict.fromkeys(sorted(vectors), Payload()), None, seed=0)
    inner = local.exchange

    def exchange(stage, contents):
        return {cid: (f"RuntimeError: {cid} is gone" if fail.get(cid) == stage else answer)
                for cid, answer in inner(stage, contents).items()}

    return local.node_ids, exchange


def protocol(n: int, max_weight: float, **cfg) -> Protocol:
    return Protocol.for_round(SecAggConfig(**cfg), n, max_weight)


def test_the_secure_mean_is_the_weighted_mean_within_the_quantization_bound():
    rng = np.random.default_rng(0)
    vectors = {f"c{i}": rng.normal(0, 0.05, 300) for i in range(5)}
    weights = {f"c{i}": w for i, w in enumerate((10, 20, 30, 40, 160))}
    ids, exchange = nodes(vectors, weights)
    result = secure_mean(protocol(5, 160), ids, 300, exchange, seed=0, rnd=1)
    assert result.problem is None and result.clients == sorted(vectors) and result.weight == 260
    exact = sum(weights[c] * vectors[c] for c in vectors) / 260
    bound = 5 * STEP / (260 / 160)  # each client's rounding is under one level of its weighted value
    error = np.abs(result.mean - exact).max()
    assert 0 < error < bound
    assert error > bound / 1000  # quantized, not sent in the clear


def test_a_client_dropping_after_the_keys_are_shared_is_recovered_and_left_out_of_the_mean():
    rng = np.random.default_rng(1)
    vectors = {f"c{i}": rng.normal(0, 0.05, 50) for i in range(5)}
    weights = dict.fromkeys(vectors, 1)
    ids, exchange = nodes(vectors, weights, fail={"c2": "collect_masked_vectors", "c4": "unmask"})
    result = secure_mean(protocol(5, 1, reconstruction_threshold=3), ids, 50, exchange, seed=0, rnd=1)
    assert result.problem is None
    assert result.clients == ["c0", "c1", "c3", "c4"]  # c4's masked vector arrived before it dropped
    assert "c2" in result.failures and "collect_masked_vectors" in result.failures["c2"]
    exact = np.mean([vectors[c] for c in result.clients], axis=0)
    assert np.abs(result.mean - exact).max() < 4 * STEP


def test_too_few_survivors_fail_the_round_with_a_reason_and_no_mean():
    vectors = {f"c{i}": np.zeros(10) for i in range(4)}
    ids, exchange = nodes(vectors, dict.fromkeys(vectors, 1),
                          fail={"c0": "collect_masked_vectors", "c1": "collect_masked_vectors"})
    result = secure_mean(protocol(4, 1, reconstruction_threshold=3), ids, 10, exchange, seed=0, rnd=1)
    assert result.mean is None and "threshold" in result.problem


@pytest.mark.parametrize("stage", ["setup", "share_keys", "collect_masked_vectors", "unmask"])
def test_a_malformed_protocol_message_leaves_its_node_out_and_never_raises(stage):
    from flwr.app import ConfigRecord, RecordDict
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

    rng = np.random.default_rng(2)
    vectors = {f"c{i}": rng.normal(0, 0.05, 20) for i in range(5)}
    ids, honest = nodes(vectors, dict.fromkeys(vectors, 1))
    garbage = [RecordDict({RECORD_KEY_CONFIGS: ConfigRecord({"pk1": b"x", "pk2": b"y", "dsts": [1], "ctxts": [b"z"],
                                                             "masked_params": [b"not an array"], "nids": [1, 2],
                                                             "shares": [b"s"]})}),
               RecordDict(), "the node's process died"]

    for bad in garbage:
        def exchange(name, contents, bad=bad):
            answers = honest(name, contents)
            if name == stage and "c3" in answers:
                answers["c3"] = bad
            return answers

        result = secure_mean(protocol(5, 1, reconstruction_threshold=2), ids, 20, exchange, seed=0, rnd=1)
        assert result.problem is None, result.problem
        if stage == "unmask":  # its masked vector is in the sum already; only its shares are missing
            assert "c3" in result.clients
        else:
            assert "c3" not in result.clients and "c3" in result.failures
        exact = np.mean([vectors[c] for c in result.clients], axis=0)
        assert np.abs(result.mean - exact).max() < 5 * STEP


def test_a_wrong_length_vector_is_left_out_not_summed():
    vectors = {f"c{i}": np.full(8, 0.25) for i in range(4)}
    vectors["c1"] = np.full(9, 0.25)
    ids, exchange = nodes(vectors, dict.fromkeys(vectors, 1))
    result = secure_mean(protocol(4, 1), ids, 8, exchange, seed=0, rnd=1)
    assert result.clients == ["c0", "c2", "c3"] and "shapes" in result.failures["c1"]
    np.testing.assert_allclose(result.mean, 0.25, atol=3 * STEP)


def test_flattening_keeps_names_keys_and_shapes_and_refuses_another_layout():
    states = {"global": {"m.lora_B": torch.randn(4, 2), "m.lora_A": torch.randn(2, 3)}}
    layout = layout_of(states)
    back = unflatten(flatten(states, layout), layout)
    for key, value in states["global"].items():
        torch.testing.assert_close(back["global"][key], value)
    with pytest.raises(ValueError, match="shape"):
        flatten({"global": {"m.lora_B": torch.randn(4, 3), "m.lora_A": torch.randn(2, 3)}}, layout)
    with pytest.raises(ValueError, match="expects"):
        flatten({"other": states["global"]}, layout)


def test_the_protocol_parameters_follow_flowers_workflow():
    from fedlora.core.errors import ConfigError

    p = protocol(10, 5.0)  # defaults: shares = every client, threshold = half of them
    assert (p.num_shares, p.threshold, p.clipping_range, p.quantization_range) == (10, 5, 8.0, 2**22)
    assert protocol(10, 1.0, num_shares=0.4).num_shares == 5  # an even count becomes odd, as Flower makes it
    assert protocol(6, 1.0, num_shares=4, reconstruction_threshold=3).threshold == 3
    with pytest.raises(ConfigError, match="wraps; set federation.secagg.quantization_range to at most 3904515"):
        protocol(1100, 1.0)  # 1100 clients x 2^22 levels overflow the 2^32 modulus


def test_an_even_share_count_is_made_odd_before_the_clients_are_told_so_the_round_completes():
    """Flower's workflow tells the clients an even count, then builds one more neighbour than they make shares for
    (every node then fails); the count both sides use is the odd one."""
    rng = np.random.default_rng(5)
    vectors = {f"c{i}": rng.normal(0, 0.05, 12) for i in range(10)}
    ids, exchange = nodes(vectors, dict.fromkeys(vectors, 1))
    p = protocol(10, 1, num_shares=4, reconstruction_threshold=3)
    assert p.num_shares == 5 and p.setup_record(10)["share_num"] == 5
    result = secure_mean(p, ids, 12, exchange, seed=0, rnd=1)
    assert result.problem is None and result.clients == sorted(vectors)
    assert np.abs(result.mean - np.mean(list(vectors.values()), axis=0)).max() < 10 * STEP


def _tamper(exchange, cid, change):
    """`exchange` with `cid`'s masked vector changed by `change(arrays)` on its way to the server."""
    from flwr.common import bytes_to_ndarray, ndarray_to_bytes
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

    def tampered(stage, contents):
        answers = exchange(stage, contents)
        if stage == "collect_masked_vectors":
            configs = answers[cid].config_records[RECORD_KEY_CONFIGS]
            arrays = [bytes_to_ndarray(b) for b in configs[Key.MASKED_PARAMETERS]]
            configs[Key.MASKED_PARAMETERS] = [ndarray_to_bytes(a) for a in change(arrays)]
        return answers

    return tampered


@pytest.mark.parametrize("forgery", ["weight factor", "coordinate"])
def test_a_client_forging_what_it_masks_fails_the_round_and_never_skews_the_mean(forgery):
    """A client knows its own masks, so it can mask any value; honest sums have exactly the survivors' weight
    factors and coordinates of at most n x quantization_range, so a forged weight or an out-of-range value shows."""
    rng = np.random.default_rng(6)
    vectors = {f"c{i}": rng.normal(0, 0.05, 16) for i in range(5)}
    ids, exchange = nodes(vectors, dict.fromkeys(vectors, 1))
    if forgery == "weight factor":  # a factor of 1 would multiply the mean by ~ 5 x 2^22
        change = lambda arrays: [(arrays[0] - 5 * LEVELS + 1) % 2**32, arrays[1]]  # noqa: E731
    else:
        change = lambda arrays: [arrays[0], (arrays[1] + np.eye(1, 16, 3, dtype=np.int64).ravel() * 2**31) % 2**32]  # noqa: E731
    result = secure_mean(protocol(5, 1), ids, 16, _tamper(exchange, "c2", change), seed=0, rnd=1)
    assert result.mean is None and "nothing aggregated" in result.problem
    assert ("forged weight" if forgery == "weight factor" else "outside the protocol's range") in result.problem


def test_a_reply_stating_another_weight_than_the_server_assigned_is_left_out():
    vectors = {f"c{i}": np.full(6, 0.1 * i) for i in range(5)}
    claimed = {**dict.fromkeys(vectors, 1), "c4": 50}  # c4 would weigh 50 times the others in the mean
    ids, exchange = nodes(vectors, claimed)
    result = secure_mean(protocol(5, 50), ids, 6, exchange, seed=0, rnd=1, weights=dict.fromkeys(vectors, 1))
    assert result.problem is None and "c4" not in result.clients and "assigned 1" in result.failures["c4"]
    # weights of 1 under max_weight 50 quantize at 50 times the level: 4 clients' rounding over their weight 4/50
    np.testing.assert_allclose(result.mean, np.mean([vectors[c] for c in result.clients], axis=0), atol=50 * STEP)


def test_a_node_repeating_a_share_in_the_unmask_stage_cannot_break_the_combination():
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

    rng = np.random.default_rng(7)
    vectors = {f"c{i}": rng.normal(0, 0.05, 8) for i in range(5)}
    ids, honest = nodes(vectors, dict.fromkeys(vectors, 1))

    def exchange(stage, contents):
        answers = honest(stage, contents)
        if stage == "unmask":
            configs = answers["c1"].config_records[RECORD_KEY_CONFIGS]
            configs[Key.NODE_ID_LIST] = list(configs[Key.NODE_ID_LIST]) * 2
            configs[Key.SHARE_LIST] = list(configs[Key.SHARE_LIST]) * 2
        return answers

    result = secure_mean(protocol(5, 1), ids, 8, exchange, seed=0, rnd=1)
    assert result.problem is None and result.clients == sorted(vectors)


def test_two_survivors_end_the_round_before_the_unmask_stage_could_reveal_their_sum():
    vectors = {f"c{i}": np.full(4, 0.1) for i in range(4)}
    ids, inner = nodes(vectors, dict.fromkeys(vectors, 1), fail={"c0": "collect_masked_vectors",
                                                                 "c1": "collect_masked_vectors"})
    stages = []

    def exchange(stage, contents):
        stages.append(stage)
        return inner(stage, contents)

    result = secure_mean(protocol(4, 1), ids, 4, exchange, seed=0, rnd=1)  # threshold 2: the shares would do
    assert result.mean is None and "fewer than the 3" in result.problem
    assert "unmask" not in stages


def test_a_round_whose_survivors_are_fewer_than_three_aggregates_nothing(tmp_path, monkeypatch):
    """Of two survivors, each could take its own update off the mean and read the other's."""
    from fedlora import run_experiment
    from fedlora.engines.runtime import ClientRuntime

    from .conftest import tiny_config

    original = ClientRuntime.fit

    def fit(self, cid, rnd, payload, state, slot=None):
        if rnd == 1 and cid.endswith("-1"):  # two of the four clients fail in round 1
            raise RuntimeError("this client crashed")
        return original(self, cid, rnd, payload, state, slot)

    monkeypatch.setattr(ClientRuntime, "fit", fit)
    result = run_experiment(tiny_config(tmp_path, federation={"rounds": 2, "secure_aggregation": True}))
    assert "fewer than the 3 a sum needs" in result.rounds[1]["unaggregated"]
    assert not result.rounds[2].get("unaggregated")


def test_our_server_driver_equals_flowers_secaggplus_workflow_on_the_same_inputs(monkeypatch):
    """Flower's SecAggPlusWorkflow over a loopback grid and our driver, the same nodes (Flower's mod, seeded
    rounding) and vectors with unequal weights: the same mean, bit for bit up to FedAvg's final division."""
    from flwr.app import ConfigRecord, Context, Message, RecordDict
    from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
    from flwr.compat.common import recorddict_compat as compat
    from flwr.server import ServerConfig
    from flwr.server.client_manager import SimpleClientManager
    from flwr.server.compat.grid_client_proxy import GridClientProxy
    from flwr.server.compat.legacy_context import LegacyContext
    from flwr.server.strategy import FedAvg
    from flwr.server.workflow import SecAggPlusWorkflow
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key as WorkflowKey
    from flwr.serverapp.grid import Grid
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, attr, 0)
    rng = np.random.default_rng(3)
    node_ids = [11, 12, 13, 14, 15]
    vectors = {nid: rng.normal(0, 0.1, 40) for nid in node_ids}
    weights = dict(zip(node_ids, (3, 5, 7, 11, 13)))

    def answer(msg: Message, contexts: dict) -> Message:
        nid = msg.metadata.dst_node_id
        msg = Message(recorddict_from_proto(recorddict_to_proto(msg.content)), metadata=msg.metadata)  # the wire
        return client_reply(msg, contexts[nid], lambda: (vectors[nid], weights[nid], {}), seed=nid)

    class Loopback(Grid):
        def __init__(self):
            self.contexts = {n: Context(0, n, {}, RecordDict(), {}) for n in node_ids}

        def send_and_receive(self, messages, *, timeout=None):
            return [answer(m, self.contexts) for m in messages]

        def set_run(self, run_id): ...
        @property
        def run(self): ...
        def create_message(self, *a, **k): ...
        def get_node_ids(self): return node_ids
        def get_nodes(self): return []
        def push_messages(self, messages): ...
        def pull_messages(self, message_ids): ...

    grid = Loopback()
    manager = SimpleClientManager()
    for nid in node_ids:
        manager.register(GridClientProxy(nid, grid, 0))
    captured = {}

    class Capture(FedAvg):
        def aggregate_fit(self, server_round, results, failures):
            captured["mean"] = parameters_to_ndarrays(results[0][1].parameters)[0]
            return super().aggregate_fit(server_round, results, failures)

    context = LegacyContext(Context(0, 0, {}, RecordDict(), {}), ServerConfig(1), Capture(), manager)
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: 1})
    context.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
        ndarrays_to_parameters([np.zeros(40)]), True)
    SecAggPlusWorkflow(num_shares=1.0, reconstruction_threshold=0.5, max_weight=13.0)(grid, context)

    ours_grid = Loopback()
    cid_of = {str(n): n for n in node_ids}

    def exchange(stage, contents):
        out = {}
        for cid, content in contents.items():
            msg = Message(content, dst_node_id=cid_of[cid], message_type="train", group_id="1")
            out[cid] = answer(msg, ours_grid.contexts).content
        return out

    result = secure_mean(protocol(5, 13.0), cid_of, 40, exchange, seed=0, rnd=1)
    np.testing.assert_array_equal(result.mean, captured["mean"])
    exact = sum(weights[n] * vectors[n] for n in node_ids) / sum(weights.values())
    assert np.abs(result.mean - exact).max() < 5 * STEP


def _states(result, name):
    return {cid: s.states[name] for cid, s in result.client_states.items() if name in s.states}


def _max_difference(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max(float((a[c][k] - b[c][k]).abs().max()) for c in a for k in a[c])


@pytest.mark.parametrize("method,state", [("fedit", None), ("fedalt", "individual"), ("fdlora", None),
                                          ("hetlora", None), ("ifca", None)])
def test_a_secure_run_equals_the_plain_run_within_the_quantization_error(tmp_path, method, state):
    from fedlora import run_experiment

    from .conftest import tiny_config

    def run(secure):  # HetLoRA at ranks 1, 2, 4, 4: its clients pad their masked replies themselves
        return run_experiment(tiny_config(tmp_path / str(secure), algorithm={"name": method},
                                          federation={"rounds": 3, "secure_aggregation": secure},
                                          **({"clients": {"lora_r": [1, 2, 4, 4]}} if method == "hetlora" else {})))

    plain, secure = run(False), run(True)
    if state is None:  # the server's LoRAs (global, or IFCA's clusters): the means the protocol computed
        a, b = plain.server_state["tensors"], secure.server_state["tensors"]
        assert set(a) == set(b)
        difference = max(float((a[n][k] - b[n][k]).abs().max()) for n in a for k in a[n])
    else:  # FedALT: each client's own LoRA, trained against the RoW it formed from S and W
        difference = _max_difference(_states(plain, state), _states(secure, state))
        assert _max_difference(_states(plain, "row"), _states(secure, "row")) < 1e-4
        assert not any(name.startswith("individual") for name in secure.server_state["tensors"])
    # a quantization level is 4e-6; AdamW's steps carry such differences over rounds (FDLoRA's outer momentum most)
    assert 0 < difference < 1e-3
    for p, s in zip(plain.rounds[1:], secure.rounds[1:]):
        assert s["comm"]["bytes_up"] > p["comm"]["bytes_up"]  # the masked vector is int64, plus the key exchange
        hidden = {"cluster"} if method == "ifca" else set()  # IFCA's choice never leaves the client unmasked
        assert {c: set(f) for c, f in s["fit"].items()} == {c: set(f) - hidden for c, f in p["fit"].items()}
    first = [{c: {k: v for k, v in f.items() if not k.startswith("bytes") and k != "cluster"} for c, f in r["fit"].items()}
             for r in (plain.rounds[1], secure.rounds[1])]
    assert first[0] == first[1]  # round 1 trains from the same start: the same metrics, as they were
    accuracy = [r["summary"]["mean"]["accuracy"] for r in (plain.rounds[-1], secure.rounds[-1])]
    assert abs(accuracy[0] - accuracy[1]) < 0.05


def test_a_secure_fedalt_run_resumed_mid_way_equals_the_uninterrupted_one(tmp_path, monkeypatch):
    from fedlora import resume_experiment, run_experiment

    from .conftest import run_killed_in_round, tiny_config
    from .test_checkpoint import _assert_same_states, _without_times

    def make(out):
        return tiny_config(tmp_path, output_dir=str(tmp_path / out), algorithm={"name": "fedalt"},
                           federation={"rounds": 3, "secure_aggregation": True, "clients_per_round": 3})

    full = run_experiment(make("full"))
    run_killed_in_round(monkeypatch, make("killed"), 3)
    resumed = resume_experiment(tmp_path / "killed")
    assert _without_times(resumed.rounds) == _without_times(full.rounds)
    _assert_same_states(resumed.client_states, full.client_states)
    for name, tensor in resumed.server_state["tensors"]["row_sum"].items():
        assert torch.equal(tensor, full.server_state["tensors"]["row_sum"][name])


def test_fedalt_under_partial_participation_a_failed_round_and_dp_keeps_the_sum_of_what_was_sent():
    """The server's S equals the weighted sum of what it counted of each client (its public init plus the changes
    it sent, as they left the client: here perturbed as DP's clipping and noise would), after rounds with different
    participants and one round that aggregated nothing (its uploads are re-sent as changes later); each client's
    RoW is the others' mean of exactly that, so it never drifts from what the server holds."""
    from fedlora.adapters import AdapterSpec
    from fedlora.algorithms import ClientInfo, ClientState, Reply, SecureMean, build
    from fedlora.algorithms.fedalt import individual_init

    spec = AdapterSpec((("m", 5, 4),), r=2, alpha=4)
    server, client = build("fedalt", {"weighting": "examples", "init": "independent"}, spec, seed=0)
    server.secure = True
    infos = [ClientInfo(c, n) for c, n in zip("abcd", (1, 2, 3, 4))]
    server.setup(infos)
    states = {c: ClientState({"individual": individual_init(spec, 0, client.options, c)}) for c in "abcd"}
    for s in states.values():
        s.states["counted"] = dict(s.states["individual"])
    held = {c: dict(s.states["individual"]) for c, s in states.items()}  # what S holds of each, once counted
    g = torch.Generator().manual_seed(0)

    def upload(rnd, cid, payload):
        s = states[cid]
        client._rest_of_world(payload, s)
        s.states["individual"] = {k: torch.randn(v.shape, generator=g) for k, v in spec.init_lora(g).items()}
        change = {k: v - s.states["counted"][k] for k, v in s.states["individual"].items()}
        s.meta["uploaded_round"] = rnd
        sent = {k: 0.5 * v + 0.01 * torch.randn(v.shape, generator=g) for k, v in change.items()}  # as DP leaves it
        client.uploaded(Reply({"individual_update": sent}, 1), s)
        return sent

    counted = set()
    for rnd, sampled, aggregated in ((1, "abc", True), (2, "bd", False), (3, "bcd", True), (4, "ab", True)):
        payloads = server.configure(rnd, list(sampled))
        sent = {c: upload(rnd, c, payloads[c]) for c in sampled}
        if not aggregated:
            continue
        weight = sum(server.weight(c) for c in sampled)
        mean = {k: sum(server.weight(c) * sent[c][k] for c in sampled) / weight for k in sent[sampled[0]]}
        server.aggregate_secure(rnd, SecureMean({"individual_update": mean}, weight, list(sampled)))
        for c in sampled:
            held[c] = {k: v + sent[c][k] for k, v in held[c].items()}
        counted.update(sampled)
    expected = {k: sum(server.weight(c) * held[c][k].double() for c in counted) for k in held["a"]}
    for k, v in expected.items():
        torch.testing.assert_close(server._sum[k], v, atol=1e-6, rtol=1e-5)  # the test's means are float32
    assert server._total == sum(server.weight(c) for c in counted)
    row_of_a = client._rest_of_world(server.configure(5, ["a"])["a"], states["a"])
    others = [c for c in counted if c != "a"]
    for k in row_of_a:
        mean = sum(server.weight(c) * held[c][k] for c in others) / sum(server.weight(c) for c in others)
        torch.testing.assert_close(row_of_a[k], mean, atol=1e-6, rtol=1e-5)
    last = server.configure(5, sorted(counted))
    for c in counted:  # each client's own record of what the sum holds of it (for "a" a second time: no change)
        client._rest_of_world(last[c], states[c])
        for k, v in held[c].items():
            torch.testing.assert_close(states[c].states["counted"][k], v, atol=1e-6, rtol=1e-5)


def test_fedalt_refuses_a_secure_checkpoint_of_the_older_format_and_keeps_a_noised_sum_as_released():
    from fedlora.adapters import AdapterSpec
    from fedlora.algorithms import ClientInfo, build
    from fedlora.core import dp
    from fedlora.core.errors import CheckpointError

    spec = AdapterSpec((("m", 5, 4),), r=2, alpha=4)
    server, _ = build("fedalt", {}, spec, seed=0)
    server.secure = True
    server.setup([ClientInfo(c, 1) for c in "abc"])
    with pytest.raises(CheckpointError, match="start the run anew"):  # its sum lacks the inits the clients assume
        server.load_state_dict({"tensors": {"row_sum": {}}, "meta": {"row_weight": 0.0, "counted": {}}})
    server.load_state_dict(server.state_dict())
    # central DP with noise from the OS: re-noising the sum on load would release it a second time
    plain, _ = build("fedalt", {}, spec, seed=0)
    plain.noise = dp.SumNoise(1.0, 0, secure=True)
    plain.setup([ClientInfo(c, 1) for c in "abc"])
    plain.aggregate(1, {c: _reply_of(spec.init_lora(torch.Generator().manual_seed(i))) for i, c in enumerate("abc")})
    again, _ = build("fedalt", {}, spec, seed=0)
    again.noise = dp.SumNoise(1.0, 0, secure=True)
    again.setup([ClientInfo(c, 1) for c in "abc"])
    again.load_state_dict(plain.state_dict())
    assert all(torch.equal(again._sum[k], plain._sum[k]) for k in plain._sum)


def _reply_of(lora):
    from fedlora.algorithms import Reply

    return Reply({"individual": lora}, 1)


@pytest.mark.parametrize("method", ["ffa", "fedsa", "feddpa", "rolora"])
def test_the_averaging_servers_fold_a_secure_mean_as_they_fold_the_replies(method):
    from fedlora.adapters import AdapterSpec
    from fedlora.algorithms import ClientInfo, Reply, SecureMean, build

    spec = AdapterSpec((("m", 5, 4),), r=2, alpha=4)
    plain, _ = build(method, {}, spec, seed=0)
    secure, _ = build(method, {}, spec, seed=0)
    infos = [ClientInfo(c, n) for c, n in zip("abc", (1, 2, 5))]
    plain.setup(infos)
    secure.setup(infos)
    secure.secure = True
    payloads = plain.configure(1, list("abc"))
    (name,) = payloads["a"].expects
    g = torch.Generator().manual_seed(1)
    template = payloads["a"].states.get(name) or plain.lora_init()
    replies = {c: Reply({name: {k: torch.randn(v.shape, generator=g) for k, v in template.items()}}, 1) for c in "abc"}
    plain.aggregate(1, replies)
    weights = {c: plain.weight(c) for c in "abc"}
    mean = {k: sum(weights[c] * replies[c].states[name][k] for c in "abc") / sum(weights.values()) for k in template}
    secure.aggregate_secure(1, SecureMean({name: mean}, sum(weights.values()), list("abc")))
    a, b = plain.state_dict()["tensors"], secure.state_dict()["tensors"]
    for state in a:
        for k in a[state]:
            torch.testing.assert_close(a[state][k], b[state][k])


@pytest.mark.parametrize("change,match", [
    ({"algorithm": {"name": "flora"}}, "stacks each client"),
    ({"algorithm": {"name": "fedlease"}}, "clusters the clients"),
    ({"algorithm": {"name": "local"}}, "nothing is sent"),
    ({"federation": {"aggregation": "median"}}, "aggregation='median'"),
    ({"federation": {"clients_per_round": 2}}, "3 or more clients"),
    ({"federation": {"clients_per_round": 1100}}, "wraps"),
])
def test_what_secure_aggregation_cannot_run_is_refused_before_any_work(tmp_path, change, match):
    from fedlora import run_experiment
    from fedlora.core.errors import ConfigError

    from .conftest import tiny_config

    cfg = tiny_config(tmp_path, **change)
    cfg["federation"] = {**cfg.get("federation", {}), "secure_aggregation": True}
    with pytest.raises(ConfigError, match=match):
        run_experiment(cfg)
    assert not (tmp_path / "run").exists()


def _records(run_dir):
    import json

    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_on_flower_nodes_the_secure_run_equals_the_in_process_one_and_a_silent_node_drops_out(tmp_path, monkeypatch):
    """The Flower transport and ClientApp (Flower messages to ClientApps in this process): the same sums as the
    in-process engine, bit for bit (the rounding is seeded per client and round, the neighbours per round); then a
    node that never answers is left out at the setup stage and the others' round is aggregated without it."""
    from flwr.supercore.task_identity import TaskIdentity

    from fedlora import run_experiment
    from fedlora.core.config import build_config
    from fedlora.engines.checkpoint import load_checkpoint
    from fedlora.flower.client_app import make_client_app
    from fedlora.flower.server_app import server_main

    from .conftest import tiny_config
    from .test_flower import FakeGrid

    for attr in ("_run_id", "_task_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1, raising=False)
    base = dict(algorithm={"name": "fedalt"}, federation={"rounds": 2, "secure_aggregation": True})
    inproc = run_experiment(tiny_config(tmp_path, output_dir=str(tmp_path / "inproc"), **base))
    cfg = build_config(tiny_config(tmp_path, output_dir=str(tmp_path / "flower"), engine={
        "name": "flower-sim", "num_clients": 4, "progress": False}, **base))
    server_main(cfg, FakeGrid(make_client_app(cfg), 4))
    flower = _records(tmp_path / "flower")
    for a, b in zip(inproc.rounds, flower):
        assert a.get("eval") == b.get("eval") and a.get("failures") == b.get("failures")
    checkpoint = load_checkpoint(tmp_path / "flower")
    row_sum = checkpoint.server_state["tensors"]["row_sum"]
    assert all(torch.equal(v, inproc.server_state["tensors"]["row_sum"][k]) for k, v in row_sum.items())
    # the server's side keeps the sum and nothing of one client: no client state, no per-client tensor
    assert not any(s.states or s.meta for s in checkpoint.client_states.values())
    assert set(checkpoint.server_state["tensors"]) == {"row_sum"}
    assert set(checkpoint.server_state["meta"]) == {"row_weight", "counted", "counts_inits"}

    cfg = build_config(tiny_config(tmp_path, output_dir=str(tmp_path / "silent"), engine={
        "name": "flower-sim", "num_clients": 4, "progress": False}, **base))
    server_main(cfg, FakeGrid(make_client_app(cfg), 4, silent={103}))  # partition 3 = verb_class-1
    records = _records(tmp_path / "silent")
    assert set(records[1]["fit"]) == {"noun_topic-0", "noun_topic-1", "verb_class-0"}
    assert "setup stage" in records[1]["failures"]["verb_class-1"] and "unaggregated" not in records[1]
    server = load_checkpoint(tmp_path / "silent").server_state
    assert set(server["meta"]["counted"]) == {"noun_topic-0", "noun_topic-1", "verb_class-0"}


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("FEDLORA_DEPLOYMENT_TESTS"),
                    reason="set FEDLORA_DEPLOYMENT_TESTS=1 (minutes: four Ray messages per client and round)")
def test_on_flowers_simulation_runtime_the_secure_run_equals_the_in_process_one(tmp_path):
    """Ray's ClientApps keep each node's SecAgg+ state in its Context between the four stages of a round."""
    from fedlora import run_experiment

    from .conftest import tiny_config

    base = dict(algorithm={"name": "fedit"}, federation={"rounds": 2, "secure_aggregation": True})
    inproc = run_experiment(tiny_config(tmp_path, output_dir=str(tmp_path / "inproc"), **base))
    flower = run_experiment(tiny_config(tmp_path, output_dir=str(tmp_path / "flower"), engine={
        "name": "flower-sim", "progress": False, "torch_threads": 1}, **base))
    for a, b in zip(inproc.evaluations(), flower.evaluations()):
        for cid, metrics in a["eval"].items():
            for key, value in metrics.items():
                assert b["eval"][cid][key] == pytest.approx(value, rel=1e-4, abs=1e-5), (a["round"], cid, key)
    for a, b in zip(inproc.rounds[1:], flower.rounds[1:]):
        assert not b["failures"] and "unaggregated" not in b and set(a["fit"]) == set(b["fit"])


def test_local_dp_under_secure_aggregation_adds_each_clients_share_and_counts_epsilon_as_local_dp(tmp_path):
    """Distributed DP: each client adds noise_multiplier x clip_norm / sqrt(t), so any sum the server can unmask
    (t clients or more) holds at least one local client's noise; epsilon is the local mode's, as that sum's."""
    from fedlora import run_experiment
    from fedlora.algorithms import ClientState, Reply
    from fedlora.core.config import build_config
    from fedlora.engines.privacy import NOISE_SHARE, privatize

    from .conftest import tiny_config

    cfg = build_config(tiny_config(tmp_path, privacy={"dp": "local", "noise_multiplier": 2.0, "clip_norm": 1.0}))
    start = {"m.lora_A": torch.zeros(1000, 10)}
    reply = Reply({"global": {"m.lora_A": torch.zeros(1000, 10)}}, 10)
    stds = [float(privatize(reply, Payload({"global": start}, config), ClientState(), cfg, 0, start,
                            lambda n, p, r: p.states.get(n))[0].states["global"]["m.lora_A"].std())
            for config in ({}, {NOISE_SHARE: 0.5})]
    assert stds[0] == pytest.approx(2.0, rel=0.03) and stds[1] == pytest.approx(1.0, rel=0.03)

    def run(method, secure):
        return run_experiment(tiny_config(tmp_path / f"{method}{secure}", algorithm={"name": method}, privacy={
            "dp": "local", "noise_multiplier": 1.0}, federation={"rounds": 2, "secure_aggregation": secure}))

    for method in ("fedit", "fedalt"):
        plain, secure = run(method, False), run(method, True)
        assert [r["privacy"]["epsilon"] for r in secure.rounds[1:]] == [r["privacy"]["epsilon"] for r in plain.rounds[1:]]
        assert not any(r.get("failures") or r.get("unaggregated") for r in secure.rounds[1:])
        # no training metric leaves a local-DP client, secure or not
        assert {c: set(f) for c, f in secure.rounds[-1]["fit"].items()} == {c: set(f) for c, f in plain.rounds[-1]["fit"].items()}


def test_central_dp_under_secure_aggregation_noises_the_unmasked_mean_as_it_noises_the_plain_one(tmp_path):
    from fedlora import run_experiment

    from .conftest import tiny_config

    def run(secure):
        return run_experiment(tiny_config(tmp_path / str(secure), privacy={"dp": "client_clipping",
                                          "noise_multiplier": 1.0}, federation={"rounds": 2, "secure_aggregation": secure}))

    plain, secure = run(False), run(True)
    assert [r["privacy"] for r in secure.rounds[1:]] == [r["privacy"] for r in plain.rounds[1:]]
    a, b = plain.server_state["tensors"]["global"], secure.server_state["tensors"]["global"]
    # the same noise draws (seeded per round and key) on means that differ by the quantization only
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-3


def test_ifca_recovers_each_clusters_mean_from_slots_and_keeps_a_cluster_nobody_chose():
    from fedlora.adapters import AdapterSpec
    from fedlora.algorithms import ClientInfo, Reply, SecureMean, build
    from fedlora.algorithms.ifca import MEMBERS, slot_key

    spec = AdapterSpec((("m", 5, 4),), r=2, alpha=4)
    infos = [ClientInfo(c, n) for c, n in zip("abcd", (1, 2, 3, 4))]
    plain, _ = build("ifca", {"clusters": 3, "weighting": "examples"}, spec, seed=0)
    secure, _ = build("ifca", {"clusters": 3, "weighting": "examples"}, spec, seed=0)
    secure.secure = True
    plain.setup(infos)
    secure.setup(infos)
    g = torch.Generator().manual_seed(2)
    chosen = {"a": 0, "b": 2, "c": 0, "d": 2}  # nobody chooses cluster 1
    loras = {c: {k: torch.randn(v.shape, generator=g) for k, v in spec.init_lora(g).items()} for c in "abcd"}
    plain.aggregate(1, {c: Reply({"lora": loras[c]}, 1, {"cluster": chosen[c]}) for c in "abcd"})
    w = {c: plain.weight(c) for c in "abcd"}
    total = sum(w.values())
    slots = {slot_key(j): {k: sum(w[c] * loras[c][k] * (chosen[c] == j) for c in "abcd") / total
                           for k in loras["a"]} for j in range(3)}
    members = {"onehot": sum(w[c] * torch.nn.functional.one_hot(torch.tensor(chosen[c]), 3).float()
                             for c in "abcd") / total}
    untouched = dict(secure.cluster_loras[1])
    secure.aggregate_secure(1, SecureMean({**slots, MEMBERS: members}, total, list("abcd")))
    for j in (0, 2):
        for k in loras["a"]:
            torch.testing.assert_close(secure.cluster_loras[j][k], plain.cluster_loras[j][k])
    assert all(torch.equal(secure.cluster_loras[1][k], v) for k, v in untouched.items())


def test_fedlora_methods_says_which_methods_run_under_secure_aggregation_and_why_not(capsys):
    from fedlora import cli

    cli.main(["methods"])
    said, name = {}, None
    for line in capsys.readouterr().out.splitlines():
        if line and not line.startswith(" "):
            name = line.split()[0]
        elif "secure aggregation:" in line:
            said[name] = line.split("secure aggregation:")[1].strip()
    for name in ("fedit", "ffa", "fedsa", "feddpa", "hetlora", "rolora", "fdlora", "ifca", "fedalt"):
        assert said[name] == "yes", name
    for name in ("local", "flora", "fedex", "flexlora", "fedlease"):
        assert said[name].startswith("no (") and len(said[name]) > 20, name
