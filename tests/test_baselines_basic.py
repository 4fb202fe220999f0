"""Local and FedIT: server rules on hand-made tensors, what is sent, what trains."""

from __future__ import annotations

import torch

from fedlora.adapters import AdapterSpec
from fedlora.algorithms import ClientInfo, Reply, build

SPEC = AdapterSpec((("m", 3, 2),), r=2, alpha=4)


def lora(a: float, b: float) -> dict[str, torch.Tensor]:
    return {"m.lora_A": torch.full((2, 3), float(a)), "m.lora_B": torch.full((2, 2), float(b))}


def test_fedit_averages_a_and_b_separately_weighted_by_examples():
    server, _ = build("fedit", {}, SPEC, seed=0)
    server.setup([ClientInfo("x", 10), ClientInfo("y", 30)])
    x = {"m.lora_A": torch.tensor([[1.0, 2, 3], [4, 5, 6]]), "m.lora_B": torch.tensor([[1.0, 0], [0, 1]])}
    y = {"m.lora_A": torch.tensor([[5.0, 6, 7], [8, 9, 10]]), "m.lora_B": torch.tensor([[3.0, 4], [4, 3]])}
    server.aggregate(1, {"x": Reply({"global": x}, 10), "y": Reply({"global": y}, 30)})
    out = server.configure(2, ["x", "y"])
    g = out["x"].states["global"]
    torch.testing.assert_close(g["m.lora_A"], 0.25 * x["m.lora_A"] + 0.75 * y["m.lora_A"])
    torch.testing.assert_close(g["m.lora_B"], 0.25 * x["m.lora_B"] + 0.75 * y["m.lora_B"])
    # separate averaging: the product of means, not the mean of products
    assert not torch.allclose(g["m.lora_B"] @ g["m.lora_A"], 0.25 * x["m.lora_B"] @ x["m.lora_A"] + 0.75 * y["m.lora_B"] @ y["m.lora_A"])
    assert out["y"].states["global"] is g  # everyone receives the same global LoRA


def test_fedit_uniform_option_and_resume_state():
    server, _ = build("fedit", {"weighting": "uniform"}, SPEC, seed=0)
    server.setup([ClientInfo("x", 10), ClientInfo("y", 30)])
    server.aggregate(1, {"x": Reply({"global": lora(1, 2)}, 10), "y": Reply({"global": lora(3, 6)}, 30)})
    state = server.state_dict()
    torch.testing.assert_close(state["tensors"]["global"]["m.lora_A"], torch.full((2, 3), 2.0))
    other, _ = build("fedit", {"weighting": "uniform"}, SPEC, seed=0)
    other.setup([ClientInfo("x", 10), ClientInfo("y", 30)])
    other.load_state_dict(state)
    torch.testing.assert_close(other.configure(2, ["x"])["x"].states["global"]["m.lora_B"], torch.full((2, 2), 4.0))


def test_fedit_initial_global_is_seeded_and_b_is_zero():
    a, _ = build("fedit", {}, SPEC, seed=3)
    b, _ = build("fedit", {}, SPEC, seed=3)
    c, _ = build("fedit", {}, SPEC, seed=4)
    for s in (a, b, c):
        s.setup([ClientInfo("x", 1)])
    ga, gb, gc = (s.configure(1, ["x"])["x"].states["global"] for s in (a, b, c))
    assert torch.equal(ga["m.lora_A"], gb["m.lora_A"]) and not torch.equal(ga["m.lora_A"], gc["m.lora_A"])
    assert float(ga["m.lora_B"].abs().sum()) == 0


def test_local_server_sends_and_keeps_nothing():
    server, _ = build("local", {}, SPEC, seed=0)
    server.setup([ClientInfo("x", 1), ClientInfo("y", 1)])
    payloads = server.configure(1, ["x", "y"])
    assert all(p.states == {} and p.num_bytes == 0 for p in payloads.values())
    server.aggregate(1, {"x": Reply(num_examples=1)})
    assert server.state_dict() == {"tensors": {}, "meta": {}}


def test_ffa_averages_b_only_and_sends_no_a():
    server, _ = build("ffa", {"weighting": "uniform"}, SPEC, seed=0)
    server.setup([ClientInfo("x", 1), ClientInfo("y", 1)])
    p = server.configure(1, ["x"])["x"]
    assert set(p.states["b"]) == {"m.lora_B"} and float(p.states["b"]["m.lora_B"].abs().sum()) == 0
    server.aggregate(1, {"x": Reply({"b": {"m.lora_B": torch.full((2, 2), 1.0)}}, 1),
                         "y": Reply({"b": {"m.lora_B": torch.full((2, 2), 3.0)}}, 1)})
    torch.testing.assert_close(server.configure(2, ["x"])["x"].states["b"]["m.lora_B"], torch.full((2, 2), 2.0))


def test_ffa_aggregation_is_exact_because_a_is_shared():
    a = torch.randn(2, 3)
    bs = [torch.randn(2, 2) for _ in range(3)]
    server, _ = build("ffa", {"weighting": "uniform"}, SPEC, seed=0)
    server.setup([ClientInfo(str(i), 1) for i in range(3)])
    server.aggregate(1, {str(i): Reply({"b": {"m.lora_B": b}}, 1) for i, b in enumerate(bs)})
    mean_b = server.global_state["m.lora_B"]
    torch.testing.assert_close(mean_b @ a, sum(b @ a for b in bs) / 3)


def test_fedsa_averages_a_only():
    server, _ = build("fedsa", {}, SPEC, seed=0)
    server.setup([ClientInfo("x", 1), ClientInfo("y", 3)])
    assert set(server.configure(1, ["x"])["x"].states["a"]) == {"m.lora_A"}
    server.aggregate(1, {"x": Reply({"a": {"m.lora_A": torch.full((2, 3), 4.0)}}, 1),
                         "y": Reply({"a": {"m.lora_A": torch.full((2, 3), 8.0)}}, 3)})
    torch.testing.assert_close(server.configure(2, ["y"])["y"].states["a"]["m.lora_A"], torch.full((2, 3), 7.0))


def test_ifca_averages_within_chosen_clusters_only():
    server, _ = build("ifca", {"clusters": 3, "weighting": "uniform"}, SPEC, seed=0)
    server.setup([ClientInfo(c, 1) for c in "wxyz"])
    first = server.configure(1, list("wxyz"))
    assert all("cluster" in p.config and len(p.states) == 3 for p in first.values())
    assert not torch.equal(first["w"].states["cluster_0"]["m.lora_A"], first["w"].states["cluster_1"]["m.lora_A"])
    untouched = server.cluster_loras[2]
    server.aggregate(1, {"w": Reply({"lora": lora(1, 1)}, 1, {"cluster": 0}), "x": Reply({"lora": lora(3, 5)}, 1, {"cluster": 0}),
                         "y": Reply({"lora": lora(7, 7)}, 1, {"cluster": 1})})
    torch.testing.assert_close(server.cluster_loras[0]["m.lora_B"], torch.full((2, 2), 3.0))
    torch.testing.assert_close(server.cluster_loras[1]["m.lora_A"], torch.full((2, 3), 7.0))
    assert server.cluster_loras[2] is untouched
    assert server.diagnostics()["assignment"] == {"w": 0, "x": 0, "y": 1}
    assert all(p.config == {} for p in server.configure(2, list("wxyz")).values())  # later rounds: clients choose
