"""Every personalized method end to end on a tiny random model: exact trainable sets, what is sent and
received, bytes equal to the analytic counts of spec section 6, and a real-model run (slow)."""

from __future__ import annotations

import pytest

from fedlora import run_experiment
from fedlora.engines.runtime import ClientRuntime
from fedlora.training import Trainer

from .conftest import tiny_config

PATHS = [f"bert.encoder.layer.{i}.attention.self.{m}" for i in range(2) for m in ("query", "value")]
HEAD = {"classifier.weight", "classifier.bias"}
R, HIDDEN = 4, 32
LORA_BYTES = len(PATHS) * R * (HIDDEN + HIDDEN) * 4          # one expert, fp32


def expert(e: int) -> set[str]:
    return {f"{p}.lora_{ab}.{e}" for p in PATHS for ab in "AB"}


ROUTER = {f"{p}.router.weight" for p in PATHS}


def router_bytes(slots: int) -> int:
    return len(PATHS) * slots * HIDDEN * 4


@pytest.fixture
def spy(monkeypatch):
    """Record, per local round: trainable names, payload state names, reply state names, and bytes."""
    rounds: list[dict] = []
    original_fit, original_train = ClientRuntime.fit, Trainer.train

    def fit(self, cid, rnd, payload, state):
        reply, new_state = original_fit(self, cid, rnd, payload, state)
        rounds.append({"round": rnd, "client": cid, "received": set(payload.states), "sent": set(reply.states),
                       "down": payload.num_bytes, "up": reply.num_bytes, "trainable": self.adapted.last_trainable_seen})
        return reply, new_state

    def train(self, *args, **kwargs):
        out = original_train(self, *args, **kwargs)
        self.adapted.last_trainable_seen = set(self.last_trainable)
        return out

    monkeypatch.setattr(ClientRuntime, "fit", fit)
    monkeypatch.setattr(Trainer, "train", train)
    return rounds


def run(tmp_path, method, rounds=3, **options):
    cfg = tiny_config(tmp_path, federation={"rounds": rounds}, algorithm={"name": method, "options": options})
    return run_experiment(cfg)


def test_fedalt_trains_individual_and_gate_sends_individual_receives_row(tmp_path, spy):
    result = run(tmp_path, "fedalt")
    assert all(r["trainable"] == expert(1) | ROUTER | HEAD for r in spy)
    assert all(r["sent"] == {"individual"} and r["up"] == LORA_BYTES for r in spy)
    assert all(r["received"] == set() and r["down"] == 0 for r in spy if r["round"] == 1)
    assert all(r["received"] == {"row"} and r["down"] == LORA_BYTES for r in spy if r["round"] > 1)
    gates = result.final_diagnostics["noun_topic-0"]
    assert 0 < gates["gate_individual"] < 1 and set(gates["gate_individual_by_module"]) == set(PATHS)
    assert "gate_individual" not in result.final["noun_topic-0"] and "gate_individual" not in result.final_mean
    states = result.client_states["noun_topic-0"].states
    assert set(states) == {"individual", "row", "gate", "_head"}


def test_fedlease_warmup_then_clustered(tmp_path, spy):
    result = run(tmp_path, "fedlease", rounds=4, warmup_rounds=2)
    warm = [r for r in spy if r["round"] <= 2]
    clustered = [r for r in spy if r["round"] > 2]
    assert all(r["trainable"] == expert(0) | HEAD for r in warm)
    assert [r["sent"] for r in warm if r["round"] == 1] == [set()] * 4
    assert all(r["sent"] == {"lora"} and r["up"] == LORA_BYTES for r in warm if r["round"] == 2)
    m = result.rounds[-1]["server"]["n_experts"]
    assignment = result.rounds[-1]["server"]["assignment"]
    for r in clustered:
        j = assignment[r["client"]]
        assert r["trainable"] == expert(j) | ROUTER | HEAD
        assert r["sent"] == {"expert", "router"} and r["up"] == LORA_BYTES + router_bytes(2 * m - 1)
        assert r["received"] == {f"expert_{e}" for e in range(m)} | {"router"}
        assert r["down"] == m * LORA_BYTES + router_bytes(2 * m - 1)


