"""Fault injection: clients that raise, return malformed updates, hang or disconnect; a process killed with
SIGKILL mid-run. The run goes on without them (or stops cleanly below min_clients) and nothing is lost."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest
import tomli_w
import torch

from fedlora import resume_experiment, run_experiment
from fedlora.algorithms import Reply
from fedlora.core.config import build_config
from fedlora.core.errors import ClientFailure
from fedlora.engines.checkpoint import load_checkpoint
from fedlora.engines.runtime import ClientRuntime
from fedlora.flower.app import write_app
from fedlora.flower.local import LocalFederation

from .conftest import flower_program, tiny_config
from .test_checkpoint import _assert_same_states, _without_times

VICTIM = "noun_topic-1"
ORIGINAL_FIT = ClientRuntime.fit


def _corrupt(reply: Reply, fault: str) -> Reply:
    name, state = next(iter(reply.states.items()))
    key = sorted(state)[0]
    state = dict(state)
    if fault == "nan":
        state[key] = torch.full_like(state[key], float("nan"))
    elif fault == "wrong_shape":
        state[key] = torch.zeros(state[key].shape[0] + 1, *state[key].shape[1:])
    elif fault == "extra_key":
        state["bert.pooler.dense.lora_A"] = torch.zeros(2, 2)
    elif fault == "missing_key":
        del state[key]
    return Reply({**reply.states, name: state}, reply.num_examples, reply.metrics)


def _faulty_fit(fault: str, bad_round: int):
    original = ORIGINAL_FIT  # not ClientRuntime.fit, which may be an earlier fault's patch

    def fit(self, cid, rnd, payload, state):
        if cid == VICTIM and rnd == bad_round and fault == "raise":
            raise RuntimeError("injected client crash")
        reply, new_state = original(self, cid, rnd, payload, state)
        if cid == VICTIM and rnd == bad_round:
            reply = _corrupt(reply, fault)
        return reply, new_state

    return fit


@pytest.mark.parametrize("method", ["fedit", "fedalt"])
def test_a_faulty_client_is_left_out_and_touches_no_other_client(tmp_path, monkeypatch, method):
    """Every fault is treated exactly like a crashed client: the others end with identical states and metrics
    (through the faulty round; later rounds differ, since the victim's own state does)."""
    make = lambda out: tiny_config(tmp_path, output_dir=str(tmp_path / out), federation={"rounds": 2},  # noqa: E731
                                   algorithm={"name": method})
    runs = {}
    for fault in ("raise", "nan", "wrong_shape", "extra_key", "missing_key"):
        monkeypatch.setattr(ClientRuntime, "fit", _faulty_fit(fault, bad_round=2))
        runs[fault] = run_experiment(make(fault))
        failures = runs[fault].rounds[2]["failures"]
        assert list(failures) == [VICTIM], failures
        assert ("injected client crash" if fault == "raise" else "update rejected") in failures[VICTIM]
        assert VICTIM not in runs[fault].rounds[2]["fit"] and not runs[fault].rounds[1]["failures"]
    others = lambda run: {c: s for c, s in run.client_states.items() if c != VICTIM}  # noqa: E731
    for fault, run in runs.items():
        _assert_same_states(others(run), others(runs["raise"]))
        for got, want in zip(run.evaluations(), runs["raise"].evaluations()):
            assert {c: m for c, m in got["eval"].items() if c != VICTIM} == \
                   {c: m for c, m in want["eval"].items() if c != VICTIM}, fault


def test_below_min_clients_the_run_stops_cleanly_and_resumes(tmp_path, monkeypatch):
    cfg = lambda out: tiny_config(tmp_path, output_dir=str(tmp_path / out),  # noqa: E731
                                  federation={"rounds": 3, "min_clients": 4}, algorithm={"name": "fedalt"})
    full = run_experiment(cfg("full"))
    monkeypatch.setattr(ClientRuntime, "fit", _faulty_fit("raise", bad_round=2))
    with pytest.raises(ClientFailure, match="only 3 of 4 clients replied, fewer than federation.min_clients=4"):
        run_experiment(cfg("stopped"))
    assert load_checkpoint(tmp_path / "stopped").round == 1  # the last complete round, intact
    monkeypatch.undo()
    resumed = resume_experiment(tmp_path / "stopped")  # the client is back: nothing was lost
    assert _without_times(resumed.rounds) == _without_times(full.rounds)
    _assert_same_states(resumed.client_states, full.client_states)


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_equals_uninterrupted(tmp_path):
    config = tiny_config(tmp_path, output_dir=str(tmp_path / "killed"), federation={"rounds": 6},
                         algorithm={"name": "fedalt"})
    (tmp_path / "exp.toml").write_text(tomli_w.dumps(config))
    proc = subprocess.Popen([sys.executable, "-m", "fedlora.cli", "run", str(tmp_path / "exp.toml"), "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):  # rounds 0, 1, 2 recorded
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(random.Random(os.getpid()).uniform(0.0, 0.6))  # somewhere in round 3: any moment must do
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL  # it really was killed, not finished
    resumed = resume_experiment(tmp_path / "killed")
    full = run_experiment({**config, "output_dir": str(tmp_path / "full")})
    assert _without_times(resumed.rounds) == _without_times(full.rounds)
    _assert_same_states(resumed.client_states, full.client_states)


def _tree(popen: subprocess.Popen) -> list[psutil.Process]:
    parent = psutil.Process(popen.pid)
    return [parent, *parent.children(recursive=True)]


def _clientapps(popen: subprocess.Popen) -> set[psutil.Process]:
    return {proc for proc in _tree(popen) if flower_program(proc) == "flwr-clientapp"}


class _Freezer(threading.Thread):
    """SIGSTOPs every ClientApp a SuperNode has or starts from now on. The SuperNode may start a ClientApp
    process before its message arrives, so which process will serve round 2 cannot be told by start time."""

    def __init__(self, supernode: subprocess.Popen) -> None:
        super().__init__(daemon=True)
        self.supernode, self.frozen, self.done = supernode, set(), threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            for proc in _clientapps(self.supernode) - self.frozen:
                try:
                    proc.suspend()
                    self.frozen.add(proc)
                except psutil.NoSuchProcess:
                    pass
            time.sleep(0.01)

    def stop(self) -> None:
        self.done.set()
        self.join()
        for proc in self.frozen:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass


@pytest.mark.slow
def test_deployment_survives_a_hung_and_a_disconnected_supernode(tmp_path):
    """Real processes: after round 0's evaluation one client's ClientApp hangs (SIGSTOP; its SuperNode stays up)
    and another SuperNode is killed (SIGKILL). Round 1 records both as failures, the hung one once
    federation.round_timeout passes, and the run finishes with the clients it has."""
    clients = ["noun_topic-0", "noun_topic-1", "noun_topic-2"]
    cfg = build_config(tiny_config(tmp_path, output_dir=str(tmp_path / "run"),
                                   data={"tasks": ["noun_topic"], "clients_per_task": 3},
                                   federation={"rounds": 1, "round_timeout": 30, "min_clients": 1},
                                   engine={"progress": False, "num_clients": 3}, algorithm={"name": "fedit"}))
    app = write_app(tmp_path / "app", cfg)
    with LocalFederation(tmp_path / "fed", {cid: {"client-id": cid} for cid in clients}) as fed:
        errors: list[BaseException] = []
        # a deployment's run directory is named at submission (the app does not carry it)
        runner = threading.Thread(target=lambda: _catch(errors, fed.run, app,
                                                        {"set.output_dir": str(tmp_path / "run")}))
        runner.start()
        metrics = tmp_path / "run" / "metrics.jsonl"
        deadline = time.monotonic() + 600
        while not (metrics.exists() and any(json.loads(x)["round"] == 0 for x in metrics.read_text().splitlines())):
            assert runner.is_alive() and time.monotonic() < deadline, errors
            time.sleep(0.1)
        for proc in _tree(fed.processes["supernode-noun_topic-2"]):
            proc.kill()
        freezer = _Freezer(fed.processes["supernode-noun_topic-1"])  # round 1's ClientApp hangs
        freezer.start()
        runner.join(timeout=900)
        freezer.stop()
        assert not runner.is_alive() and not errors, errors
    rounds = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert [r["round"] for r in rounds] == [0, 1]
    failures = rounds[1]["failures"]
    assert set(failures) == {"noun_topic-1", "noun_topic-2"} and list(rounds[1]["fit"]) == ["noun_topic-0"]
    assert "no reply within federation.round_timeout=30" in failures["noun_topic-1"]
    assert failures["noun_topic-2"]  # gone: a timeout, or Flower's "Node Unavailable" once heartbeats stop
    assert "noun_topic-2" in rounds[1]["eval_failures"] and "noun_topic-0" in rounds[1]["eval"]
    # (the hung client's evaluation may time out too, or run once its SuperNode gives up on the frozen app)


def _catch(errors: list, fn, *args) -> None:
    try:
        fn(*args)
    except BaseException as exc:  # the test thread reports it
        errors.append(exc)
