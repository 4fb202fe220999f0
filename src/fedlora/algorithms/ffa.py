"""FFA-LoRA (Sun et al., ICLR 2024): A frozen at a random init shared by every client, only B trained and
averaged. With a common A, mean(B) A = mean(B A): the aggregation is exact, and only B travels."""

from __future__ import annotations

from typing import Literal

from ..adapters import lora_part
from ..core.seeding import generator
from ..core.tensors import weighted_mean
from .base import ClientAlgorithm, ClientState, Options, Payload, Reply, ServerAlgorithm, uniform_or_examples


class FFAOptions(Options):
    weighting: Literal["examples", "uniform"] = "examples"


class FFAServer(ServerAlgorithm):
    """Holds the global B; A never leaves the seed it is drawn from."""

    def setup(self, clients, rounds=None) -> None:
        super().setup(clients, rounds)
        self.global_b = lora_part(self.spec.init_lora(generator(self.seed, "lora-init")), "B")

    def configure(self, rnd: int, clients: list[str]) -> dict[str, Payload]:
        return {cid: Payload({"b": self.global_b}) for cid in clients}

    def aggregate(self, rnd: int, replies: dict[str, Reply]) -> None:
        if replies:
            self.global_b = weighted_mean([r.states["b"] for r in replies.values()],
                                          uniform_or_examples(replies, self.options.weighting))

    def state_dict(self) -> dict:
        return {"tensors": {"b": self.global_b}, "meta": {}}

    def load_state_dict(self, state: dict) -> None:
        self.global_b = state["tensors"]["b"]


class FFAClient(ClientAlgorithm):
    """Rebuild the shared frozen A from the seed, train B only, send B."""

    def _load(self, payload: Payload, trainer) -> None:
        frozen_a = lora_part(self.spec.init_lora(generator(self.seed, "lora-init")), "A")
        trainer.adapted.load_expert(0, {**frozen_a, **payload.states["b"]})

    def fit(self, payload: Payload, state: ClientState, trainer) -> tuple[Reply, ClientState]:
        self._load(payload, trainer)
        metrics = trainer.train(experts=[0], parts="B")
        return Reply({"b": lora_part(trainer.adapted.expert_state(0), "B")}, len(trainer.data.train), metrics), state

    def evaluate(self, payload: Payload, state: ClientState, trainer) -> dict[str, float]:
        self._load(payload, trainer)
        return trainer.evaluate()
