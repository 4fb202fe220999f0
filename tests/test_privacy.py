"""Differential privacy: clipping bounds, noise scale, the accountant, budgets, and the same numbers everywhere."""

from __future__ import annotations

import json
import math

import dp_accounting
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedlora.api import resume_experiment, run_experiment
from fedlora.core import dp
from fedlora.core.config import build_config
from fedlora.core.errors import ConfigError
from fedlora.engines.privacy import PrivacyBudgetSpent, check_privacy

from .conftest import tiny_config

SMALL = dict(federation={"rounds": 3})


def _noisy(tmp_path, method="fedit", name="run", options=None, **privacy):
    return tiny_config(tmp_path, output_dir=str(tmp_path / name), algorithm={"name": method, "options": options or {}},
                       privacy={"dp": "client_clipping", "clip_norm": 0.5, "noise_multiplier": 1.0, **privacy}, **SMALL)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-100, 100), min_size=1, max_size=12), st.lists(st.floats(-100, 100), min_size=1,
       max_size=12), st.floats(1e-3, 50), st.booleans())
def test_clipping_bounds_the_joint_update_and_keeps_small_ones(a, b, bound, with_start):
    states = {"x": {"w": torch.tensor(a)}, "y": {"v": torch.tensor(b)}}
    starts = {"x": {"w": torch.ones(len(a))} if with_start else None, "y": None}
    clipped, factor = dp.clip_uploads(states, starts, bound)
    size = dp.update_norm(states, starts)
    assert dp.update_norm(clipped, starts) <= bound * (1 + 1e-5) + 1e-6
    if size <= bound:
        assert factor == 1.0 and clipped is states
    else:  # scaled along the update, not towards zero
        assert factor == pytest.approx(bound / size, rel=1e-6)
        if with_start:
            moved = clipped["x"]["w"].double() - 1
            assert torch.allclose(moved, factor * (torch.tensor(a).double() - 1), rtol=1e-4, atol=1e-5)


def test_sum_noise_has_the_mechanisms_scale_and_is_reproducible():
    noise = dp.SumNoise(std=2.0, seed=3)
    mean = {"w": torch.zeros(200_000)}
    noise.start_round(5)
    drawn = noise.noised_mean(mean, 4, "a", "b")["w"]
    assert drawn.std().item() == pytest.approx(2.0 / 4, rel=0.01)  # the sum's noise, divided by n
    assert drawn.mean().abs().item() < 0.005
    assert torch.equal(drawn, noise.noised_mean(mean, 4, "a", "b")["w"])  # same round and members: same draw
    noise.start_round(6)
    assert not torch.equal(drawn, noise.noised_mean(mean, 4, "a", "b")["w"])  # never reused across rounds


def test_secure_noise_comes_from_the_os_with_the_same_scale_and_seeded_noise_repeats():
    state = {"w": torch.zeros(200_000)}
    seeded, secure = dp.NoiseSource(7), dp.NoiseSource(7, secure=True)
    assert torch.equal(seeded.add_noise(state, 2.0, "x")["w"], seeded.add_noise(state, 2.0, "x")["w"])
    a, b = secure.add_noise(state, 2.0, "x")["w"], secure.add_noise(state, 2.0, "x")["w"]
    assert not torch.equal(a, b)  # nobody, the run's seed included, can draw it again
    assert a.std().item() == pytest.approx(2.0, rel=0.01) and a.mean().abs().item() < 0.02
    assert ((a / a.std()) ** 4).mean().item() == pytest.approx(3.0, abs=0.1)  # Gaussian: (4 normals) / 2 is one


def test_secure_noise_makes_a_private_run_unrepeatable_and_an_app_for_other_machines_turns_it_on(tmp_path):
    from fedlora.flower.app import write_app

    def run(name, **privacy):
        result = run_experiment(_noisy(tmp_path, name=name, dp="local", **privacy) | {"federation": {"rounds": 1}})
        return result.server_state["tensors"]["global"]

    first, second = run("a", secure_noise=True), run("b", secure_noise=True)
    assert any(not torch.equal(first[k], second[k]) for k in first)
    seeded = [run(n) for n in ("c", "d")]
    assert all(torch.equal(seeded[0][k], seeded[1][k]) for k in first)
    cfg = build_config(_noisy(tmp_path))
    remote = (write_app(tmp_path / "remote", cfg) / "pyproject.toml").read_text()
    local = (write_app(tmp_path / "local", cfg, local=True) / "pyproject.toml").read_text()
    assert "secure_noise = true" in remote and "secure_noise" not in local
    chosen = (write_app(tmp_path / "chosen", build_config(_noisy(tmp_path, secure_noise=False))) / "pyproject.toml")
    assert "secure_noise = false" in chosen.read_text()


