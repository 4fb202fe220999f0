"""FedLEASE (Wang et al., NeurIPS 2025): cluster clients by their LoRA B matrices, one LoRA expert per
cluster, adaptive top-M routing that always includes the client's own expert (spec section 3).

Phases:
  warm-up (rounds 1..warmup_rounds): each client trains one LoRA locally; no aggregation.
  allocation (end of the last warm-up round): B-distance clustering, M = argmax silhouette,
      experts = cluster means of the members' warm-up LoRAs.
  clustered rounds: a client trains its own expert j and the router (a fresh one per client until its
      cluster has trained, as the code does); the server averages each expert over its cluster and each
      router within its cluster.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Literal

from pydantic import Field

from ..adapters import Layout
from ..core.seeding import generator
from ..core.tensors import StateDict, clone
from .base import (ClientAlgorithm, ClientContext, ClientInfo, ClientState, Options, Payload, Personalized, Reply,
                   ServerAlgorithm)
from .clustering import b_distance_matrix, b_distances, choose_clusters


class FedLEASEOptions(Options):
    """Options of FedLEASE: the warm-up, the expert limit and init, router sharing and weighting."""

    warmup_rounds: int = Field(5, ge=1)                                 # counted inside federation.rounds (code)
    max_experts: int | None = Field(None, ge=2)                         # default min(8, N-1) [REC]
    expert_init: Literal["cluster_mean", "own"] = "cluster_mean"        # paper [REC] / official code
    router: Literal["cluster", "private"] = "cluster"                   # router averaged in cluster (code) or kept
    weighting: Literal["uniform", "examples"] = "uniform"

    @property
    def expert_limit(self) -> int:
        """The largest M the silhouette search tries (before the N-1 limit of the clustering)."""
        return self.max_experts or 8


class Phase(StrEnum):
    """FedLEASE's phases, as `Payload.config["phase"]` names them."""

    WARMUP = "warmup"
    CLUSTERED = "clustered"


def phase_of(payload: Payload) -> Phase:
    """The phase a payload belongs to (an evaluation payload before any round is a warm-up one)."""
    return Phase(payload.config.get("phase", Phase.WARMUP))


def expert_key(e: int) -> str:
    """Payload name of expert e."""
    return f"expert_{e}"


