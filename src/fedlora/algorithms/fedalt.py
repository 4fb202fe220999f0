"""FedALT (Bian et al., AAAI 2026): Individual LoRA + frozen Rest-of-World LoRA, mixed per token by a personal gate.

Per adapted module (spec section 2.2), with slot 0 = Rest-of-World (RoW), slot 1 = Individual:
    y = W0 x + g_0(x) s B_R A_R drop(x) + g_1(x) s B_I A_I drop(x),   g(x) = softmax(G x)
Client: keep training its own Individual LoRA and gate across rounds (never overwritten); the RoW is
downloaded and frozen. Server: RoW_k = mean over j != k of the latest Individual LoRAs, A and B
averaged separately, computed for all clients in O(N) from one running sum.

Under secure aggregation the server never holds an Individual LoRA: clients upload theta_k(new) - theta_k(counted),
the change since what the sum already counts of them (at first their public seeded init, which the server adds itself),
and the server keeps S = sum_j w_j theta_j and W = sum_j w_j from the rounds' secure means. It sends S and W; client k
forms its RoW_k = (S - w_k theta_k) / (W - w_k) itself, theta_k(counted) being what it sent (clipped and noised
under DP), not what it trained.
"""

from __future__ import annotations

from typing import Literal

import torch

from ..adapters import AdapterSpec, Layout
from ..core.errors import CheckpointError
from ..core.seeding import generator
from ..core.tensors import StateDict, clone
from .base import (ClientAlgorithm, ClientContext, ClientInfo, ClientState, Diagnostic, Options, Payload, Personalized,
                   Reply, SecureMean, ServerAlgorithm)

ROW, INDIVIDUAL = 0, 1  # expert slots, as the official code's LoRA0 / LoRA1


class FedALTOptions(Options):
    """Options of FedALT: the RoW weighting, the gate and Individual-LoRA inits, and the mixer."""

    weighting: Literal["uniform", "examples"] = "uniform"  # RoW mean: uniform (code) or by example count
    gate_init: Literal["kaiming", "zero"] = "kaiming"      # kaiming (code) or zero = 0.5/0.5 at the start
    init: Literal["shared", "independent"] = "shared"      # Individual LoRA init: same seed for all [REC] or per client (code)
    mixer: Literal["adaptive", "fixed"] = "adaptive"       # fixed = 0.5/0.5, the paper's "w/o mixer" ablation


def individual_init(spec: AdapterSpec, seed: int, options: FedALTOptions, client_id: str) -> StateDict:
    """Client `client_id`'s fresh Individual LoRA: seeded by the run, so the server can rebuild it too."""
    names = ("lora-init",) if options.init == "shared" else ("lora-init", client_id)
    return spec.init_lora(generator(seed, *names))