def test_a_resumed_local_dp_run_with_os_noise_counts_the_interrupted_round_once_more(tmp_path):
    from fedlora.engines.privacy import PrivacyLedger

    records = [{"round": 2, "privacy": {"rounds": 2, "plain_rounds": 0}}]
    for secure, expected in ((False, 2), (True, 3)):  # seeded: a re-run draws the same noise, nothing more leaks
        ledger = PrivacyLedger(build_config(_noisy(tmp_path, dp="local", secure_noise=secure)), 4)
        ledger.restore(records)
        assert ledger.rounds == expected


def test_server_mean_under_dp_is_uniform_and_noised_as_the_sum():
    from fedlora.algorithms.base import AveragingOptions, ClientInfo, ServerAlgorithm

    server = ServerAlgorithm(AveragingOptions(), spec=None, seed=0)
    server.setup([ClientInfo("a", 1), ClientInfo("b", 99)])
    states = {"a": {"w": torch.full((50_000,), 1.0)}, "b": {"w": torch.full((50_000,), 3.0)}}
    assert server.client_mean(states)["w"][0].item() == pytest.approx(2.98)  # example-weighted without DP
    server.noise = dp.SumNoise(std=0.0, seed=0)
    assert torch.equal(server.client_mean(states)["w"], torch.full((50_000,), 2.0))  # uniform, noise 0: exact
    server.noise = dp.SumNoise(std=1.0, seed=0)
    server.noise.start_round(1)
    assert (server.client_mean(states)["w"] - 2.0).std().item() == pytest.approx(0.5, rel=0.02)
    server.noise, server.uniform_weights = None, True  # local DP shared out under secure aggregation
    assert torch.equal(server.client_mean(states)["w"], torch.full((50_000,), 2.0))


@pytest.mark.parametrize("rate,rounds", [(1.0, 5), (0.25, 20)])
def test_accountant_equals_the_library(rate, rounds):
    accountant = dp_accounting.rdp.RdpAccountant()
    event = dp_accounting.GaussianDpEvent(1.3)
    accountant.compose(dp_accounting.PoissonSampledDpEvent(rate, event) if rate < 1 else event, rounds)
    assert dp.epsilon(1.3, rate, 1e-5, rounds) == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-12)
    assert dp.epsilon(1.3, rate, 1e-5, rounds, amplified=False) >= dp.epsilon(1.3, rate, 1e-5, rounds)


def test_calibrated_noise_spends_the_target():
    z = dp.calibrate_noise(4.0, 0.5, 1e-5, 10)
    assert dp.epsilon(z, 0.5, 1e-5, 10) == pytest.approx(4.0, rel=0.01)
    assert dp.epsilon(z, 0.5, 1e-5, 10) <= 4.0 + 1e-6


def test_noise_zero_and_a_large_clip_equal_the_plain_run(tmp_path):
    plain = run_experiment(tiny_config(tmp_path, output_dir=str(tmp_path / "plain"),
                                       algorithm={"name": "fedalt"}, **SMALL))
    private = run_experiment(_noisy(tmp_path, "fedalt", clip_norm=1e9, noise_multiplier=0.0))
    for cid, state in plain.client_states.items():
        for name, tensors in state.states.items():
            assert all(torch.equal(v, private.client_states[cid].states[name][k]) for k, v in tensors.items())
    assert [r["summary"] for r in plain.rounds] == [r["summary"] for r in private.rounds]
    assert private.rounds[-1]["privacy"]["epsilon"] is None  # no noise: no guarantee, said as null


def test_every_upload_is_clipped_against_where_it_started(tmp_path, monkeypatch):
    from fedlora.algorithms.fedit import FedITServer

    seen = []
    original = FedITServer.aggregate

    def spy(self, rnd, replies):
        seen.extend(dp.update_norm({"g": r.states["global"]}, {"g": self.global_state}) for r in replies.values())
        return original(self, rnd, replies)

    monkeypatch.setattr(FedITServer, "aggregate", spy)
    result = run_experiment(_noisy(tmp_path, clip_norm=0.01))
    assert len(seen) == 12 and max(seen) <= 0.01 * (1 + 1e-4)
    assert not any("clipped" in r for r in result.rounds)  # the adaptive server clip stays out of DP's way
    assert all(f["dp_clip_factor"] < 1 for f in result.rounds[1]["fit"].values())  # a real bound at 0.01


def test_epsilon_is_recorded_every_round_and_grows(tmp_path):
    result = run_experiment(_noisy(tmp_path, "fedlease", options={"warmup_rounds": 1}))
    eps = [r["privacy"]["epsilon"] for r in result.rounds[1:]]
    assert eps == sorted(eps) and eps[0] > 0
    assert eps[-1] == pytest.approx(dp.epsilon(1.0, 1.0, 1e-5, 3, plain_rounds=1), rel=1e-9)
    assert result.rounds[1]["privacy"]["plain_rounds"] == 1  # the clustering upload, released one by one


def test_local_dp_noises_uploads_and_keeps_metrics_home(tmp_path):
    result = run_experiment(_noisy(tmp_path, dp="local", noise_multiplier=2.0))
    assert set(result.rounds[1]["fit"]["noun_topic-0"]) == {"num_examples", "bytes_down", "bytes_up"}
    assert result.rounds[-1]["privacy"]["epsilon"] == pytest.approx(dp.epsilon(2.0, 1.0, 1e-5, 3), rel=1e-9)


