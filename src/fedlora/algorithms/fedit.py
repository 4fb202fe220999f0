"""FedIT: FedAvg on LoRA. The server averages A and B separately; everyone trains and uses the global LoRA."""

from __future__ import annotations

from ..training import Trainer
from .base import BroadcastAverageServer, ClientAlgorithm, ClientState, Payload, Personalized, Reply


class FedITServer(BroadcastAverageServer):
    """Holds the global LoRA; aggregate: A = sum p_k A_k, B = sum p_k B_k."""


class FedITClient(ClientAlgorithm):
    """Start from the global LoRA, train it, send it back."""

    def fit(self, payload: Payload, state: ClientState, trainer: Trainer) -> tuple[Reply, ClientState]:
        """FedIT: load the global LoRA, train it and send it back."""
        trainer.adapted.load_expert(0, payload.states["global"])
        metrics = trainer.train(experts=[0])
        return Reply({"global": trainer.adapted.expert_state(0)}, len(trainer.data.train), metrics), state

    def personalize(self, payload: Payload, state: ClientState, trainer: Trainer) -> Personalized:
        """FedIT: the personalized model is the global LoRA."""
        trainer.adapted.load_expert(0, payload.states["global"])
        return Personalized()