class FedALTServer(ServerAlgorithm):
    """Caches every client's latest Individual LoRA and serves leave-one-out means."""

    dp_amplified = False  # the sum holds every known Individual LoRA, also of clients not sampled this round
    secure_refusal = None

    def setup(self, clients: list[ClientInfo], rounds: int | None = None) -> None:
        """Start with no known Individual LoRA."""
        super().setup(clients, rounds)
        self.individual: dict[str, StateDict] = {}  # latest known, stale allowed under partial participation
        self._sum: StateDict = {}
        self._total = 0.0
        self.counted: dict[str, int] = {}  # secure: the round whose upload of each client the sum counts

    def _refresh_sum(self) -> None:
        # Summed afresh in client order, not updated by the replies (S += w (new - old)): a running update
        # rounds differently from the sum a resumed run rebuilds, and resume must equal an uninterrupted run
        # bitwise. It costs one pass over the known LoRAs per round (benchmarks/results/scale.md).
        known = [c for c in self.clients if c in self.individual]
        self._total = sum(self.weight(c) for c in known)
        self._sum = {}
        for cid in known:
            lora, w = self.individual[cid], self.weight(cid)
            for k, v in lora.items():
                self._sum[k] = self._sum[k] + w * v.double() if k in self._sum else w * v.double()
        if self.noise is not None and self._sum:  # central DP: noised once, before every leave-one-out
            self._sum = {k: v.double() for k, v in self.noise.noised_sum(self._sum, "row-sum").items()}

    def rest_of_world(self, cid: str) -> StateDict | None:
        """(S - w_k theta_k) / (W - w_k): the weighted mean of everyone else's Individual LoRA, or None if none
        (under a robust `federation.aggregation`, their median or trimmed mean)."""
        if self.aggregation.rule != "mean":
            others = {c: lora for c, lora in self.individual.items() if c != cid}
            return self.client_mean(others) if others else None
        own = self.individual.get(cid)
        w_own = self.weight(cid) if own is not None else 0.0
        if self._total - w_own <= 0:
            return None
        return {k: ((s - w_own * own[k].double()) if own is not None else s).div(self._total - w_own).float()
                for k, s in self._sum.items()}

    def configure(self, rnd: int, clients: list[str]) -> dict[str, Payload]:
        """Each client's Rest-of-World LoRA, once another client's Individual LoRA is known (secure: S and W)."""
        if self.secure:
            sums = {"row_sum": {k: v.float() for k, v in self._sum.items()}} if self._sum else {}
            return {cid: Payload(sums, {"upload_round": rnd, "row_weight": self._total, "counted_round": self.counted.get(cid, 0),
                                        "own_weight": self.weight(cid) if cid in self.counted else 0.0},
                                 frozenset({"individual_update"})) for cid in clients}
        payloads = {}
        for cid in clients:
            row = self.rest_of_world(cid)
            payloads[cid] = Payload({"row": row} if row is not None else {}, expects=frozenset({"individual"}))
        return payloads

    def aggregate(self, rnd: int, replies: dict[str, Reply]) -> None:
        """Keep the replies' Individual LoRAs and recompute the sum."""
        for cid, reply in replies.items():
            self.individual[cid] = reply.states["individual"]
        self._refresh_sum()

    def aggregate_secure(self, rnd: int, mean: SecureMean) -> None:
        """S += the weighted sum of the changes, plus the inits the changes of clients counted for the first time
        start from; W += those clients' weights."""
        change = self.secure_mean(mean, "individual_update")
        first = [cid for cid in mean.clients if cid not in self.counted]
        for k, v in change.items():
            add = v.double() * mean.weight
            self._sum[k] = self._sum[k] + add if k in self._sum else add
        for cid in first:
            for k, v in individual_init(self.spec, self.seed, self.options, cid).items():
                self._sum[k] = self._sum[k] + self.weight(cid) * v.double()
        self._total += sum(self.weight(cid) for cid in first)
        self.counted.update({cid: rnd for cid in mean.clients})

    def update_reference(self, client_id: str, name: str, payload: Payload, reply: Reply) -> StateDict | None:
        """An Individual LoRA is an update of the client's previous one (None before its first upload)."""
        return self.individual.get(client_id)

    def diagnostics(self) -> dict:
        """How many clients' Individual LoRAs are known (secure: counted in the sum)."""
        return {"known_individual_loras": len(self.counted if self.secure else self.individual)}

    def state_dict(self) -> dict:
        """Every known Individual LoRA and, under central DP, the noised sum sent (secure: the sum, its weight and
        what it counts)."""
        if self.secure:
            return {"tensors": {"row_sum": self._sum}, "meta": {"row_weight": self._total, "counted": self.counted,
                                                                "counts_inits": True}}
        tensors = {f"individual.{cid}": s for cid, s in self.individual.items()}
        if self.noise is not None and self._sum:  # noised again on load, it would be a second, uncounted release
            tensors["noised_sum"] = self._sum
        return {"tensors": tensors, "meta": {}}

    def load_state_dict(self, state: dict) -> None:
        """Restore the Individual LoRAs and the sum (secure: the sum itself)."""
        if self.secure:
            if not state["meta"].get("counts_inits"):
                raise CheckpointError("this secure FedALT checkpoint was written before its clients' inits entered "
                                      "the sum (fedlora 0.x, December 2026): the sum and the clients' records "
                                      "disagree; start the run anew")
            self._sum = dict(state["tensors"].get("row_sum", {}))
            self._total, self.counted = float(state["meta"]["row_weight"]), dict(state["meta"]["counted"])
            return
        tensors = dict(state["tensors"])
        noised = tensors.pop("noised_sum", None)
        self.individual = {name.removeprefix("individual."): s for name, s in tensors.items()}
        self._refresh_sum()
        if noised is not None:
            self._sum = dict(noised)


