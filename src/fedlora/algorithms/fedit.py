"""FedAvg on LoRA. The server averages A and B separately; everyone trains and uses the global LoRA."""

from __future__ import annotations

from .base import BroadcastAverageServer, ClientAlgorithm, ClientContext, ClientState, Payload, Personalized, Reply


class FedITServer(BroadcastAverageServer):
    """Holds the global LoRA; aggregate: A = sum p_k A_k, B = sum p_k B_k."""


class FedITClient(ClientAlgorithm):
    """Start from the global LoRA, train it, send it back."""

    def fit(self, payload: Payload, state: ClientState, ctx: ClientContext) -> tuple[Reply, ClientState]:
        """Load the global LoRA, train it and send it back."""
        ctx.model.load_expert(0, payload.states["global"])
        metrics = ctx.trainer.train(experts=[0])
        return Reply({"global": ctx.model.expert_state(0)}, len(ctx.data.train), metrics), state

    def personalize(self, payload: Payload, state: ClientState, ctx: ClientContext) -> Personalized:
        """The personalized model is the global LoRA."""
        ctx.model.load_expert(0, payload.states["global"])
        return Personalized()
