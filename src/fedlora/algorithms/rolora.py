"""RoLoRA (Chen, Guo, Ju, Dalal, Zhu, Khisti, NeurIPS 2025): alternating minimisation of LoRA's two factors.

Rounds alternate between the factors: in a B-round every client trains B on the shared global A (frozen) and the
server averages the B's; in an A-round the roles swap. With the frozen factor shared,
    sum_k p_k B_k A = (sum_k p_k B_k) A,
so each round's aggregation is exact, and each round moves one factor up. Checked against the authors' code (the
OpenReview supplement, FederatedScope-LLM, as vendored in viftode4/scalable-learning @17862bb; docs/research/
baselines-2025.md, section 3): round 1 trains B (A at the kaiming init, B at zero), then A, B, ...; p_k by example
counts. The downlink here is the whole global LoRA (a client that missed rounds needs the factor it did not see;
the code's clients share one model object in a single process), the uplink the trained factor only.
"""

from __future__ import annotations

from typing import Literal

from ..adapters import lora_part
from ..core.tensors import StateDict, clone
from .base import (AveragingOptions, ClientAlgorithm, ClientContext, ClientInfo, ClientState, Payload, Personalized,
                   Reply, SecureMean, ServerAlgorithm)


class RoLoRAOptions(AveragingOptions):
    """RoLoRA: which factor the first round trains (the code: B, on A's random init)."""

    first: Literal["B", "A"] = "B"


class RoLoRAServer(ServerAlgorithm):
    """The global LoRA; each round replaces the factor it trained by the clients' mean of it."""

    def setup(self, clients: list[ClientInfo], rounds: int | None = None) -> None:
        """Start from the shared seeded LoRA init (B = 0)."""
        super().setup(clients, rounds)
        self.global_state = clone(self.lora_init())

    def trained(self, rnd: int) -> str:
        """The factor round `rnd` trains, "a" or "b": the first one in odd rounds, the other in even ones."""
        first = self.options.first.lower()
        return first if rnd % 2 == 1 else ("a" if first == "b" else "b")

    def _factors(self) -> dict[str, StateDict]:
        return {"a": lora_part(self.global_state, "A"), "b": lora_part(self.global_state, "B")}

    def configure(self, rnd: int, clients: list[str]) -> dict[str, Payload]:
        """Both factors; the reply carries the one this round trains."""
        name = self.trained(rnd)
        return {cid: Payload(self._factors(), {"train": name}, frozenset({name})) for cid in clients}

    def configure_evaluate(self, rnd: int, clients: list[str]) -> dict[str, Payload]:
        """Both factors, for evaluation."""
        return {cid: Payload(self._factors()) for cid in clients}

    def aggregate(self, rnd: int, replies: dict[str, Reply]) -> None:
        """The trained factor becomes the clients' mean of it; the frozen one is unchanged."""
        if replies:
            name = self.trained(rnd)
            self.global_state = {**self.global_state, **self.client_mean({c: r.states[name] for c, r in replies.items()})}

    secure_refusal = None

    def aggregate_secure(self, rnd: int, mean: SecureMean) -> None:
        """The trained factor becomes its securely aggregated mean."""
        self.global_state = {**self.global_state, **self.secure_mean(mean, self.trained(rnd))}

    def state_dict(self) -> dict:
        """The global LoRA."""
        return {"tensors": {"global": self.global_state}, "meta": {}}

    def load_state_dict(self, state: dict) -> None:
        """Restore the global LoRA."""
        self.global_state = state["tensors"]["global"]


class RoLoRAClient(ClientAlgorithm):
    """Train the factor the round names on the other, frozen, and send it."""

    def fit(self, payload: Payload, state: ClientState, ctx: ClientContext) -> tuple[Reply, ClientState]:
        """Load the global LoRA, train one factor, send it."""
        name = payload.config["train"]
        ctx.model.load_expert(0, {**payload.states["a"], **payload.states["b"]})
        metrics = ctx.trainer.train(experts=[0], parts=name.upper())
        return Reply({name: lora_part(ctx.model.expert_state(0), name.upper())}, len(ctx.data.train), metrics), state

    def personalize(self, payload: Payload, state: ClientState, ctx: ClientContext) -> Personalized:
        """The global LoRA."""
        ctx.model.load_expert(0, {**payload.states["a"], **payload.states["b"]})
        return Personalized()
