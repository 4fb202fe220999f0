"""FedAvgM on LoRA (Hsu, Qi and Brown 2019, "Measuring the effects of non-identical data distribution for federated
visual classification"): FedAvg with server momentum, on LoRA A and B separately, written as any method outside
fedlora is written (docs/new-method.md).

Each round t, with the global LoRA w_t, the clients' trained LoRAs w_k and their weights p_k:
    mean     = sum_k p_k w_k                     (fedlora's client_mean: FedAvg, or the robust/DP rule configured)
    delta    = w_t - mean                        (the pseudo-gradient)
    v_{t+1}  = momentum * v_t + delta
    w_{t+1}  = w_t - server_lr * v_{t+1}
momentum = 0 and server_lr = 1 is FedAvg (fedlora's `fedit`) exactly. Every client trains and uses the global LoRA.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from fedlora import AveragingOptions, BroadcastAverageServer, Method, Reply, SecureMean
from fedlora.algorithms import FedITClient


class FedAvgMOptions(AveragingOptions):
    """`algorithm.options` of fedavgm (AveragingOptions adds `weighting`: "examples" or "uniform")."""

    momentum: float = Field(0.9, ge=0.0, lt=1.0)  # beta; Hsu et al. sweep 0.7-0.99, 0.9 is their common choice
    server_lr: float = Field(1.0, gt=0.0)         # eta; with beta = 0.9 they keep eta (1 - beta) near 0.1-1


class FedAvgMServer(BroadcastAverageServer):
    """Holds the global LoRA and its momentum; aggregate: one server-momentum step towards the clients' mean."""

    def setup(self, clients, rounds=None) -> None:
        """The global LoRA from the shared seeded init, and no momentum yet."""
        super().setup(clients, rounds)
        self.velocity = {k: torch.zeros_like(v) for k, v in self.global_state.items()}

    def aggregate(self, rnd: int, replies: dict[str, Reply]) -> None:
        """v = momentum v + (w - mean); w = w - server_lr v (nothing changes in a round without replies)."""
        if replies:
            self._step(self.client_mean({cid: r.states["global"] for cid, r in replies.items()}))

    def aggregate_secure(self, rnd: int, mean: SecureMean) -> None:
        """The same step under federation.secure_aggregation, from the round's secure mean."""
        self._step(self.secure_mean(mean, "global"))

    def _step(self, mean: dict[str, torch.Tensor]) -> None:
        opts = self.options
        for key, w in self.global_state.items():
            self.velocity[key] = opts.momentum * self.velocity[key] + (w - mean[key])
            self.global_state[key] = w - opts.server_lr * self.velocity[key]

    def state_dict(self) -> dict[str, Any]:
        """The global LoRA and the momentum: a resumed run continues exactly."""
        return {"tensors": {"global": self.global_state, "velocity": self.velocity}, "meta": {}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` saved."""
        self.global_state = state["tensors"]["global"]
        self.velocity = state["tensors"]["velocity"]


# The client side is FedAvg's own (load the global LoRA, train it, send it back; the personalized model is the
# global LoRA): an outside method reuses fedlora's building blocks like any other library's.
FedAvgMClient = FedITClient


METHOD = Method("fedavgm", FedAvgMServer, FedAvgMClient, FedAvgMOptions,
                "FedAvgM: FedAvg with server momentum on LoRA A and B (example of an outside method)")
