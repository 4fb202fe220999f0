"""FedLEASE: B-distance, silhouette choice of M, cluster averaging, payload contents."""

from __future__ import annotations

import numpy as np
import torch

from fedlora.adapters import AdapterSpec
from fedlora.algorithms import Aggregation, ClientInfo, Reply, build
from fedlora.algorithms.clustering import b_distance_matrix, canonical, choose_clusters

MODULES = (("l0.query", 8, 8), ("l0.value", 8, 8), ("l1.query", 8, 8), ("l1.value", 8, 8))
SPEC = AdapterSpec(MODULES, r=2, alpha=4)


def grouped_loras(groups: list[int], seed: int = 0, noise: float = 0.15) -> list[dict[str, torch.Tensor]]:
    """LoRAs whose B matrices are noisy copies of one random centre per group."""
    g = torch.Generator().manual_seed(seed)
    centres = {grp: {p: torch.randn(8, 2, generator=g) for p, _, _ in MODULES} for grp in set(groups)}
    out = []
    for grp in groups:
        lora = {}
        for p, _, _ in MODULES:
            lora[f"{p}.lora_A"] = torch.randn(2, 8, generator=g)  # A is ignored by the distance
            lora[f"{p}.lora_B"] = centres[grp][p] + noise * torch.randn(8, 2, generator=g)
        out.append(lora)
    return out


def test_b_distance_is_one_minus_cosine_averaged_over_layers_and_types():
    a = {f"{p}.lora_B": torch.tensor([[1.0, 0.0]] * 8) for p, _, _ in MODULES}
    b = dict(a)
    b["l0.query.lora_B"] = torch.tensor([[0.0, 1.0]] * 8)   # orthogonal in one of 2 query layers
    b["l1.value.lora_B"] = -a["l1.value.lora_B"]           # opposite in one of 2 value layers
    d = b_distance_matrix([a, b, a])
    # query: (1 + 0) / 2 = 0.5; value: (0 + 2) / 2 = 1.0; mean over types = 0.75
    np.testing.assert_allclose(d, [[0, 0.75, 0], [0.75, 0, 0.75], [0, 0.75, 0]], atol=1e-6)


def test_silhouette_recovers_known_clusters_exactly():
    groups = [0, 1, 2, 0, 1, 2, 0, 1, 2, 3, 3, 3]
    result = choose_clusters(b_distance_matrix(grouped_loras(groups)), max_clusters=8)
    assert result.n_clusters == 4
    assert result.labels == canonical(groups)
    assert max(result.silhouette, key=result.silhouette.get) == 4 and set(result.silhouette) == set(range(2, 9))


def run_warmup(options: dict, groups: list[int], aggregation: Aggregation = Aggregation()):
    server, client = build("fedlease", {"warmup_rounds": 2, **options}, SPEC, seed=0, aggregation=aggregation)
    ids = [f"c{i}" for i in range(len(groups))]
    server.setup([ClientInfo(c, 10) for c in ids])
    loras = grouped_loras(groups)
    assert all(p.config == {"phase": "warmup"} and not p.expects for p in server.configure(1, ids).values())
    server.aggregate(1, {c: Reply({}, 10) for c in ids})
    assert not server.clustered
    assert all(p.expects == {"lora"} for p in server.configure(2, ids).values())
    server.aggregate(2, {c: Reply({"lora": lora}, 10) for c, lora in zip(ids, loras)})
    return server, ids, loras


def test_allocation_initialises_experts_as_cluster_means_and_a_fresh_router_per_client():
    groups = [0, 0, 1, 1, 1, 2]
    server, ids, loras = run_warmup({}, groups)
    assert server.clustered and len(server.experts) == 3
    assert [server.assignment[c] for c in ids] == [0, 0, 1, 1, 1, 2]
    for e, members in enumerate([[0, 1], [2, 3, 4], [5]]):
        for k in loras[0]:
            torch.testing.assert_close(server.experts[e][k], torch.stack([loras[i][k] for i in members]).mean(0))
    first = server.configure(3, ids)
    assert first["c3"].config == {"phase": "clustered", "expert": 1, "n_experts": 3}
    assert first["c3"].expects == {"expert", "router"}
    assert set(first["c3"].states) == {"expert_0", "expert_1", "expert_2", "router"}
    assert first["c3"].states["expert_1"] is server.experts[1]
    # the code's start: a kaiming router of 2M-1 slots per client, not yet shared within the cluster
    routers = {c: first[c].states["router"]["l0.query.router"] for c in ids}
    assert all(r.shape == (5, 8) for r in routers.values()) and server.routers == {}
    assert not torch.equal(routers["c2"], routers["c3"])
    assert torch.equal(server.configure(3, ["c3"])["c3"].states["router"]["l0.query.router"], routers["c3"])
    # once cluster 1 has trained, its members share its averaged router; cluster 0 still starts fresh
    server.aggregate(3, {c: Reply({"expert": server.experts[1], "router": first[c].states["router"]}, 10)
                         for c in ("c2", "c3")})
    later = server.configure(4, ids)
    assert later["c3"].states["router"] is server.routers[1] is later["c4"].states["router"]
    torch.testing.assert_close(server.routers[1]["l0.query.router"], (routers["c2"] + routers["c3"]) / 2)
    assert torch.equal(later["c0"].states["router"]["l0.query.router"], routers["c0"])


