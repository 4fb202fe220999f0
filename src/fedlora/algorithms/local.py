"""Local-only LoRA: every client trains its own LoRA on its own data; nothing is communicated."""

from __future__ import annotations

from typing import Literal

from ..core.seeding import generator
from ..training import Trainer
from .base import ClientAlgorithm, ClientState, Options, Payload, Personalized, Reply, ServerAlgorithm


class LocalOptions(Options):
    """Options of local-only training: one shared LoRA init for every client, or one per client."""

    init: Literal["shared", "independent"] = "shared"  # same LoRA init on every client, or one per client


class LocalServer(ServerAlgorithm):
    """Sends nothing and aggregates nothing."""


class LocalClient(ClientAlgorithm):
    """Train the private LoRA (slot 0) from where it stopped; nothing is aggregated, so any rank per client."""

    heterogeneous_ranks = True

    def _lora(self, state: ClientState, trainer) -> dict:
        if "lora" not in state.states:
            names = ("lora-init",) if self.options.init == "shared" else ("lora-init", trainer.client_id)
            state.states["lora"] = self.spec.init_lora(generator(self.seed, *names), r=trainer.adapted.rank)
        return state.states["lora"]

    def fit(self, payload: Payload, state: ClientState, trainer: Trainer) -> tuple[Reply, ClientState]:
        """Local: train the client's own LoRA further; the reply carries only the example count."""
        trainer.adapted.load_expert(0, self._lora(state, trainer))
        metrics = trainer.train(experts=[0])
        state.states["lora"] = trainer.adapted.expert_state(0)
        return Reply(num_examples=len(trainer.data.train), metrics=metrics), state

    def personalize(self, payload: Payload, state: ClientState, trainer: Trainer) -> Personalized:
        """Local: the client's own LoRA."""
        trainer.adapted.load_expert(0, self._lora(state, trainer))
        return Personalized()
