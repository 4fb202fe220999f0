"""FFA-LoRA (Sun et al., ICLR 2024): A frozen at a random init shared by every client, only B trained and
averaged. With a common A, mean(B) A = mean(B A): the aggregation is exact, and only B travels."""

from __future__ import annotations

from ..adapters import lora_part
from ..core.seeding import generator
from ..core.tensors import StateDict
from .base import BroadcastAverageServer, ClientAlgorithm, ClientContext, ClientState, Payload, Personalized, Reply


class FFAServer(BroadcastAverageServer):
    """Holds the global B; A never leaves the seed it is drawn from."""

    state_name = "b"

    def initial_state(self) -> StateDict:
        """The B half of the shared seeded LoRA init."""
        return lora_part(super().initial_state(), "B")


class FFAClient(ClientAlgorithm):
    """Rebuild the shared frozen A from the seed, train B only, send B."""

    def _load(self, payload: Payload, ctx: ClientContext) -> None:
        frozen_a = lora_part(self.spec.init_lora(generator(self.seed, "lora-init")), "A")
        ctx.model.load_expert(0, {**frozen_a, **payload.states["b"]})

    def fit(self, payload: Payload, state: ClientState, ctx: ClientContext) -> tuple[Reply, ClientState]:
        """Train B on the frozen A rebuilt from the seed; send B."""
        self._load(payload, ctx)
        metrics = ctx.trainer.train(experts=[0], parts="B")
        return Reply({"b": lora_part(ctx.model.expert_state(0), "B")}, len(ctx.data.train), metrics), state

    def personalize(self, payload: Payload, state: ClientState, ctx: ClientContext) -> Personalized:
        """The global B on the frozen A rebuilt from the seed."""
        self._load(payload, ctx)
        return Personalized()
