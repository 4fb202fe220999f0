"""The Flower engine: the ClientApp in-process, and the same metrics as the in-process engine on Flower's
simulation runtime (the proof that the algorithms do not depend on the engine)."""

from __future__ import annotations

import time

import pytest
import torch
from flwr.app import Context, Message, MessageType, Metadata, RecordDict

from fedlora import run_experiment
from fedlora.core.config import build_config
from fedlora.core.errors import CheckpointError
from fedlora.flower.client_app import make_client_app
from fedlora.flower.wire import decode, encode

from .conftest import tiny_config


def _message(kind: str, states: dict, info: dict) -> Message:
    md = Metadata(run_id=1, message_id="", src_node_id=0, dst_node_id=7, reply_to_message_id="", group_id="1",
                  created_at=time.time(), ttl=3600, message_type=kind)
    return Message(metadata=md, content=encode(states, info))


def test_wire_round_trip_is_exact():
    states = {"global": {"a.lora_A": torch.randn(2, 3), "a.lora_B": torch.zeros(3, 2)}}
    got_states, got_info = decode(encode(states, {"phase": "clustered", "expert": 2}))
    assert got_info == {"phase": "clustered", "expert": 2}
    assert all(torch.equal(got_states["global"][k], v) for k, v in states["global"].items())


def test_client_app_keeps_the_client_state_on_its_node(tmp_path):
    cfg = build_config(tiny_config(tmp_path, algorithm={"name": "fedalt"}))
    app = make_client_app(cfg)
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 2, "num-partitions": 4}, state=RecordDict(),
                      run_config={})
    hello = decode(app(_message(MessageType.QUERY, {}, {}), context).content)[1]
    assert hello["client_id"] == "verb_class-0" and hello["order"] == 2
    reply = app(_message(MessageType.TRAIN, {}, {"round": 1}), context)
    states, info = decode(reply.content)
    assert set(states) == {"individual"} and info["num_examples"] == 48
    kept, _ = decode(context.state)
    assert set(kept) == {"individual", "row", "gate", "_head"}
    bad = {"row": {"bad": states["individual"]["bert.encoder.layer.0.attention.self.query.lora_A"]}}
    with pytest.raises(CheckpointError, match="does not fit the model"):  # Flower turns it into an error reply
        app(_message(MessageType.TRAIN, bad, {"round": 2}), context)
    after, _ = decode(context.state)
    assert all(torch.equal(after[n][k], kept[n][k]) for n in kept for k in kept[n])  # a failed round changes nothing


@pytest.mark.slow
@pytest.mark.parametrize("method,options", [("fedit", {}), ("fedalt", {}), ("fedlease", {"warmup_rounds": 1}), ("fedex", {}),
                                            ("flexlora", {}), ("rolora", {})])
def test_flower_simulation_equals_in_process(tmp_path, method, options):
    base = dict(federation={"rounds": 2}, algorithm={"name": method, "options": options})
    inproc = run_experiment(tiny_config(tmp_path, output_dir=str(tmp_path / "inproc"), **base))
    flower = run_experiment(tiny_config(tmp_path, output_dir=str(tmp_path / "flower"), engine={"name": "flower-sim",
                                        "progress": False, "torch_threads": 1}, **base))
    assert [r["round"] for r in flower.rounds] == [0, 1, 2]
    for a, b in zip(inproc.evaluations(), flower.evaluations()):
        for cid, metrics in a["eval"].items():
            for key, value in metrics.items():
                assert b["eval"][cid][key] == pytest.approx(value, rel=1e-4, abs=1e-5), (a["round"], cid, key)
    for a, b in zip(inproc.rounds[1:], flower.rounds[1:]):
        assert a["comm"] == b["comm"] and a["sampled"] == b["sampled"]