class FedALTClient(ClientAlgorithm):
    """Train the Individual LoRA and the gate with the RoW frozen; upload only the Individual LoRA."""

    def __init__(self, options: FedALTOptions, spec, seed: int) -> None:
        super().__init__(options, spec, seed)
        self.layout = Layout(2, "dense" if options.mixer == "adaptive" else "none")

    def _init_and_load(self, payload: Payload, state: ClientState, ctx: ClientContext) -> None:
        """Start a new client's Individual LoRA, RoW and gate; take the payload's RoW; load all three into ctx.model."""
        cid, s = ctx.client_id, state.states
        if "individual" not in s:
            s["individual"] = individual_init(self.spec, self.seed, self.options, cid)
            if "row_weight" in payload.config:  # secure: what the server's sum holds of this client, once counted
                s["counted"] = clone(s["individual"])
            s["row"] = self.spec.init_lora(generator(self.seed, "row-init", cid))  # B = 0: no effect until a download
            s["gate"] = self.spec.init_router(2, generator(self.seed, "gate-init", cid), zero=self.options.gate_init == "zero")
        if "row" in payload.states:
            s["row"] = payload.states["row"]
        if "row_weight" in payload.config:
            s["row"] = self._rest_of_world(payload, state) or s["row"]
        model = ctx.model
        model.load_expert(ROW, s["row"])
        model.load_expert(INDIVIDUAL, s["individual"])
        if self.options.mixer == "adaptive":
            model.load_router(s["gate"])
        else:
            model.set_expert_weights(torch.tensor([0.5, 0.5]))

    @staticmethod
    def started_from(name: str, payload: Payload, reply: Reply) -> StateDict | None:
        """An Individual LoRA is an update of the previous upload (None: the runtime keeps it); under secure
        aggregation the upload is already the change, an update of nothing."""
        if name == "individual_update":
            return {k: torch.zeros_like(v) for k, v in reply.states[name].items()}
        return None

    @staticmethod
    def _rest_of_world(payload: Payload, state: ClientState) -> StateDict | None:
        """Secure aggregation: (S - w_k theta_k) / (W - w_k), theta_k what the server's sum counts of client k."""
        s, cfg = state.states, payload.config
        if state.meta.get("uploaded_round") == cfg["counted_round"] and "sent" in s:
            # the server counted the last upload: its sum now holds that change as sent, clipped and noised under DP
            sent = s.pop("sent")
            s["counted"] = {k: v + sent[k] for k, v in s["counted"].items()}
        own = float(cfg["own_weight"])
        if "row_sum" not in payload.states or cfg["row_weight"] - own <= 0:
            return None
        total = payload.states["row_sum"]
        return {k: (v.double() - own * s["counted"][k].double()).div(cfg["row_weight"] - own).float()
                for k, v in total.items()}

    def fit(self, payload: Payload, state: ClientState, ctx: ClientContext) -> tuple[Reply, ClientState]:
        """Train the Individual LoRA (and the gate) with the RoW frozen; send the Individual LoRA (secure: its change
        since the upload the server's sum counts)."""
        self._init_and_load(payload, state, ctx)
        metrics = ctx.trainer.train(experts=[INDIVIDUAL], router=self.options.mixer == "adaptive")
        s = state.states
        s["individual"] = ctx.model.expert_state(INDIVIDUAL)
        if self.options.mixer == "adaptive":
            s["gate"] = ctx.model.router_state()
        if "row_weight" in payload.config:
            change = {k: v - s["counted"][k] for k, v in s["individual"].items()}
            state.meta["uploaded_round"] = payload.config["upload_round"]
            return Reply({"individual_update": change}, len(ctx.data.train), metrics), state
        return Reply({"individual": s["individual"]}, len(ctx.data.train), metrics), state

    def uploaded(self, reply: Reply, state: ClientState) -> ClientState:
        """Secure aggregation: keep the change as it left (clipped and noised under DP), what the sum will count."""
        if "individual_update" in reply.states:
            state.states["sent"] = clone(reply.states["individual_update"])
        return state

    def personalize(self, payload: Payload, state: ClientState, ctx: ClientContext) -> Personalized:
        """The RoW and Individual LoRAs mixed by the client's gate; mean gate weights as diagnostics."""
        self._init_and_load(payload, state, ctx)
        info: dict[str, Diagnostic] = {}
        if self.options.mixer == "adaptive":
            per_module = mean_gate_weights(ctx, INDIVIDUAL)
            info["gate_individual"] = sum(per_module.values()) / len(per_module)
            info["gate_individual_by_module"] = per_module
        return Personalized(diagnostics=info)


@torch.no_grad()
def mean_gate_weights(ctx: ClientContext, expert: int) -> dict[str, float]:
    """Mean gate weight of one expert over the first test batch's real tokens, per adapted module (a diagnostic)."""
    batch = ctx.trainer.first_batch(ctx.data.test)
    tokens = batch["attention_mask"].bool()
    weights: dict[str, float] = {}

    def record(path):
        return lambda mod, args, out: weights.__setitem__(path, float(mod.mixing_weights(args[0])[..., expert][tokens].mean()))

    hooks = [layer.register_forward_hook(record(path)) for path, layer in ctx.model.layers.items()]
    try:
        ctx.model.model.eval()
        ctx.trainer.forward_on(ctx.model.model, {k: v for k, v in batch.items() if k != "labels"})
    finally:
        for h in hooks:
            h.remove()
    return weights
