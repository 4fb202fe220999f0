"""FedALT: leave-one-out Rest-of-World on hand-made tensors, and what trains, is sent and received."""

from __future__ import annotations

import torch

from fedlora.adapters import AdapterSpec
from fedlora.algorithms import ClientInfo, Reply, build
from fedlora.core.tensors import weighted_mean

SPEC = AdapterSpec((("m", 3, 2),), r=2, alpha=4)


def lora(value: float) -> dict[str, torch.Tensor]:
    return {"m.lora_A": torch.full((2, 3), value), "m.lora_B": torch.full((2, 2), 10 * value)}


def server_with(n: int, options: dict | None = None, sizes=None):
    server, _ = build("fedalt", options or {}, SPEC, seed=0)
    server.setup([ClientInfo(f"c{i}", (sizes or [1] * n)[i]) for i in range(n)])
    return server


def test_rest_of_world_is_the_uniform_mean_of_the_others():
    server = server_with(3)
    assert server.configure(1, ["c0"])["c0"].states == {}  # nothing to send before any upload
    server.aggregate(1, {f"c{i}": Reply({"individual": lora(v)}, 1) for i, v in enumerate([1.0, 2.0, 6.0])})
    rows = {cid: p.states["row"] for cid, p in server.configure(2, ["c0", "c1", "c2"]).items()}
    torch.testing.assert_close(rows["c0"]["m.lora_A"], torch.full((2, 3), 4.0))   # (2 + 6) / 2
    torch.testing.assert_close(rows["c1"]["m.lora_B"], torch.full((2, 2), 35.0))  # (10 + 60) / 2
    torch.testing.assert_close(rows["c2"]["m.lora_A"], torch.full((2, 3), 1.5))


def test_running_sum_equals_naive_leave_one_out_with_weights():
    g = torch.Generator().manual_seed(0)
    sizes = [3, 1, 4, 1, 5, 9, 2]
    server = server_with(7, {"weighting": "examples"}, sizes)
    loras = {f"c{i}": {"m.lora_A": torch.randn(2, 3, generator=g), "m.lora_B": torch.randn(2, 2, generator=g)} for i in range(7)}
    server.aggregate(1, {cid: Reply({"individual": s}, sizes[i]) for i, (cid, s) in enumerate(loras.items())})
    for i, cid in enumerate(loras):
        others = [j for j in range(7) if j != i]
        naive = weighted_mean([loras[f"c{j}"] for j in others], [sizes[j] for j in others])
        got = server.rest_of_world(cid)
        for k in naive:
            torch.testing.assert_close(got[k], naive[k], atol=1e-6, rtol=1e-6)


def test_partial_participation_uses_the_latest_known_loras():
    server = server_with(3)
    server.aggregate(1, {"c0": Reply({"individual": lora(1.0)}, 1), "c1": Reply({"individual": lora(3.0)}, 1)})
    server.aggregate(2, {"c1": Reply({"individual": lora(5.0)}, 1)})  # c0 is stale, c2 never seen
    row_c2 = server.rest_of_world("c2")
    torch.testing.assert_close(row_c2["m.lora_A"], torch.full((2, 3), 3.0))  # (1 + 5) / 2
    torch.testing.assert_close(server.rest_of_world("c0")["m.lora_A"], torch.full((2, 3), 5.0))
    restored = server_with(3)
    restored.load_state_dict(server.state_dict())
    torch.testing.assert_close(restored.rest_of_world("c2")["m.lora_A"], row_c2["m.lora_A"])


def test_client_options_set_layout_and_gate():
    _, adaptive = build("fedalt", {}, SPEC, seed=0)
    _, fixed = build("fedalt", {"mixer": "fixed"}, SPEC, seed=0)
    assert (adaptive.layout.n_experts, adaptive.layout.router) == (2, "dense")
    assert (fixed.layout.n_experts, fixed.layout.router) == (2, "none")
