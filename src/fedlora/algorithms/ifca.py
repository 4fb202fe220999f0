"""IFCA + LoRA (Ghosh et al. 2020, as a FedLEASE baseline): C cluster LoRAs; each client picks the one with
the lowest loss on its training data, trains it, and the server averages within clusters. No sharing
across clusters.

Under secure aggregation a client uploads one slot per cluster, its LoRA in the slot of its choice and zeros in
the others, and a one-hot `members` vector: the secure mean of slot c over the mean of members[c] is cluster c's
weighted mean, and the server never learns which client chose which cluster (a cluster one client chose is still
that client's LoRA, unnamed)."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from ..core.seeding import generator, numpy_rng
from ..core.tensors import StateDict
from .base import (AveragingOptions, ClientAlgorithm, ClientContext, ClientInfo, ClientState, Payload, Personalized,
                   Reply, SecureMean, ServerAlgorithm)


class IFCAOptions(AveragingOptions):
    """Options of IFCA: the number of clusters, round 1's assignment and the examples scored per cluster."""

    clusters: int = Field(4, ge=1)
    first_round: Literal["random", "loss"] = "random"  # LoRA B starts at 0, so all clusters tie at first:
    #                                                     round 1 assigns seeded random identities [REC]
    selection_examples: int | None = Field(None, ge=1)  # training examples scored per cluster (default: all)


def cluster_key(c: int) -> str:
    """Payload name of cluster LoRA c."""
    return f"cluster_{c}"


def slot_key(c: int) -> str:
    """Secure aggregation: reply name of cluster c's slot (the client's LoRA there if it chose c, else zeros)."""
    return f"slot_{c}"


MEMBERS = "members"  # secure aggregation: a one-hot vector of the client's cluster


class IFCAServer(ServerAlgorithm):
    """C cluster LoRAs from distinct seeds; within-cluster FedAvg."""

    secure_refusal = None
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
        if self.secure:  # the slots' layouts: the LoRA's, and one member count per cluster
            states[MEMBERS] = {"onehot": torch.zeros(self.options.clusters)}
            expects = frozenset({MEMBERS, *(slot_key(c) for c in range(self.options.clusters))})
        else:
            expects = frozenset({"lora"})
        return {cid: Payload(states, {"cluster": forced[cid]} if cid in forced else {}, expects) for cid in clients}

    def aggregate(self, rnd: int, replies: dict[str, Reply]) -> None:
        """Average each cluster LoRA over the replies that chose it; record the choices."""
        for c in range(self.options.clusters):
            members = {cid: r for cid, r in replies.items() if int(r.metrics["cluster"]) == c}
            if members:
                self.cluster_loras[c] = self.client_mean({cid: r.states["lora"] for cid, r in members.items()})
        self.assignment.update({cid: int(r.metrics["cluster"]) for cid, r in replies.items()})

    def aggregate_secure(self, rnd: int, mean: SecureMean) -> None:
        """Cluster c's LoRA becomes the secure mean of slot c over the mean of members[c], where anyone chose it."""
        share = mean.states[MEMBERS]["onehot"]  # sum_k w_k [k chose c] / sum_k w_k, quantized
        least = min(self.weight(cid) for cid in mean.clients) / mean.weight / 2  # no member: 0 up to rounding
        for c in range(self.options.clusters):
            if float(share[c]) > least:
                self.cluster_loras[c] = {k: v / share[c] for k, v in mean.states[slot_key(c)].items()}

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
        lora = ctx.model.expert_state(0)
        if MEMBERS in payload.expects:  # secure: the LoRA in its cluster's slot; the choice never leaves unmasked
            slots = {slot_key(j): lora if j == c else {k: torch.zeros_like(v) for k, v in lora.items()}
                     for j in range(self.options.clusters)}
            return Reply({**slots, MEMBERS: {"onehot": torch.nn.functional.one_hot(
                torch.tensor(c), self.options.clusters).float()}}, len(ctx.data.train), metrics), state
        metrics["cluster"] = c
        return Reply({"lora": lora}, len(ctx.data.train), metrics), state

    def personalize(self, payload: Payload, state: ClientState, ctx: ClientContext) -> Personalized:
        """The cluster LoRA with the lowest training loss."""
        c = self.choose(Payload(payload.states), ctx)  # evaluation always picks by loss
        ctx.model.load_expert(0, payload.states[cluster_key(c)])
        return Personalized(diagnostics={"cluster": c})