def test_clustered_aggregation_averages_each_expert_and_router_within_its_cluster():
    server, ids, _ = run_warmup({}, [0, 0, 1, 1])
    before_1 = server.experts[1]
    router = server.configure(3, ids[:1])[ids[0]].states["router"]
    replies = {}
    for i, v in [(0, 1.0), (1, 3.0)]:  # only cluster 0 replies
        replies[ids[i]] = Reply({"expert": {k: torch.full_like(t, v) for k, t in before_1.items()},
                                 "router": {k: torch.full_like(t, 10 * v) for k, t in router.items()}}, 10)
    server.aggregate(3, replies)
    assert all(torch.allclose(t, torch.full_like(t, 2.0)) for t in server.experts[0].values())
    assert all(torch.allclose(t, torch.full_like(t, 20.0)) for t in server.routers[0].values())
    assert server.experts[1] is before_1 and 1 not in server.routers  # no member replied: unchanged


def test_own_init_option_and_private_router():
    server, ids, loras = run_warmup({"expert_init": "own", "router": "private"}, [0, 0, 1, 1])
    first = server.configure(3, ids)
    assert "router" not in first["c1"].states
    # the official code: own warm LoRA in its slot, every other expert fresh (B = 0, so it adds nothing)
    assert all(torch.equal(first["c1"].states["expert_0"][k], loras[1][k]) for k in loras[1])
    assert all(torch.equal(first["c2"].states["expert_1"][k], loras[2][k]) for k in loras[2])
    other = first["c1"].states["expert_1"]
    assert all(not v.any() for k, v in other.items() if k.endswith("lora_B"))
    assert any(v.any() for k, v in other.items() if k.endswith("lora_A"))
    server.aggregate(3, {c: Reply({"expert": first[c].states["expert_0"]}, 10) for c in ids[:2]})  # cluster 0 trains
    later = server.configure(4, ids)
    assert later["c1"].states["expert_0"] is server.experts[0] is later["c2"].states["expert_0"]
    torch.testing.assert_close(server.experts[0]["l0.query.lora_B"], (loras[0]["l0.query.lora_B"] + loras[1]["l0.query.lora_B"]) / 2)
    # cluster 1 has not trained yet: its members still start from their own warm LoRA
    assert all(torch.equal(later["c2"].states["expert_1"][k], loras[2][k]) for k in loras[2])


def test_late_client_joins_the_nearest_cluster():
    server, client = build("fedlease", {"warmup_rounds": 1}, SPEC, seed=0)
    ids = ["a", "b", "c", "d", "late"]
    server.setup([ClientInfo(c, 10) for c in ids])
    loras = grouped_loras([0, 0, 1, 1, 1])
    server.aggregate(1, {c: Reply({"lora": lora}, 10) for c, lora in zip(ids[:4], loras)})
    assert server.configure(2, ["late"])["late"].config["phase"] == "warmup"
    server.aggregate(2, {"late": Reply({"lora": loras[4]}, 10)})
    assert server.assignment["late"] == server.assignment["c"]


def test_a_robust_rule_also_forms_the_experts_so_one_outsized_warm_up_lora_cannot_capture_one():
    groups = [0, 0, 0, 1, 1, 1]
    plain, ids, loras = run_warmup({}, groups)
    server, _, _ = run_warmup({}, groups, Aggregation("median"))
    assert server.assignment == plain.assignment  # B's cosine distance ignores scale: the clustering is the same
    for e, members in enumerate([[0, 1, 2], [3, 4, 5]]):
        for k in loras[0]:
            torch.testing.assert_close(server.experts[e][k], torch.stack([loras[i][k] for i in members]).median(0).values)