def test_max_epsilon_stops_cleanly_and_refuses_to_resume(tmp_path):
    cfg = _noisy(tmp_path, "fedalt", max_epsilon=dp.epsilon(1.0, 1.0, 1e-5, 2) * 1.01)
    cfg["federation"] = {"rounds": 4, "eval_every": 3}
    result = run_experiment(cfg)
    assert [r["round"] for r in result.rounds] == [0, 1, 2]
    assert "eval" in result.rounds[-1]  # the last round the budget allowed is evaluated and checkpointed
    assert json.loads((tmp_path / "run" / "checkpoint" / "latest.json").read_text())["round"] == 2
    with pytest.raises(PrivacyBudgetSpent, match="max_epsilon"):
        resume_experiment(tmp_path / "run")


def test_resumed_private_run_equals_the_uninterrupted_one(tmp_path):
    whole = run_experiment(_noisy(tmp_path, "fedalt", name="whole"))
    cfg = _noisy(tmp_path, "fedalt", name="cut")
    cfg["federation"] = {"rounds": 2}
    run_experiment(cfg)
    resumed = resume_experiment(tmp_path / "cut", rounds=3)
    for cid, state in whole.client_states.items():
        for name, tensors in state.states.items():
            assert all(torch.equal(v, resumed.client_states[cid].states[name][k]) for k, v in tensors.items()), name
    assert whole.rounds[-1]["privacy"] == resumed.rounds[-1]["privacy"]


def test_flower_engine_gives_the_in_process_numbers(tmp_path, monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    from fedlora.flower.client_app import make_client_app
    from fedlora.flower.server_app import server_main

    from .test_flower import FakeGrid

    inproc = run_experiment(_noisy(tmp_path, "fedalt", name="inproc"))
    cfg = build_config({**_noisy(tmp_path, "fedalt", name="flower"),
                        "engine": {"name": "flower-sim", "num_clients": 4, "progress": False}})
    for attr in ("_run_id", "_task_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1, raising=False)
    server_main(cfg, FakeGrid(make_client_app(cfg), 4))
    records = [json.loads(line) for line in (tmp_path / "flower" / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(inproc.rounds[1:], records[1:]):
        assert a["privacy"] == b["privacy"]
        for cid, metrics in a["eval"].items():
            assert b["eval"][cid] == pytest.approx(metrics, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("method,mode,needle", [("ifca", "client_clipping", "cluster"), ("ifca", "local", "cluster"),
                                                ("flora", "client_clipping", "local"),
                                                ("hetlora", "client_clipping", "local"),
                                                ("fedex", "client_clipping", "unnoised"),
                                                ("flexlora", "client_clipping", "local")])
def test_methods_dp_cannot_cover_are_refused_with_a_reason(tmp_path, method, mode, needle):
    cfg = build_config(_noisy(tmp_path, method, dp=mode))
    with pytest.raises(ConfigError, match=needle):
        check_privacy(cfg)


def test_example_weights_and_robust_rules_are_refused_under_central_dp(tmp_path):
    with pytest.raises(ConfigError, match="uniform weights"):
        check_privacy(build_config(_noisy(tmp_path, options={"weighting": "examples"})))
    secure = _noisy(tmp_path, dp="local", options={"weighting": "examples"})
    check_privacy(build_config(secure))  # each upload carries the whole noise: weights are post-processing
    secure["federation"]["secure_aggregation"] = True
    with pytest.raises(ConfigError, match="splits the noise evenly"):  # but a weighted sum of shares is less
        check_privacy(build_config(secure))
    cfg = _noisy(tmp_path)
    cfg["federation"]["aggregation"] = "median"
    with pytest.raises(ConfigError, match="aggregation"):
        check_privacy(build_config(cfg))
    with pytest.raises(ConfigError, match="exactly one of noise_multiplier"):
        build_config(_noisy(tmp_path, target_epsilon=4.0))


def test_hetlora_under_local_dp_runs_with_heterogeneous_ranks(tmp_path):
    cfg = _noisy(tmp_path, "hetlora", dp="local")
    cfg["clients"] = {"lora_r": [4, 2, 4, 2]}
    result = run_experiment(cfg)
    assert math.isfinite(result.rounds[-1]["summary"]["mean"]["accuracy"])


def test_a_budget_smaller_than_one_round_is_an_error_after_round_0_is_written(tmp_path):
    """#38: the error was clear, but round 0 was evaluated and not written, so `report` said the run held none."""
    from fedlora.cli import main

    cfg = _noisy(tmp_path, "fedalt", max_epsilon=dp.epsilon(1.0, 1.0, 1e-5, 1) * 0.5)
    with pytest.raises(PrivacyBudgetSpent, match="round 1 would spend"):
        run_experiment(cfg)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [0]
    assert main(["report", str(tmp_path / "run")]) == 0
