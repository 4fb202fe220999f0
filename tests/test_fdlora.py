"""FDLoRA: the outer Nesterov step, fusion, the AdaFusion search, stages and syncs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedlora.adapters import AdapterSpec
from fedlora.algorithms import ClientContext, ClientInfo, Reply, build
from fedlora.algorithms.fdlora import OuterOptimizer, fuse, fusion_objective

SPEC = AdapterSpec((("m", 3, 2),), r=2, alpha=4)


def full(a: float, b: float) -> dict[str, torch.Tensor]:
    return {"m.lora_A": torch.full((2, 3), a), "m.lora_B": torch.full((2, 2), b)}


def test_outer_step_with_lr_1_and_no_momentum_is_fedavg():
    outer = OuterOptimizer(full(1.0, 2.0), lr=1.0, momentum=0.0, nesterov=True)
    locals_ = [full(3.0, 0.0), full(5.0, 4.0)]
    mean = {k: (locals_[0][k] + locals_[1][k]) / 2 for k in locals_[0]}
    new = outer.step({k: full(1.0, 2.0)[k] - mean[k] for k in mean})
    torch.testing.assert_close(new["m.lora_A"], torch.full((2, 3), 4.0))
    torch.testing.assert_close(new["m.lora_B"], torch.full((2, 2), 2.0))


def test_nesterov_momentum_two_steps_by_hand():
    lr, mu = 0.5, 0.5
    outer = OuterOptimizer(full(0.0, 0.0), lr=lr, momentum=mu, nesterov=True)
    g1, g2 = 2.0, -1.0
    outer.step(full(g1, g1))
    buf = g1
    theta = -lr * (g1 + mu * buf)                 # first step: buf = g
    outer.step(full(g2, g2))
    buf = mu * buf + g2
    theta = theta - lr * (g2 + mu * buf)
    torch.testing.assert_close(outer.value()["m.lora_A"], torch.full((2, 3), theta))
    torch.testing.assert_close(outer.momentum()["m.lora_B"], torch.full((2, 2), buf))


def test_fusion_is_elementwise_on_a_and_b_with_cross_terms():
    g, p = full(1.0, 2.0), full(-3.0, 4.0)
    f = fuse((0.5, 2.0), g, p)
    torch.testing.assert_close(f["m.lora_A"], torch.full((2, 3), 0.5 - 6.0))
    torch.testing.assert_close(f["m.lora_B"], torch.full((2, 2), 1.0 + 8.0))
    assert fusion_objective(1.25, [0.5, -1.5], 0.05) == pytest.approx(1.25 + 0.05)


class FakeModel:
    def __init__(self):
        self.loaded = None

    def load_expert(self, e, state):
        self.loaded = state


class FakeTrainer:
    """loss = squared distance of the loaded LoRA to a target fused LoRA."""

    def __init__(self, target):
        self.adapted, self.target = FakeModel(), target

    def loss(self, data):
        return float(sum(((self.adapted.loaded[k] - self.target[k]) ** 2).sum() for k in self.target))


def fake_context(target) -> ClientContext:
    return ClientContext("a", 0, type("D", (), {"few_shot": [0] * 4})(), FakeTrainer(target))


def test_adafusion_search_finds_the_best_weights():
    _, client = build("fdlora", {"fusion_budget": 150, "fusion_l1": 0.0}, SPEC, seed=0)
    g = torch.Generator().manual_seed(1)
    glob = {"m.lora_A": torch.randn(2, 3, generator=g), "m.lora_B": torch.randn(2, 2, generator=g)}
    personal = {"m.lora_A": torch.randn(2, 3, generator=g), "m.lora_B": torch.randn(2, 2, generator=g)}
    w = client.search_fusion(glob, personal, fake_context(fuse((0.7, -0.4), glob, personal)))
    np.testing.assert_allclose(w, [0.7, -0.4], atol=0.1)
    again = client.search_fusion(glob, personal, fake_context(fuse((0.7, -0.4), glob, personal)))
    np.testing.assert_array_equal(w, again)  # seeded: the same search gives the same weights


def test_stages_upload_and_sync_schedule():
    server, _ = build("fdlora", {"stage1_rounds": 1, "sync_every": 2}, SPEC, seed=0)
    server.setup([ClientInfo("a", 1), ClientInfo("b", 1)])
    p1 = server.configure(1, ["a", "b"])
    assert p1["a"].config == {"stage": "local"} and p1["a"].expects == {"stage1"} and p1["a"].states == {}
    server.aggregate(1, {"a": Reply({"stage1": full(1.0, 1.0)}, 1), "b": Reply({"stage1": full(3.0, 5.0)}, 1)})
    p2 = server.configure(2, ["a"])["a"]
    torch.testing.assert_close(p2.states["global"]["m.lora_B"], torch.full((2, 2), 3.0))  # theta_g^0 = stage-1 mean
    assert [server.configure(r, ["a"])["a"].config["sync"] for r in (2, 3, 4, 5)] == [False, True, False, True]
    fresh, _ = build("fdlora", {"global_init": "fresh"}, SPEC, seed=0)
    fresh.setup([ClientInfo("a", 1)])
    assert fresh.configure(1, ["a"])["a"].expects == frozenset()


def test_server_state_round_trip_keeps_momentum():
    server, _ = build("fdlora", {"stage1_rounds": 0}, SPEC, seed=0)
    server.setup([ClientInfo("a", 1)])
    server.aggregate(1, {"a": Reply({"global": full(1.0, 1.0)}, 1)})
    other, _ = build("fdlora", {"stage1_rounds": 0}, SPEC, seed=0)
    other.setup([ClientInfo("a", 1)])
    other.load_state_dict(server.state_dict())
    server.aggregate(2, {"a": Reply({"global": full(2.0, 0.0)}, 1)})
    other.aggregate(2, {"a": Reply({"global": full(2.0, 0.0)}, 1)})
    torch.testing.assert_close(server.outer.value()["m.lora_A"], other.outer.value()["m.lora_A"])