def test_fdlora_personal_never_leaves_after_stage1(tmp_path, spy):
    result = run(tmp_path, "fdlora", rounds=3, fusion_examples=8, fusion_budget=6, sync_every=1)
    assert all(r["trainable"] == expert(0) | HEAD for r in spy)
    assert all(r["sent"] == {"stage1"} and r["down"] == 0 for r in spy if r["round"] == 1)
    assert all(r["sent"] == {"global"} and r["received"] == {"global"} and r["up"] == r["down"] == LORA_BYTES
               for r in spy if r["round"] > 1)
    final = result.final_diagnostics["verb_class-1"]
    assert {"fusion_w_global", "fusion_w_personal"} <= set(final)
    assert all(-1.5 <= final[k] <= 1.5 for k in ("fusion_w_global", "fusion_w_personal"))
    clients = result.client_states
    assert all(set(s.states) == {"personal", "_head"} for s in clients.values())


def test_fdlora_holds_out_few_shot_examples_from_training(tmp_path):
    result = run(tmp_path, "fdlora", rounds=1, fusion_examples=8, fusion_budget=2)
    full = tiny_config(tmp_path)["data"]["train_per_client"]
    assert all(r["num_examples"] == full - 8 for r in result.rounds[1]["fit"].values())


@pytest.mark.slow
@pytest.mark.parametrize("method,options", [("fedalt", {}), ("fedlease", {"warmup_rounds": 2}),
                                            ("fdlora", {"fusion_budget": 10})])
def test_real_minilm_improves_on_the_untrained_start(tmp_path, method, options):
    cfg = tiny_config(tmp_path, model={"name": "minilm"}, lora={"r": 8, "alpha": 16, "dropout": 0.05},
                      data={"train_per_client": 96, "test_per_client": 40, "max_length": 32},
                      training={"lr": 2e-3, "local_steps": 8, "batch_size": 16},
                      federation={"rounds": 4}, algorithm={"name": method, "options": options})
    result = run_experiment(cfg)
    start = result.evaluations()[0]["summary"]["mean"]["accuracy"]
    assert result.final_mean["accuracy"] > start + 0.15


def test_ffa_trains_b_only_and_moves_b_only(tmp_path, spy):
    run(tmp_path, "ffa", rounds=2)
    b_only = {f"{p}.lora_B.0" for p in PATHS}
    assert all(r["trainable"] == b_only | HEAD for r in spy)
    assert all(r["sent"] == {"b"} and r["received"] == {"b"} and r["up"] == r["down"] == LORA_BYTES // 2 for r in spy)


def test_fedsa_trains_a_and_b_but_sends_a(tmp_path, spy):
    result = run(tmp_path, "fedsa", rounds=2)
    assert all(r["trainable"] == expert(0) | HEAD for r in spy)
    assert all(r["sent"] == {"a"} and r["received"] == {"a"} and r["up"] == r["down"] == LORA_BYTES // 2 for r in spy)
    assert set(result.client_states["noun_topic-0"].states) == {"b", "_head"}


def test_ifca_downloads_all_clusters_uploads_one(tmp_path, spy):
    result = run(tmp_path, "ifca", rounds=2, clusters=2)
    assert all(r["trainable"] == expert(0) | HEAD for r in spy)
    assert all(r["received"] == {"cluster_0", "cluster_1"} and r["down"] == 2 * LORA_BYTES for r in spy)
    assert all(r["sent"] == {"lora"} and r["up"] == LORA_BYTES for r in spy)
    assert all(d["cluster"] in (0, 1) for d in result.final_diagnostics.values())
    assert "cluster" not in result.final_mean  # a cluster id is a diagnostic, never averaged into the metrics


def test_fdlora_with_a_local_personal_lora_and_no_stage_1_still_trains_one(tmp_path):
    result = run(tmp_path, "fdlora", rounds=2, stage1_rounds=0, personal="local", fusion_examples=8, fusion_budget=4)
    assert all("personal" in s.states for s in result.client_states.values())
    fits = [f for r in result.rounds for f in r.get("fit", {}).values()]
    assert fits and all("personal_train_loss" in f for f in fits)
