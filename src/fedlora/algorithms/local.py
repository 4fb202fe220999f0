"""Local-only LoRA: every client trains its own LoRA on its own data; nothing is communicated."""

from __future__ import annotations

from typing import Literal

from ..core.seeding import generator
from .base import ClientAlgorithm, ClientContext, ClientState, Options, Payload, Personalized, Reply, ServerAlgorithm


class LocalOptions(Options):
    """Options of local-only training: one shared LoRA init for every client, or one per client."""

    init: Literal["shared", "independent"] = "shared"  # same LoRA init on every client, or one per client


class LocalServer(ServerAlgorithm):
    """Sends nothing and aggregates nothing."""

    secure_refusal = "every client trains alone: nothing is sent, so there is nothing to aggregate securely"
    heterogeneous_ranks = True


class LocalClient(ClientAlgorithm):
    """Train the private LoRA (slot 0) from where it stopped; nothing is aggregated, so any rank per client."""

    def rank_problem(self, ranks: dict[str, int]) -> str | None:
        """Any rank: nothing is aggregated."""
        return None


    def _lora(self, state: ClientState, ctx: ClientContext) -> dict:
        if "lora" not in state.states:
            names = ("lora-init",) if self.options.init == "shared" else ("lora-init", ctx.client_id)
            state.states["lora"] = self.spec.init_lora(generator(self.seed, *names), r=ctx.model.rank)
        return state.states["lora"]

    def fit(self, payload: Payload, state: ClientState, ctx: ClientContext) -> tuple[Reply, ClientState]:
        """Train the client's own LoRA further; the reply carries only the example count."""
        ctx.model.load_expert(0, self._lora(state, ctx))
        metrics = ctx.trainer.train(experts=[0])
        state.states["lora"] = ctx.model.expert_state(0)
        return Reply(num_examples=len(ctx.data.train), metrics=metrics), state

    def personalize(self, payload: Payload, state: ClientState, ctx: ClientContext) -> Personalized:
        """The client's own LoRA."""
        ctx.model.load_expert(0, self._lora(state, ctx))
        return Personalized()
