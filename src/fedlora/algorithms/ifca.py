"""IFCA + LoRA (Ghosh et al. 2020, as a FedLEASE baseline): C cluster LoRAs; each client picks the one with
the lowest loss on its training data, trains it, and the server averages within clusters. No sharing
across clusters."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ..core.seeding import generator, numpy_rng
from ..core.tensors import StateDict
from .base import (AveragingOptions, ClientAlgorithm, ClientContext, ClientInfo, ClientState, Payload, Personalized,
                   Reply, ServerAlgorithm)


class IFCAOptions(AveragingOptions):
    """Options of IFCA: the number of clusters, round 1's assignment and the examples scored per cluster."""

    clusters: int = Field(4, ge=1)
    first_round: Literal["random", "loss"] = "random"  # LoRA B starts at 0, so all clusters tie at first:
    #                                                     round 1 assigns seeded random identities [REC]
    selection_examples: int | None = Field(None, ge=1)  # training examples scored per cluster (default: all)


def cluster_key(c: int) -> str:
    """Payload name of cluster LoRA c."""
    return f"cluster_{c}"


class IFCAServer(ServerAlgorithm):
    """C cluster LoRAs from distinct seeds; within-cluster FedAvg."""

    secure_refusal = "it averages each cluster's members apart; per-cluster secure sums are not built yet"
    dp_refusals = {mode: "each client reports the cluster its data fits best, a release no noise covers"
                   for mode in ("client_clipping", "local")}

    def setup(self, clients: list[ClientInfo], rounds: int | None = None) -> None:
        """C cluster LoRAs from distinct seeds and no assignment yet."""
        super().setup(clients, rounds)
        self.cluster_loras: list[StateDict] = [self.spec.init_lora(generator(self.seed, "ifca-init", c))
                                               for c in range(self.options.clusters)]
        self.assignment: dict[str, int] = {}

    def configure(self, rnd: int, clients: list[str]) -> dict[str, Payload]:
        """Every cluster LoRA; in round 1 a seeded random cluster per client (first_round = random)."""
        states = {cluster_key(c): s for c, s in enumerate(self.cluster_loras)}
        forced = {}
        if rnd == 1 and self.options.first_round == "random":
            picks = numpy_rng(self.seed, "ifca-first").integers(self.options.clusters, size=len(self.clients))
            forced = {cid: int(p) for cid, p in zip(self.clients, picks)}
        return {cid: Payload(states, {"cluster": forced[cid]} if cid in forced else {}, frozenset({"lora"}))
                for cid in clients}

    def aggregate(self, rnd: int, replies: dict[str, Reply]) -> None:
        """Average each cluster LoRA over the replies that chose it; record the choices."""
        for c in range(self.options.clusters):
            members = {cid: r for cid, r in replies.items() if int(r.metrics["cluster"]) == c}
            if members:
                self.cluster_loras[c] = self.client_mean({cid: r.states["lora"] for cid, r in members.items()})
        self.assignment.update({cid: int(r.metrics["cluster"]) for cid, r in replies.items()})

    def reply_problem(self, rnd: int, client_id: str, reply: Reply) -> str | None:
        """Also rejects a 'cluster' metric that is not a cluster id."""
        c = reply.metrics.get("cluster")
        if isinstance(c, bool) or not isinstance(c, (int, float)) or c != int(c) or not 0 <= c < self.options.clusters:
            return f"metric 'cluster' must be a cluster id 0..{self.options.clusters - 1}, got {c!r}"
        return None

    def update_reference(self, client_id: str, name: str, payload: Payload, reply: Reply) -> StateDict | None:
        """The trained LoRA is an update of the cluster LoRA the client chose."""
        return IFCAClient.started_from(name, payload, reply)

    def diagnostics(self) -> dict:
        """Each client's latest cluster."""
        return {"assignment": dict(self.assignment)}

    def state_dict(self) -> dict:
        """The cluster LoRAs and the assignment."""
        return {"tensors": {cluster_key(c): s for c, s in enumerate(self.cluster_loras)},
                "meta": {"assignment": self.assignment}}

    def load_state_dict(self, state: dict) -> None:
        """Restore the cluster LoRAs and the assignment."""
        self.cluster_loras = [state["tensors"][cluster_key(c)] for c in range(self.options.clusters)]
        self.assignment = dict(state["meta"]["assignment"])


class IFCAClient(ClientAlgorithm):
    """Pick the lowest-loss cluster LoRA on local training data, train it, send it with the cluster id."""

    @staticmethod
    def started_from(name: str, payload: Payload, reply: Reply) -> StateDict | None:
        """The trained LoRA started as the cluster LoRA the client chose."""
        return payload.states.get(cluster_key(int(reply.metrics["cluster"])))

    def choose(self, payload: Payload, ctx: ClientContext) -> int:
        """The cluster to use: forced by the server, or argmin of the training loss."""
        if "cluster" in payload.config:
            return int(payload.config["cluster"])
        data = ctx.data.train
        if self.options.selection_examples and self.options.selection_examples < len(data):
            data = data.subset(range(self.options.selection_examples))
        losses = []
        for c in range(self.options.clusters):
            ctx.model.load_expert(0, payload.states[cluster_key(c)])
            losses.append(ctx.trainer.loss(data))
        return min(range(len(losses)), key=losses.__getitem__)

    def fit(self, payload: Payload, state: ClientState, ctx: ClientContext) -> tuple[Reply, ClientState]:
        """Train the chosen cluster LoRA and send it, with the cluster id as a metric."""
        c = self.choose(payload, ctx)
        ctx.model.load_expert(0, payload.states[cluster_key(c)])
        metrics = ctx.trainer.train(experts=[0])
        metrics["cluster"] = c
        return Reply({"lora": ctx.model.expert_state(0)}, len(ctx.data.train), metrics), state

    def personalize(self, payload: Payload, state: ClientState, ctx: ClientContext) -> Personalized:
        """The cluster LoRA with the lowest training loss."""
        c = self.choose(Payload(payload.states), ctx)  # evaluation always picks by loss
        ctx.model.load_expert(0, payload.states[cluster_key(c)])
        return Personalized(diagnostics={"cluster": c})
