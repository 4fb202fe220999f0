"""FedIT: FedAvg on LoRA. The server averages A and B separately; everyone trains and uses the global LoRA."""

from __future__ import annotations

from .base import BroadcastAverageServer, ClientAlgorithm, ClientState, Payload, Personalized, Reply


class FedITServer(BroadcastAverageServer):
    """Holds the global LoRA; aggregate: A = sum p_k A_k, B = sum p_k B_k."""


class FedITClient(ClientAlgorithm):
    """Start from the global LoRA, train it, send it back."""

    def fit(self, payload: Payload, state: ClientState, trainer) -> tuple[Reply, ClientState]:
        trainer.adapted.load_expert(0, payload.states["global"])
        metrics = trainer.train(experts=[0])
        return Reply({"global": trainer.adapted.expert_state(0)}, len(trainer.data.train), metrics), state

    def personalize(self, payload: Payload, state: ClientState, trainer) -> Personalized:
        trainer.adapted.load_expert(0, payload.states["global"])
        return Personalized()
