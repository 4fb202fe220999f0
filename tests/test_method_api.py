"""The public method API: a method written outside fedlora (examples/fedavgm-lora), installed the way pip installs it
(a dist-info with a `fedlora.methods` entry point), runs on every engine with DP, resume and export, unchanged."""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import pytest
import torch

import fedlora
from fedlora.algorithms import METHODS, Aggregation, ClientInfo, Reply, build, get_method
from fedlora.algorithms.registry import ENTRY_POINT_GROUP
from fedlora.api import resume_experiment, run_experiment
from fedlora.core.errors import ConfigError

from .conftest import tiny_config

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "fedavgm-lora"
PRIVATE = {"dp": "client_clipping", "clip_norm": 1.0, "noise_multiplier": 0.3}
UNIFORM = {"name": "fedavgm", "options": {"momentum": 0.5, "weighting": "uniform"}}  # client_clipping: uniform mean


@pytest.fixture
def installed_example(tmp_path, monkeypatch):
    """examples/fedavgm-lora as pip would install it: its source and a dist-info declaring the entry point, on the
    path of this process and of every process it starts (Ray's workers, Flower's nodes)."""
    site = tmp_path / "site"
    info = site / "fedavgm_lora-0.1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fedavgm-lora\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\nfedavgm = fedavgm_lora:METHOD\n")
    paths = [str(EXAMPLE / "src"), str(site)]
    for p in reversed(paths):
        monkeypatch.syspath_prepend(p)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([*paths, *filter(None, [os.environ.get("PYTHONPATH")])]))
    importlib.invalidate_caches()
    yield
    METHODS.pop("fedavgm", None)
    sys.modules.pop("fedavgm_lora", None)


def _config(tmp_path, name, **sections):
    sections.setdefault("federation", {"rounds": 3})
    sections.setdefault("algorithm", {"name": "fedavgm", "options": {"momentum": 0.5, "server_lr": 1.0}})
    return tiny_config(tmp_path, output_dir=str(tmp_path / name), **sections)


def test_an_installed_method_is_found_by_name_with_its_options(installed_example):
    method = get_method("fedavgm")
    assert method.server.__module__ == "fedavgm_lora" and set(method.options.model_fields) >= {"momentum", "server_lr"}
    assert "fedavgm" in fedlora.available_methods()
    with pytest.raises(ConfigError, match="momentum"):
        fedlora.run_experiment(_config(Path("/nonexistent"), "x",
                                       algorithm={"name": "fedavgm", "options": {"momentum": 2.0}}))


def test_register_method_refuses_what_is_not_a_method():
    with pytest.raises(ConfigError, match="subclass of fedlora's ServerAlgorithm"):
        fedlora.register_method("mine", object, object)
    with pytest.raises(ConfigError, match="registered already"):
        fedlora.register_method("fedit", METHODS["fedalt"].server, METHODS["fedalt"].client)
    with pytest.raises(ConfigError, match="plain name"):
        fedlora.register_method("my method", METHODS["fedit"].server, METHODS["fedit"].client)


def test_server_momentum_on_hand_made_tensors(installed_example, tiny_adapted):
    """momentum 0 / lr 1 is FedAvg (fedit) exactly; otherwise v = b v + (w - mean), w = w - lr v, round after round."""
    spec = tiny_adapted[0].spec
    clients = [ClientInfo("a", 1), ClientInfo("b", 3)]
    g = torch.Generator().manual_seed(0)
    replies = [{cid: Reply({"global": {k: torch.randn(v.shape, generator=g) for k, v in spec.init_lora(g).items()}}, 1)
                for cid in ("a", "b")} for _ in range(2)]
    plain, _ = build("fedavgm", {"momentum": 0.0, "server_lr": 1.0}, spec, 0, Aggregation())
    fedit, _ = build("fedit", {}, spec, 0, Aggregation())
    momentum, _ = build("fedavgm", {"momentum": 0.5, "server_lr": 0.8}, spec, 0, Aggregation())
    for server in (plain, fedit, momentum):
        server.setup(clients)
    w = {k: v.clone() for k, v in momentum.global_state.items()}
    v = {k: torch.zeros_like(t) for k, t in w.items()}
    for rnd, reply in enumerate(replies, 1):
        for server in (plain, fedit, momentum):
            server.aggregate(rnd, reply)
        for k in w:
            mean = (1 * reply["a"].states["global"][k] + 3 * reply["b"].states["global"][k]) / 4
            v[k] = 0.5 * v[k] + (w[k] - mean)
            w[k] = w[k] - 0.8 * v[k]
            torch.testing.assert_close(plain.global_state[k], fedit.global_state[k], rtol=0, atol=1e-6)
            torch.testing.assert_close(momentum.global_state[k], w[k], rtol=1e-5, atol=1e-6)


