"""Defences against poisoned updates: update clipping and robust aggregation, exact on hand-made tensors."""

from __future__ import annotations

import math

import pytest
import torch

from fedlora import run_experiment
from fedlora.adapters import AdapterSpec
from fedlora.algorithms import Aggregation, ClientInfo, Payload, Reply, build
from fedlora.core.config import FederationConfig
from fedlora.core.errors import ConfigError
from fedlora.core.seeding import generator
from fedlora.core.tensors import coordinate_median, norm, trimmed_mean
from fedlora.engines.clipping import clip_updates
from fedlora.engines.runtime import ClientRuntime

from .conftest import tiny_config

SPEC = AdapterSpec((("m", 3, 2),), r=2, alpha=4)


def full(a: float, b: float) -> dict[str, torch.Tensor]:
    return {"m.lora_A": torch.full((2, 3), a), "m.lora_B": torch.full((2, 2), b)}


def test_median_and_trimmed_mean_are_coordinate_wise():
    states = [full(1.0, 0.0), full(2.0, 10.0), full(3.0, 20.0), full(100.0, -1000.0)]
    torch.testing.assert_close(coordinate_median(states)["m.lora_A"], torch.full((2, 3), 2.5))
    torch.testing.assert_close(coordinate_median(states)["m.lora_B"], torch.full((2, 2), 5.0))
    trimmed = trimmed_mean(states, 0.25)  # drop one from each end, per element
    torch.testing.assert_close(trimmed["m.lora_A"], torch.full((2, 3), 2.5))
    torch.testing.assert_close(trimmed["m.lora_B"], torch.full((2, 2), 5.0))


def test_a_median_server_ignores_one_outlier_that_moves_the_mean():
    replies = {c: Reply({"global": full(v, v)}, 1) for c, v in zip("abcd", [1.0, 2.0, 3.0, 1e6])}
    for rule, expected in [("mean", (1 + 2 + 3 + 1e6) / 4), ("median", 2.5)]:
        server, _ = build("fedit", {"weighting": "uniform"}, SPEC, 0, Aggregation(rule))
        server.setup([ClientInfo(c, 1) for c in "abcd"])
        server.aggregate(1, replies)
        torch.testing.assert_close(server.global_state["m.lora_B"], torch.full((2, 2), expected))


def test_fedalt_rest_of_world_is_the_median_of_the_others():
    server, _ = build("fedalt", {}, SPEC, 0, Aggregation("median"))
    server.setup([ClientInfo(c, 1) for c in "abcd"])
    server.aggregate(1, {c: Reply({"individual": full(v, v)}, 1) for c, v in zip("abcd", [1.0, 2.0, 4.0, 1e6])})
    torch.testing.assert_close(server.rest_of_world("a")["m.lora_A"], torch.full((2, 3), 4.0))  # of 2, 4, 1e6
    torch.testing.assert_close(server.rest_of_world("d")["m.lora_A"], torch.full((2, 3), 2.0))  # of 1, 2, 4


def test_flora_refuses_a_robust_rule_it_cannot_apply():
    with pytest.raises(ConfigError, match="flora stacks"):
        build("flora", {}, SPEC, 0, Aggregation("median"))


def test_adaptive_clip_scales_an_outsized_update_to_the_bound_and_keeps_the_rest():
    server, _ = build("fedit", {}, SPEC, 0)
    start = full(1.0, 1.0)
    payloads = {c: Payload({"global": start}, expects=frozenset({"global"})) for c in "abcd"}
    # updates of norm 1 (A: 6 elements, B: 4 elements, so delta 1/sqrt(10) each) and one of norm 100
    step = 1 / math.sqrt(10)
    replies = {c: Reply({"global": full(1 + s, 1 + s)}, 1) for c, s in zip("abcd", [step, step, step, 100 * step])}
    out, clipped = clip_updates(server, payloads, replies, FederationConfig())  # adaptive, 3 x median = 3
    assert set(clipped) == {"d"} and clipped["d"]["global"] == pytest.approx(0.03)
    torch.testing.assert_close(out["d"].states["global"]["m.lora_A"], torch.full((2, 3), 1 + 3 * step))
    ten, _ = clip_updates(server, payloads, replies, FederationConfig(update_clip_factor=10))
    torch.testing.assert_close(ten["d"].states["global"]["m.lora_A"], torch.full((2, 3), 1 + 10 * step))
    assert all(out[c] is replies[c] for c in "abc")
    fixed, _ = clip_updates(server, payloads, replies, FederationConfig(update_clip=0.5))
    torch.testing.assert_close(fixed["a"].states["global"]["m.lora_B"], torch.full((2, 2), 1 + 0.5 * step))
    off, none = clip_updates(server, payloads, replies, FederationConfig(update_clip=None))
    assert off is replies and none == {}


