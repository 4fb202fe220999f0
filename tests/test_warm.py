"""A deployment's warm ClientApp: one long-lived worker per node answers every message exactly as a cold
ClientApp process would, and never outlives the node it belongs to."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import psutil
import pytest
import tomli_w

from fedlora.core.config import build_config
from fedlora.core.errors import ClientFailure
from fedlora.flower import warm
from fedlora.flower.client_app import make_client_app
from fedlora.flower.server_app import server_main

from .conftest import tiny_config
from .test_flower import FakeGrid


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity  # what Flower's runtime sets for a ServerApp

    for attr in ("_run_id", "_task_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1, raising=False)


@pytest.fixture
def owner(monkeypatch):
    """A stand-in for the node's SuperExec: the process the worker belongs to (killed at the end)."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    monkeypatch.setattr(warm, "_owner", lambda: process.pid)
    yield process
    process.kill()
    process.wait()


def _deployment_grid(tmp_path, app, cfg, **node_config) -> FakeGrid:
    """A FakeGrid whose nodes read the experiment from the run config, as a deployment's nodes do."""
    grid = FakeGrid(app, 4)
    run_config = {"experiment": tomli_w.dumps(cfg.model_dump(mode="json", exclude_none=True))}
    for context in grid.contexts.values():
        context.run_config.update(run_config)
        context.node_config.update({"state-dir": str(tmp_path / "nodes"), **node_config})
    return grid


def _run(tmp_path, name: str, app, rounds: int = 2, **node_config) -> list[dict]:
    cfg = build_config(tiny_config(tmp_path / name, federation={"rounds": rounds}, algorithm={"name": "fedalt"},
                                   engine={"num_clients": 4, "progress": False}))
    (tmp_path / name / "run").mkdir(parents=True)
    server_main(cfg, _deployment_grid(tmp_path / name, app, cfg, **node_config), run_dir_ready=True)
    return [json.loads(x) for x in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]


def _worker_pid(owner) -> int:
    return json.loads((warm.worker_home(owner.pid) / "address.json").read_text())["pid"]


def _starts(owner) -> int:
    return (warm.worker_home(owner.pid) / "worker.log").read_text().count("serving the node of SuperExec")


def _alive(pid: int) -> bool:
    try:
        return warm._alive(psutil.Process(pid))
    except psutil.NoSuchProcess:
        return False


def _gone(pid: int, within: float = 10.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.1)
    return False


def test_one_warm_worker_answers_every_message_as_the_cold_client_app(tmp_path, owner):
    cold = _run(tmp_path, "cold", make_client_app())
    app = warm.make_warm_client_app()
    warm_records = _run(tmp_path, "warm", app)
    pid = _worker_pid(owner)
    assert _starts(owner) == 1  # one worker served every message of the run
    assert len(warm_records) == len(cold) == 3
    for a, b in zip(cold, warm_records):
        assert a["eval"] == b["eval"] and a.get("fit") == b.get("fit"), a["round"]
    # a worker started from other code (as if fedlora had been upgraded since) is replaced, with equal results
    address = warm.worker_home(owner.pid) / "address.json"
    address.write_text(json.dumps({**json.loads(address.read_text()), "fingerprint": "fedlora 0.0.1"}))
    upgraded = _run(tmp_path, "upgraded", app, rounds=1)
    assert _gone(pid) and _worker_pid(owner) != pid and _starts(owner) == 2
    assert [r["eval"] for r in upgraded] == [r["eval"] for r in cold[:2]]
    pid = _worker_pid(owner)
    owner.kill()  # left a zombie (not reaped): dead all the same
    assert _gone(pid), "the warm worker outlived its SuperExec"


def test_errors_in_the_worker_reach_the_server_and_cold_mode_starts_no_worker(tmp_path, owner):
    # every node claims a client the split does not have: the worker's error is each node's handshake reply
    with pytest.raises(ClientFailure, match="client-id 'nobody' is not a client .*in fedlora's warm worker"):
        _run(tmp_path, "bad", warm.make_warm_client_app(), **{"client-id": "nobody"})
    home = warm.worker_home(owner.pid)
    assert "ConfigError" in (home / "worker.log").read_text()
    (home / "address.json").unlink()  # as a dead worker leaves it: a warm message would start a new one
    _run(tmp_path, "cold", warm.make_warm_client_app(), warm="false")
    assert not (home / "address.json").exists()


def test_a_bad_warm_value_is_refused():
    with pytest.raises(ValueError, match="node config warm='maybe'"):
        warm._is_warm({"warm": "maybe"})


@pytest.mark.parametrize("warm_clients, node_warm", [(True, None), (False, "false")])
def test_flower_local_starts_its_supernodes_warm_unless_told_not_to(tmp_path, monkeypatch, warm_clients, node_warm):
    from fedlora.flower import local

    seen = {}

    class Stop(Exception):
        pass

    class Federation(local.LocalFederation):
        def __enter__(self):
            seen.update(self.supernodes)
            raise Stop

    monkeypatch.setattr(local, "LocalFederation", Federation)
    cfg = build_config(tiny_config(tmp_path, engine={"name": "flower-local", "warm_clients": warm_clients}))
    cfg.run_dir.mkdir(parents=True)
    with pytest.raises(Stop):
        local.run_local_deployment(cfg, cfg.run_dir)
    assert len(seen) == 4 and {node.get("warm") for node in seen.values()} == {node_warm}
