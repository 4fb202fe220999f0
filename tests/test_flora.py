"""FLoRA: exact stacking with heterogeneous ranks, pending stacks per client, merging into the base."""

from __future__ import annotations

import pytest
import torch

from fedlora import run_experiment
from fedlora.adapters import AdapterSpec
from fedlora.algorithms import ClientInfo, Reply, build
from fedlora.algorithms.flora import stack, stack_delta
from fedlora.core.errors import ConfigError

from .conftest import tiny_config
from .test_methods_e2e import HEAD, PATHS, spy  # noqa: F401  (fixture)

SPEC = AdapterSpec((("m", 5, 4),), r=4, alpha=8)


def random_lora(r: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"m.lora_A": torch.randn(r, 5, generator=g), "m.lora_B": torch.randn(4, r, generator=g)}


def test_stacked_product_is_the_weighted_sum_of_products_with_different_ranks():
    loras, weights = [random_lora(2, 0), random_lora(4, 1), random_lora(1, 2)], [1.0, 3.0, 4.0]
    stacked = stack(loras, weights, alpha=8)
    assert stacked["m.lora_A"].shape == (7, 5) and stacked["m.lora_B"].shape == (4, 7)
    expected = sum(w / 8 * (8 / lo["m.lora_A"].shape[0]) * lo["m.lora_B"] @ lo["m.lora_A"] for lo, w in zip(loras, weights))
    torch.testing.assert_close(stack_delta(stacked)["m"], expected)


def test_server_sends_each_client_the_stacks_it_has_not_merged():
    server, _ = build("flora", {"weighting": "uniform"}, SPEC, seed=0)
    server.setup([ClientInfo(c, 1) for c in "abc"])
    ranks = {"a": 2, "b": 4, "c": 1}  # clients.lora_r: the server takes each reply's rank as it comes
    first = server.configure(1, list("abc"))
    assert all(p.states == {} and p.expects == {"lora"} for p in first.values())
    server.aggregate(1, {"a": Reply({"lora": random_lora(2, 0)}, 1), "b": Reply({"lora": random_lora(4, 1)}, 1)})
    server.aggregate(2, {"a": Reply({"lora": random_lora(2, 2)}, 1)})  # b and c missed round 2
    p = server.configure(3, list("abc"))
    assert set(p["a"].states) == {"stack_2"}              # a merged stack_1 when it trained in round 2
    assert set(p["b"].states) == {"stack_1", "stack_2"}   # b missed round 2, so it never received stack_1
    assert set(p["c"].states) == {"stack_1", "stack_2"}
    assert p["a"].states["stack_2"]["m.lora_A"].shape == (2, 5)
    server.aggregate(3, {c: Reply({"lora": random_lora(ranks[c], 9)}, 1) for c in "abc"})
    assert set(server.stacks) == {3}                 # everyone has merged 1 and 2: they are dropped


def test_the_old_ranks_option_is_refused_in_favour_of_clients_lora_r():
    with pytest.raises(ConfigError, match="invalid algorithm.options for 'flora'.*ranks"):
        build("flora", {"ranks": [2, 4]}, SPEC, seed=0)


def test_base_delta_is_undone_exactly_even_on_error(tiny_adapted):
    adapted, _ = tiny_adapted
    path = next(iter(adapted.layers))
    before = adapted.layers[path].base.weight.detach().clone()
    delta = {path: torch.randn_like(before) * 1e-3}
    with adapted.base_delta(delta):
        torch.testing.assert_close(adapted.layers[path].base.weight, before + delta[path])
    with pytest.raises(RuntimeError), adapted.base_delta(delta):
        raise RuntimeError("client crashed")
    assert torch.equal(adapted.layers[path].base.weight, before)


def test_flora_end_to_end_with_heterogeneous_ranks(tmp_path, spy):  # noqa: F811
    ranks = [2, 4, 8, 4]
    result = run_experiment(tiny_config(tmp_path, federation={"rounds": 3}, algorithm={"name": "flora"},
                                        clients={"lora_r": ranks}))
    ids = list(result.client_states)
    per_rank = len(PATHS) * (32 + 32) * 4  # bytes per unit of rank over all modules, fp32
    for r in spy:
        rank = ranks[ids.index(r["client"])]
        assert r["trainable"] == {f"{p}.lora_{ab}.0" for p in PATHS for ab in "AB"} | HEAD
        assert r["sent"] == {"lora"} and r["up"] == rank * per_rank
        assert r["received"] == ({f"stack_{r['round'] - 1}"} if r["round"] > 1 else set())
        assert r["down"] == (sum(ranks) * per_rank if r["round"] > 1 else 0)
    merged = [result.client_states[c].states["merged"] for c in ids]
    assert all(torch.allclose(m[p], merged[0][p]) for m in merged for p in PATHS)  # one global model
