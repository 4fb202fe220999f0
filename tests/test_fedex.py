"""FedEx-LoRA: the residual makes the aggregation exact; residuals pending per client; merged into the base."""

from __future__ import annotations

import pytest
import torch

from fedlora import run_experiment
from fedlora.adapters import AdapterSpec
from fedlora.algorithms import Aggregation, ClientInfo, ClientState, Reply, build, get_method
from fedlora.algorithms.flora import stack_delta
from fedlora.core.errors import ConfigError

from .conftest import tiny_config
from .test_methods_e2e import HEAD, PATHS, spy  # noqa: F401  (fixture)

SPEC = AdapterSpec((("m", 5, 4),), r=2, alpha=8)  # s = alpha / r = 4
S = 4.0


def random_lora(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"m.lora_A": torch.randn(2, 5, generator=g, dtype=torch.float64),
            "m.lora_B": torch.randn(4, 2, generator=g, dtype=torch.float64)}


def product(lora: dict[str, torch.Tensor]) -> torch.Tensor:
    return S * lora["m.lora_B"] @ lora["m.lora_A"]


def fedex_server(options: dict | None = None, sizes=(1, 2, 5)):
    server, client = build("fedex", options or {}, SPEC, seed=0)
    server.setup([ClientInfo(c, n) for c, n in zip("abc", sizes)])
    return server, client


@pytest.mark.parametrize("options,weights", [({}, [1 / 3] * 3), ({"weighting": "examples"}, [1 / 8, 2 / 8, 5 / 8])])
def test_the_residual_makes_every_effective_weight_the_mean_of_the_full_updates_exactly(options, weights):
    server, _ = fedex_server(options)
    loras = {c: random_lora(i) for i, c in enumerate("abc")}
    server.aggregate(1, {c: Reply({"global": lo}, n) for (c, lo), n in zip(loras.items(), (1, 2, 5))})
    mean = server.global_lora
    torch.testing.assert_close(mean["m.lora_A"], sum(w * lo["m.lora_A"] for w, lo in zip(weights, loras.values())))
    effective = stack_delta(server.stacks[1])["m"] + product(mean)  # W0 + s R + s B A, with W0 = 0
    torch.testing.assert_close(effective, sum(w * product(lo) for w, lo in zip(weights, loras.values())))
    assert not torch.allclose(product(mean), effective)  # FedIT's mean alone is not the mean of the updates


def test_a_client_merges_every_residual_it_missed_once_and_ends_on_the_federation_s_model():
    server, client = fedex_server()
    round1 = {c: random_lora(i) for i, c in enumerate("abc")}
    server.aggregate(1, {c: Reply({"global": lo}, 1) for c, lo in round1.items()})
    base1 = stack_delta(server.stacks[1])["m"]
    round2 = {c: random_lora(10 + i) for i, c in enumerate("ab")}  # c is silent in round 2
    server.aggregate(2, {c: Reply({"global": lo}, 1) for c, lo in round2.items()})
    payload = server.configure_evaluate(2, ["c"])["c"]
    assert set(payload.states) == {"global", "stack_1", "stack_2"}
    state = ClientState()
    state.states["merged"] = client._merged(payload, state, record=True)  # as fit keeps it
    merged = state.states["merged"]["m"]
    # round 2's clients trained on W0 + R_1: the federation's model is now W0 + R_1 + the mean of round 2's updates
    torch.testing.assert_close(merged + product(server.global_lora), base1 + sum(product(lo) for lo in round2.values()) / 2)
    assert state.meta["merged_stacks"] == ["stack_1", "stack_2"]
    torch.testing.assert_close(client._merged(payload, state)["m"], merged)  # merged once, whatever is re-sent
    server.aggregate(3, {c: Reply({"global": random_lora(20 + i)}, 1) for i, c in enumerate("abc")})
    assert set(server.stacks) == {3}  # everyone merged 1 and 2


def test_what_fedex_cannot_honour_is_refused_before_any_work():
    with pytest.raises(ConfigError, match="fedex makes the mean.*'median'"):
        build("fedex", {}, SPEC, 0, Aggregation("median"))
    method = get_method("fedex")
    assert "client_clipping" in method.server.dp_refusals and not method.server.heterogeneous_ranks
    _, client = build("fedex", {}, SPEC, 0)
    assert "lora.r=2" in client.rank_problem({"a": 2, "b": 4})


def test_fedex_end_to_end_trains_the_global_lora_on_the_merged_base(tmp_path, spy):  # noqa: F811
    result = run_experiment(tiny_config(tmp_path, federation={"rounds": 3}, algorithm={"name": "fedex"}))
    for r in spy:
        assert r["trainable"] == {f"{p}.lora_{ab}.0" for p in PATHS for ab in "AB"} | HEAD
        assert r["sent"] == {"global"}
        assert r["received"] == {"global"} | ({f"stack_{r['round'] - 1}"} if r["round"] > 1 else set())
    merged = [s.states["merged"] for s in result.client_states.values()]
    assert all(torch.allclose(m[p], merged[0][p]) for m in merged for p in PATHS)  # one federation model
    assert any(float(merged[0][p].abs().max()) > 0 for p in PATHS)
