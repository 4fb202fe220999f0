"""FedSA-LoRA (Guo et al., ICLR 2025): A and B both train; only A is uploaded and averaged (general
knowledge); B stays on the client (client-specific knowledge)."""

from __future__ import annotations

from ..adapters import lora_part
from ..core.seeding import generator
from ..core.tensors import StateDict
from .base import BroadcastAverageServer, ClientAlgorithm, ClientContext, ClientState, Payload, Personalized, Reply


class FedSAServer(BroadcastAverageServer):
    """Holds the global A."""

    state_name = "a"

    def initial_state(self) -> StateDict:
        """The A half of the shared seeded LoRA init."""
        return lora_part(super().initial_state(), "A")


class FedSAClient(ClientAlgorithm):
    """Global A + private B (zero at the start); train both; send A."""

    def _load(self, payload: Payload, state: ClientState, ctx: ClientContext) -> None:
        if "b" not in state.states:
            state.states["b"] = lora_part(self.spec.init_lora(generator(self.seed, "lora-init")), "B")
        ctx.model.load_expert(0, {**payload.states["a"], **state.states["b"]})

    def fit(self, payload: Payload, state: ClientState, ctx: ClientContext) -> tuple[Reply, ClientState]:
        """Train the global A with the private B; keep B, send A."""
        self._load(payload, state, ctx)
        metrics = ctx.trainer.train(experts=[0])
        trained = ctx.model.expert_state(0)
        state.states["b"] = lora_part(trained, "B")
        return Reply({"a": lora_part(trained, "A")}, len(ctx.data.train), metrics), state

    def personalize(self, payload: Payload, state: ClientState, ctx: ClientContext) -> Personalized:
        """The global A with the client's private B."""
        self._load(payload, state, ctx)
        return Personalized()