def test_a_fresh_lora_is_clipped_as_an_update_of_the_shared_seeded_init_not_as_a_whole_state():
    # FedLEASE's warm-up LoRA: the server never sent it, but every client started it from the run's seeded init
    server, _ = build("fedlease", {"warmup_rounds": 1}, SPEC, 0)
    server.setup([ClientInfo(c, 1) for c in "abcd"])
    payloads = server.configure(1, list("abcd"))
    assert all(not p.states and p.expects == {"lora"} for p in payloads.values())
    init = SPEC.init_lora(generator(0, "lora-init"))
    step = full(0.01, 0.01)
    honest = {k: init[k] + step[k] for k in init}
    replies = {c: Reply({"lora": honest}, 1) for c in "abc"}
    replies["d"] = Reply({"lora": {k: 100 * v for k, v in honest.items()}}, 1)  # x100 the whole LoRA, A included
    out, clipped = clip_updates(server, payloads, replies, FederationConfig())
    assert set(clipped) == {"d"}
    sent = out["d"].states["lora"]
    assert norm({k: sent[k] - init[k] for k in init}) == pytest.approx(3 * norm(step), rel=1e-5)  # 3 x the median


def test_with_fewer_than_three_updates_the_adaptive_clip_does_nothing():
    server, _ = build("fedit", {}, SPEC, 0)
    payloads = {c: Payload({"global": full(0.0, 0.0)}) for c in "ab"}
    replies = {"a": Reply({"global": full(1.0, 1.0)}, 1), "b": Reply({"global": full(1e6, 1e6)}, 1)}
    assert clip_updates(server, payloads, replies, FederationConfig())[1] == {}


def poisoned(monkeypatch, victim: str, factor: float) -> None:
    """The victim's client multiplies its update (reply minus what it received) by `factor`."""
    original = ClientRuntime.fit

    def fit(self, cid, rnd, payload, state):
        reply, new_state = original(self, cid, rnd, payload, state)
        if cid == victim:
            reply.states = {n: {k: payload.states[n][k] + factor * (v - payload.states[n][k]) for k, v in s.items()}
                            for n, s in reply.states.items()}
        return reply, new_state

    monkeypatch.setattr(ClientRuntime, "fit", fit)


def global_norm(result) -> float:
    return norm(result.server_state["tensors"]["global"])


def test_a_1e6_update_poisons_fedit_only_without_the_default_clip(tmp_path, monkeypatch):
    clean = global_norm(run_experiment(tiny_config(tmp_path, output_dir=str(tmp_path / "clean"))))
    poisoned(monkeypatch, "noun_topic-0", 1e6)
    runs = {name: run_experiment(tiny_config(tmp_path, output_dir=str(tmp_path / name), federation=federation))
            for name, federation in [("off", {"update_clip": None}), ("default", {})]}
    assert global_norm(runs["off"]) > 1e4 * clean                  # the poisoned mean, checkpointed
    assert global_norm(runs["default"]) < 3 * clean                # clipped to 3 x the median update
    assert all("noun_topic-0" in r["clipped"] and len(r["clipped"]) == 1 for r in runs["default"].rounds[1:])


def test_round_timeout_has_a_default():
    assert FederationConfig().round_timeout == 3600.0


def test_an_in_process_evaluation_that_diverged_is_a_failure_not_a_nan_summary(tmp_path, monkeypatch):
    from fedlora.engines.runtime import Evaluation

    original = ClientRuntime.evaluate

    def diverged(self, cid, rnd, payload, state):
        got = original(self, cid, rnd, payload, state)
        return Evaluation({**got.metrics, "loss": float("nan")}, got.diagnostics) if cid == "verb_class-1" else got

    monkeypatch.setattr(ClientRuntime, "evaluate", diverged)
    result = run_experiment(tiny_config(tmp_path, federation={"rounds": 1}))
    last = result.rounds[-1]
    assert "loss" in last["eval_failures"]["verb_class-1"] and "verb_class-1" not in last["eval"]
    assert math.isfinite(result.final_mean["loss"])
    assert "NaN" not in (tmp_path / "run" / "metrics.jsonl").read_text()
