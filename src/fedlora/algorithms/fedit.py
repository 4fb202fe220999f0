"""FedIT: FedAvg on LoRA. The server averages A and B separately; everyone trains and uses the global LoRA."""

from __future__ import annotations

from typing import Literal

from ..core.seeding import generator
from ..core.tensors import weighted_mean
from .base import ClientAlgorithm, ClientState, Options, Payload, Reply, ServerAlgorithm, uniform_or_examples


class FedITOptions(Options):
    weighting: Literal["examples", "uniform"] = "examples"  # p_k proportional to n_k, as FedAvg


class FedITServer(ServerAlgorithm):
    """Holds the global LoRA; aggregate: A = sum p_k A_k, B = sum p_k B_k."""

    def setup(self, clients, rounds=None) -> None:
        super().setup(clients, rounds)
        self.global_lora = self.spec.init_lora(generator(self.seed, "lora-init"))

    def configure(self, rnd: int, clients: list[str]) -> dict[str, Payload]:
        return {cid: Payload({"global": self.global_lora}) for cid in clients}

    def aggregate(self, rnd: int, replies: dict[str, Reply]) -> None:
        if replies:
            self.global_lora = weighted_mean([r.states["global"] for r in replies.values()],
                                             uniform_or_examples(replies, self.options.weighting))

    def state_dict(self) -> dict:
        return {"tensors": {"global": self.global_lora}, "meta": {}}

    def load_state_dict(self, state: dict) -> None:
        self.global_lora = state["tensors"]["global"]


class FedITClient(ClientAlgorithm):
    """Start from the global LoRA, train it, send it back."""

    def fit(self, payload: Payload, state: ClientState, trainer) -> tuple[Reply, ClientState]:
        trainer.adapted.load_expert(0, payload.states["global"])
        metrics = trainer.train(experts=[0])
        return Reply({"global": trainer.adapted.expert_state(0)}, len(trainer.data.train), metrics), state

    def evaluate(self, payload: Payload, state: ClientState, trainer) -> dict[str, float]:
        trainer.adapted.load_expert(0, payload.states["global"])
        return trainer.evaluate()