def test_an_outside_method_runs_with_dp_resumes_exactly_and_exports(installed_example, tmp_path):
    whole = run_experiment(_config(tmp_path, "whole", privacy=PRIVATE, algorithm=UNIFORM))
    assert [r["privacy"]["rounds"] for r in whole.rounds[1:]] == [1, 2, 3]
    run_experiment(_config(tmp_path, "stopped", privacy=PRIVATE, algorithm=UNIFORM, federation={"rounds": 2}))
    resumed = resume_experiment(tmp_path / "stopped", rounds=3)
    assert resumed.rounds[-1]["eval"] == whole.rounds[-1]["eval"]
    for name, state in whole.server_state["tensors"].items():
        for k, t in state.items():
            assert torch.equal(t, resumed.server_state["tensors"][name][k]), (name, k)
    cid = next(iter(whole.final))
    out = fedlora.export_client(tmp_path / "whole", cid, tmp_path / "export")
    model = fedlora.load_personalized(out)
    assert len(model.predict(["a short text", "another one"])) == 2


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["flower-sim", pytest.param("flower-local", marks=pytest.mark.skipif(
    not os.environ.get("FEDLORA_DEPLOYMENT_TESTS"),
    reason="set FEDLORA_DEPLOYMENT_TESTS=1 (3 minutes of real Flower processes; test_deployment runs flower-local)"))])
def test_an_outside_method_resumed_privately_on_flower_gives_the_in_process_numbers(installed_example, tmp_path,
                                                                                    engine):
    """Stopped after round 1 and resumed to 2 on a Flower engine, with DP: the uninterrupted in-process run's numbers."""
    whole = run_experiment(_config(tmp_path, "inproc", privacy=PRIVATE, algorithm=UNIFORM, federation={"rounds": 2}))
    run_experiment(_config(tmp_path, engine, privacy=PRIVATE, algorithm=UNIFORM, federation={"rounds": 1},
                           engine={"name": engine, "num_clients": 4, "progress": False}))
    resumed = resume_experiment(tmp_path / engine, rounds=2)
    assert [r["round"] for r in resumed.rounds] == [r["round"] for r in whole.rounds]
    # #37/#38: every engine writes the split at the top of its run directory
    assert (tmp_path / engine / "clients.json").read_text() == (tmp_path / "inproc" / "clients.json").read_text()
    for a, b in zip(whole.rounds, resumed.rounds):
        assert a.get("privacy") == b.get("privacy")
        for cid, metrics in a["eval"].items():
            assert b["eval"][cid] == pytest.approx(metrics, rel=1e-5, abs=1e-6)


def test_an_outside_method_runs_under_secure_aggregation_and_a_half_written_one_is_refused(installed_example, tmp_path):
    """The example implements aggregate_secure: its secure run takes the same momentum steps within the quantization
    error. A server that overrides aggregate but inherits aggregate_secure would skip its own step: refused."""
    plain = run_experiment(_config(tmp_path, "plain"))
    secure = run_experiment(_config(tmp_path, "secure", federation={"rounds": 3, "secure_aggregation": True}))
    for name in ("global", "velocity"):
        a, b = plain.server_state["tensors"][name], secure.server_state["tensors"][name]
        assert 0 < max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-3

    class Forgetful(METHODS["fedavgm"].server):
        def aggregate(self, rnd, replies):
            super().aggregate(rnd, replies)

    fedlora.register_method("forgetful", Forgetful, METHODS["fedavgm"].client, METHODS["fedavgm"].options)
    try:
        assert "overrides aggregate but takes aggregate_secure from FedAvgMServer" in get_method("forgetful").secure_problem
        with pytest.raises(ConfigError, match="cannot run 'forgetful'"):
            run_experiment(_config(tmp_path, "forgetful", algorithm={"name": "forgetful"},
                                   federation={"rounds": 1, "secure_aggregation": True}))
    finally:
        METHODS.pop("forgetful", None)