class FakeGrid:
    """A Grid that delivers messages to ClientApps in this process (no Ray), as the SuperNode runtime would:
    an exception becomes an error reply, a node in `silent` never answers."""

    def __init__(self, app, n_nodes: int, silent: set[int] = frozenset()):
        self.app, self.silent = app, silent
        self.contexts = {100 + i: Context(run_id=1, node_id=100 + i, node_config={"partition-id": i}, state=RecordDict(),
                                          run_config={}) for i in range(n_nodes)}

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, messages, timeout=None):
        from flwr.app import Error

        replies = []
        for message in messages:
            node = message.metadata.dst_node_id
            if node in self.silent and message.metadata.message_type != MessageType.QUERY:
                continue
            md = Metadata(run_id=1, message_id=f"m{len(replies)}", src_node_id=0, dst_node_id=node,
                          reply_to_message_id="", group_id=message.metadata.group_id, created_at=time.time(),
                          ttl=3600, message_type=message.metadata.message_type)
            incoming = Message(metadata=md, content=message.content)
            try:
                replies.append(self.app(incoming, self.contexts[node]))
            except Exception as exc:
                replies.append(Message(Error(code=1, reason=f"{type(exc).__name__}: {exc}"), reply_to=incoming))
        return replies


def test_failed_and_silent_nodes_are_recorded_and_left_out(tmp_path, monkeypatch):
    from fedlora.flower.server_app import server_main
    from fedlora.engines.runtime import ClientRuntime

    cfg = build_config(tiny_config(tmp_path, federation={"rounds": 2, "min_clients": 2},
                                   engine={"name": "flower-sim", "num_clients": 4, "progress": False}))
    original = ClientRuntime.fit

    def flaky(self, cid, rnd, payload, state):
        if cid == "noun_topic-1" and rnd == 2:
            raise RuntimeError("disk full")
        return original(self, cid, rnd, payload, state)

    monkeypatch.setattr(ClientRuntime, "fit", flaky)
    from flwr.supercore.task_identity import TaskIdentity  # what Flower's runtime sets for a ServerApp

    for attr in ("_run_id", "_task_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1, raising=False)
    grid = FakeGrid(make_client_app(cfg), 4, silent={103})  # partition 3 = verb_class-1 never answers a round
    server_main(cfg, grid)
    records = [__import__("json").loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert set(records[1]["fit"]) == {"noun_topic-0", "noun_topic-1", "verb_class-0"}
    assert "no reply" in records[1]["failures"]["verb_class-1"]
    assert "RuntimeError: disk full" in records[2]["failures"]["noun_topic-1"]
    assert set(records[2]["fit"]) == {"noun_topic-0", "verb_class-0"}
    assert set(records[2]["eval"]) == {"noun_topic-0", "noun_topic-1", "verb_class-0"}
    assert "no reply" in records[2]["eval_failures"]["verb_class-1"]


def test_a_node_claiming_a_client_the_operator_did_not_list_is_left_out(tmp_path, monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    from fedlora.flower.server_app import server_main

    cfg = build_config(tiny_config(tmp_path, federation={"rounds": 1},
                                   engine={"name": "flower-sim", "num_clients": 4, "progress": False,
                                           "clients": ["noun_topic-0", "noun_topic-1", "verb_class-0"]}))
    for attr in ("_run_id", "_task_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1, raising=False)
    server_main(cfg, FakeGrid(make_client_app(cfg), 4))
    records = [__import__("json").loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert set(records[-1]["fit"]) == set(records[-1]["eval"]) == {"noun_topic-0", "noun_topic-1", "verb_class-0"}


def test_replies_from_a_superlink_are_polled_often_until_the_last_or_the_timeout(monkeypatch):
    from flwr.superlink.grid.http_grid import HttpGrid

    from fedlora.flower import exchange

    class Link(HttpGrid):
        def __init__(self, arrivals):  # no connection: replies arrive pull by pull
            self.arrivals, self.pulls = arrivals, 0

        def push_messages(self, messages):
            return [f"m{i}" for i, _ in enumerate(messages)]

        def pull_messages(self, message_ids):
            self.pulls += 1
            ready = self.arrivals.pop(0) if self.arrivals else []
            return [r for r in ready if r.metadata.reply_to_message_id in set(message_ids)]

    def reply(to):
        return type("R", (), {"metadata": type("M", (), {"reply_to_message_id": to})()})()

    monkeypatch.setattr(exchange, "REPLY_POLL_SECONDS", 0.01)
    link = Link([[], [reply("m1")], [], [reply("m0")], [reply("m0")]])
    got = exchange.send_and_receive(link, [object(), object()], timeout=10)
    assert [r.metadata.reply_to_message_id for r in got] == ["m1", "m0"] and link.pulls == 4
    start = time.monotonic()
    assert exchange.send_and_receive(Link([]), [object()], timeout=0.2) == []  # nobody answers: the timeout ends it
    assert time.monotonic() - start < 2
