"""FlexLoRA: the global LoRA is the SVD truncation of the mean of the clients' full updates, per client rank."""

from __future__ import annotations

import pytest
import torch

from fedlora import run_experiment
from fedlora.adapters import AdapterSpec
from fedlora.algorithms import Aggregation, ClientInfo, Reply, build, get_method
from fedlora.algorithms.flexlora import truncated_svd
from fedlora.algorithms.hetlora import resize
from fedlora.core.errors import ConfigError

from .conftest import tiny_config

SPEC = AdapterSpec((("m", 7, 6),), r=4, alpha=8)


def random_lora(r: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"m.lora_A": torch.randn(r, 7, generator=g, dtype=torch.float64),
            "m.lora_B": torch.randn(6, r, generator=g, dtype=torch.float64)}


def update(lora: dict[str, torch.Tensor]) -> torch.Tensor:
    """(alpha / r) B A at the LoRA's own rank."""
    return 8 / lora["m.lora_A"].shape[0] * lora["m.lora_B"] @ lora["m.lora_A"]


def best(w: torch.Tensor, r: int) -> torch.Tensor:
    """The best rank-r approximation of w (Eckart-Young), from a dense SVD."""
    u, s, vh = torch.linalg.svd(w)
    return u[:, :r] @ torch.diag(s[:r]) @ vh[:r]


def flex_server(sizes):
    server, client = build("flexlora", {}, SPEC, seed=0)
    server.setup([ClientInfo(c, n) for c, n in sizes.items()])
    return server, client


def test_each_client_receives_the_rank_r_k_truncation_of_the_weighted_mean_update():
    sizes, ranks = {"a": 1, "b": 3, "c": 4}, {"a": 2, "b": 4, "c": 1}
    server, _ = flex_server(sizes)
    loras = {c: random_lora(ranks[c], i) for i, c in enumerate("abc")}
    server.aggregate(1, {c: Reply({"global": lo}, sizes[c]) for c, lo in loras.items()})
    mean = sum(sizes[c] / 8 * update(lo) for c, lo in loras.items())  # example weights, each at its own scale
    torch.testing.assert_close(update(server.global_state), best(mean, 4))
    assert torch.allclose(server.global_state["m.lora_A"] @ server.global_state["m.lora_A"].T, torch.eye(4,
                          dtype=torch.float64))  # A has orthonormal rows: every singular value is in B
    for cid, payload in server.configure(2, list("abc")).items():
        assert payload.states["global"]["m.lora_A"].shape[0] == ranks[cid]
        torch.testing.assert_close(update(payload.states["global"]), best(mean, ranks[cid]))


def test_one_client_at_full_rank_gets_its_own_update_back_as_fedit_would():
    server, _ = flex_server({"a": 5})
    lora = random_lora(4, 0)
    server.aggregate(1, {"a": Reply({"global": lora}, 5)})
    torch.testing.assert_close(update(server.global_state), update(lora))


def test_the_factored_svd_pads_what_the_update_lacks_and_matches_resize():
    b, a = torch.randn(6, 2, dtype=torch.float64), torch.randn(2, 7, dtype=torch.float64)
    new_b, new_a = truncated_svd(b, a, 4, alpha=8)  # b @ a (rank 2) held in 4 components: two are zero
    assert new_b.shape == (6, 4) and torch.count_nonzero(new_b[:, 2:]) == 0
    torch.testing.assert_close(8 / 4 * new_b @ new_a, b @ a)
    two = resize({"m.lora_A": new_a, "m.lora_B": new_b}, 2)
    torch.testing.assert_close(update(two), b @ a)  # resize keeps the update on the components kept


def test_what_flexlora_cannot_honour_is_refused_before_any_work():
    with pytest.raises(ConfigError, match="flexlora truncates.*'trimmed_mean'"):
        build("flexlora", {}, SPEC, 0, Aggregation("trimmed_mean"))
    method = get_method("flexlora")
    assert "client_clipping" in method.server.dp_refusals and method.server.heterogeneous_ranks
    _, client = build("flexlora", {}, SPEC, 0)
    assert client.rank_problem({"a": 2, "b": 4}) is None and "raise lora.r" in client.rank_problem({"a": 8})


def test_flexlora_end_to_end_with_heterogeneous_ranks(tmp_path):
    ranks = [2, 4, 1, 4]
    result = run_experiment(tiny_config(tmp_path, federation={"rounds": 3}, algorithm={"name": "flexlora"},
                                        clients={"lora_r": ranks}))
    assert result.server_state["meta"]["ranks"] == dict(zip(result.client_states, ranks))
    a = result.server_state["tensors"]["global"]
    for key in [k for k in a if k.endswith(".lora_A")]:  # the server's LoRA is an SVD: orthonormal rows of A
        torch.testing.assert_close(a[key] @ a[key].T, torch.eye(4), atol=1e-5, rtol=0)