class FedLEASEServer(ServerAlgorithm):
    """Warm-up cache, clustering, and per-cluster expert and router averages."""

    secure_refusal = "its warm-up clusters the clients by each one's LoRA B matrices, which secure aggregation hides"

    def setup(self, clients: list[ClientInfo], rounds: int | None = None) -> None:
        """Start with an empty warm-up cache and no experts."""
        super().setup(clients, rounds)
        self.warm: dict[str, StateDict] = {}       # latest warm-up LoRA per client
        self.assignment: dict[str, int] = {}       # client -> own expert j(k)
        self.experts: list[StateDict] = []
        self.trained: set[int] = set()             # experts whose cluster has trained them at least once
        self.routers: dict[int, StateDict] = {}    # cluster -> its averaged router, once it has trained
        self.silhouette: dict[int, float] = {}

    @property
    def clustered(self) -> bool:
        """True once experts have been allocated."""
        return bool(self.experts)

    def configure(self, rnd: int, clients: list[str]) -> dict[str, Payload]:
        """Warm-up config until a client is clustered, then every expert and its cluster's router."""
        payloads = {}
        for cid in clients:
            if not self.clustered or cid not in self.assignment:
                # the warm-up LoRA is uploaded once, for clustering: in the last warm-up round, or late
                upload = frozenset({"lora"}) if rnd >= self.options.warmup_rounds else frozenset()
                payloads[cid] = Payload(config={"phase": Phase.WARMUP}, expects=upload)
                continue
            j = self.assignment[cid]
            states = {expert_key(e): self._starting_expert(e, cid) for e in range(len(self.experts))}
            if self.options.router == "cluster":
                states["router"] = self.routers[j] if j in self.routers else self._fresh_router(cid)
            payloads[cid] = Payload(states, {"phase": Phase.CLUSTERED, "expert": j, "n_experts": len(self.experts)},
                                    frozenset({"expert", "router"} if self.options.router == "cluster" else {"expert"}))
        return payloads

    def aggregate(self, rnd: int, replies: dict[str, Reply]) -> None:
        """Keep warm-up LoRAs, cluster after the warm-up, then average experts and routers per cluster."""
        for cid, reply in replies.items():
            if "lora" in reply.states:  # clustered on one by one: under central DP each is noised on its own
                lora = reply.states["lora"]
                self.warm[cid] = self.noise.noised_state(lora, cid) if self.noise is not None else lora
        if not self.clustered:
            if rnd >= self.options.warmup_rounds and self.warm:
                self._allocate()
            return
        for cid in [c for c in replies if c not in self.assignment and c in self.warm]:
            self._assign_late(cid)
        clustered = {c: r for c, r in replies.items() if "expert" in r.states}
        for e in range(len(self.experts)):
            members = {c: r for c, r in clustered.items() if self.assignment[c] == e}
            if not members:
                continue
            self.experts[e] = self.client_mean({c: r.states["expert"] for c, r in members.items()})
            self.trained.add(e)
            if self.options.router == "cluster":
                self.routers[e] = self.client_mean({c: r.states["router"] for c, r in members.items()})

    def reply_problem(self, rnd: int, client_id: str, reply: Reply) -> str | None:
        """A router without 2M-1 slots cannot be averaged with its cluster's."""
        router = reply.states.get("router")
        if router and self.clustered and any(v.shape[0] != 2 * len(self.experts) - 1 for v in router.values()):
            return f"the router must have 2M-1 = {2 * len(self.experts) - 1} slots for M = {len(self.experts)} experts"
        return None

    def schedule_problems(self, rounds: int) -> list[str]:
        """Clustering happens after the last warm-up round: with no round after it FedLEASE is Local."""
        if self.options.warmup_rounds >= rounds:
            return [f"warmup_rounds={self.options.warmup_rounds} leaves no clustered round in federation.rounds="
                    f"{rounds}: every client trains alone, as Local; lower warmup_rounds or raise the rounds"]
        return []

    def update_reference(self, client_id: str, name: str, payload: Payload, reply: Reply) -> StateDict | None:
        """The own expert is an update of the expert j the client received; the router of its cluster's router."""
        return FedLEASEClient.started_from(name, payload, reply)

    def _allocate(self) -> None:
        ids = sorted(self.warm, key=list(self.clients).index)
        result = choose_clusters(b_distance_matrix([self.warm[c] for c in ids]), self.options.expert_limit)
        self.silhouette = result.silhouette
        self.assignment = dict(zip(ids, result.labels))
        # the warm-up LoRAs were noised one by one under central DP: combined by the rule, not noised again
        self.experts = [self.combine({c: self.warm[c] for c, label in self.assignment.items() if label == e})
                        for e in range(result.n_clusters)]

    def _starting_expert(self, e: int, cid: str) -> StateDict:
        """Expert e as client cid receives it: the latest average, or under `expert_init = "own"`, until its
        cluster has trained it, the client's own warm-up LoRA in its slot and a fresh expert (B = 0) elsewhere."""
        if self.options.expert_init == "own" and e not in self.trained:
            if e == self.assignment[cid]:
                return self.warm[cid]
            return clone(self.lora_init())
        return self.experts[e]

    def _fresh_router(self, cid: str) -> StateDict:
        """A client's own kaiming router (2M-1 slots), used until its cluster has an averaged one (the code)."""
        return self.spec.init_router(2 * len(self.experts) - 1, generator(self.seed, "router", cid))

    def _assign_late(self, cid: str) -> None:
        """A client first seen after allocation joins the cluster of smallest mean B-distance (average linkage)."""
        members = list(self.assignment)
        dist = b_distances([self.warm[cid]], [self.warm[c] for c in members])[0]
        means = {e: dist[[i for i, c in enumerate(members) if self.assignment[c] == e]].mean() for e in range(len(self.experts))}
        self.assignment[cid] = min(means, key=means.get)

    def diagnostics(self) -> dict:
        """The phase and, once clustered, M, the assignment and silhouettes."""
        if not self.clustered:
            return {"phase": str(Phase.WARMUP)}
        return {"phase": str(Phase.CLUSTERED), "n_experts": len(self.experts), "assignment": self.assignment,
                "silhouette": {str(k): v for k, v in self.silhouette.items()}}

    def state_dict(self) -> dict:
        """Warm-up LoRAs, experts, routers and the clustering."""
        tensors = {f"warm.{c}": s for c, s in self.warm.items()}
        tensors.update({f"expert.{e}": s for e, s in enumerate(self.experts)})
        tensors.update({f"router.{e}": s for e, s in self.routers.items()})
        return {"tensors": tensors, "meta": {"assignment": self.assignment, "silhouette": self.silhouette,
                                             "trained": sorted(self.trained)}}

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` saved."""
        t = state["tensors"]
        self.warm = {k.removeprefix("warm."): v for k, v in t.items() if k.startswith("warm.")}
        self.experts = [t[f"expert.{e}"] for e in range(sum(k.startswith("expert.") for k in t))]
        self.routers = {int(k.removeprefix("router.")): v for k, v in t.items() if k.startswith("router.")}
        self.trained = set(state["meta"]["trained"])
        self.assignment = dict(state["meta"]["assignment"])
        self.silhouette = {int(k): v for k, v in state["meta"]["silhouette"].items()}


class FedLEASEClient(ClientAlgorithm):
    """Warm-up: one local LoRA. Clustered: M experts (own one trainable), adaptive top-M router."""

    @staticmethod
    def started_from(name: str, payload: Payload, reply: Reply) -> StateDict | None:
        """The own expert started as the expert j the client received; the router as its cluster's router."""
        if name == "expert":
            return payload.states.get(expert_key(payload.config["expert"]))
        return payload.states.get(name)

    def layout_for(self, payload: Payload) -> Layout:
        """M experts with adaptive top-M routing once clustered, one LoRA in the warm-up."""
        if phase_of(payload) is Phase.CLUSTERED:
            return Layout(payload.config["n_experts"], "adaptive_top_m")
        return Layout(1)

    def _warm(self, state: ClientState) -> StateDict:
        if "warm" not in state.states:
            state.states["warm"] = self.spec.init_lora(generator(self.seed, "lora-init"))
        return state.states["warm"]

    def _load_clustered(self, payload: Payload, state: ClientState, ctx: ClientContext) -> int:
        model, j, m = ctx.model, payload.config["expert"], payload.config["n_experts"]
        for e in range(m):
            model.load_expert(e, payload.states[expert_key(e)])
        model.set_own_expert(j)
        if "router" in payload.states:
            model.load_router(payload.states["router"])
        else:  # private router, created on the client the first time it joins the clustered phase
            if "router" not in state.states:
                state.states["router"] = self.spec.init_router(2 * m - 1, generator(self.seed, "router", ctx.client_id))
            model.load_router(state.states["router"])
        return j

    def fit(self, payload: Payload, state: ClientState, ctx: ClientContext) -> tuple[Reply, ClientState]:
        """Train the warm-up LoRA, or the own expert and the router; send what the server averages."""
        n = len(ctx.data.train)
        if phase_of(payload) is Phase.WARMUP:
            ctx.model.load_expert(0, self._warm(state))
            metrics = ctx.trainer.train(experts=[0])
            state.states["warm"] = ctx.model.expert_state(0)
            return Reply({"lora": state.states["warm"]} if "lora" in payload.expects else {}, n, metrics), state
        j = self._load_clustered(payload, state, ctx)
        metrics = ctx.trainer.train(experts=[j], router=True)
        router = ctx.model.router_state()
        sent = {"expert": ctx.model.expert_state(j)}
        if "router" in payload.expects:
            sent["router"] = router
        else:
            state.states["router"] = router
        return Reply(sent, n, metrics), state

    def personalize(self, payload: Payload, state: ClientState, ctx: ClientContext) -> Personalized:
        """The warm-up LoRA, or every expert with the router."""
        if phase_of(payload) is Phase.WARMUP:
            ctx.model.load_expert(0, self._warm(state))
        else:
            self._load_clustered(payload, state, ctx)
        return Personalized()
