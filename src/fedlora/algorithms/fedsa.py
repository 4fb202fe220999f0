"""FedSA-LoRA (Guo et al., ICLR 2025): A and B both train; only A is uploaded and averaged (general
knowledge); B stays on the client (client-specific knowledge)."""

from __future__ import annotations

from ..adapters import lora_part
from ..core.seeding import generator
from ..core.tensors import StateDict
from ..training import Trainer
from .base import BroadcastAverageServer, ClientAlgorithm, ClientState, Payload, Personalized, Reply


class FedSAServer(BroadcastAverageServer):
    """Holds the global A."""

    state_name = "a"

    def initial_state(self) -> StateDict:
        """FedSA: the A half of the shared seeded LoRA init."""
        return lora_part(super().initial_state(), "A")


class FedSAClient(ClientAlgorithm):
    """Global A + private B (zero at the start); train both; send A."""

    def _load(self, payload: Payload, state: ClientState, trainer) -> None:
        if "b" not in state.states:
            state.states["b"] = lora_part(self.spec.init_lora(generator(self.seed, "lora-init")), "B")
        trainer.adapted.load_expert(0, {**payload.states["a"], **state.states["b"]})

    def fit(self, payload: Payload, state: ClientState, trainer: Trainer) -> tuple[Reply, ClientState]:
        """FedSA: train the global A with the private B; keep B, send A."""
        self._load(payload, state, trainer)
        metrics = trainer.train(experts=[0])
        trained = trainer.adapted.expert_state(0)
        state.states["b"] = lora_part(trained, "B")
        return Reply({"a": lora_part(trained, "A")}, len(trainer.data.train), metrics), state

    def personalize(self, payload: Payload, state: ClientState, trainer: Trainer) -> Personalized:
        """FedSA: the global A with the client's private B."""
        self._load(payload, state, trainer)
        return Personalized()
