"""FedEx-LoRA (Singhal, Ponkshe, Vepakomma, ACL 2025): exact aggregation through a residual in the base weights.

Averaging A and B separately (FedIT) is not averaging the clients' updates B_k A_k. FedEx-LoRA sends the means
and folds the difference into the frozen base weight of every adapted module, where it stays:
    A <- sum_k p_k A_k,    B <- sum_k p_k B_k,
    W0 <- W0 + s R,        R = sum_k p_k B_k A_k - B A,    s = alpha / r,
so that right after aggregation every client's W0 + s B A = W0(before) + s sum_k p_k B_k A_k, the mean of the
clients' full updates, exactly. The official code (CERT-Lab/fedex-lora @2fa2e4a, `fed_agg.py`
`aggregate_models_ours`) weights uniformly (p_k = 1/K: `weighting = "uniform"` here) and sends R dense; here R
travels factored, as FLoRA's stack of the clients' B_k, A_k with one more column -s B and row A (rank (K+1) r
instead of d_out x d_in, the same product), and each client keeps the sum of the residuals it merged, kept
private like its head (the official code also averages the classification head; fedlora's heads are private).
"""

from __future__ import annotations

from typing import Literal

import torch

from ..core.errors import ConfigError
from ..core.tensors import StateDict, clone
from .base import (Aggregation, AveragingOptions, ClientAlgorithm, ClientContext, ClientInfo, ClientState, Payload,
                   Personalized, Reply)
from .flora import FLoRAClient, FLoRAServer, stack


class FedExOptions(AveragingOptions):
    """FedEx-LoRA: the official code's uniform mean (example weighting keeps the aggregation exact too)."""

    weighting: Literal["examples", "uniform"] = "uniform"


def residual_stack(loras: list[StateDict], weights: list[float], mean: StateDict, alpha: float) -> StateDict:
    """s (sum_k p_k B_k A_k - B A) as stacked factors: the clients' stack plus the column -s B and the row A."""
    out = stack(loras, weights, alpha)
    for key in [k for k in out if k.endswith(".lora_B")]:
        path = key.removesuffix(".lora_B")
        a, b = mean[f"{path}.lora_A"], mean[f"{path}.lora_B"]
        out[key] = torch.cat([out[key], -alpha / a.shape[0] * b], dim=1)
        out[f"{path}.lora_A"] = torch.cat([out[f"{path}.lora_A"], a], dim=0)
    return out


class FedExServer(FLoRAServer):
    """The global LoRA (the mean of A and of B) and each round's residual until every client has merged it."""

    heterogeneous_ranks = False  # the means of A and of B need one rank
    secure_refusal = ("its residual is built from each client's LoRA (kept factored, as FLoRA's stack); a secure "
                      "version would sum dense d_out x d_in products per module, which is not built")
    dp_refusals = {"client_clipping": "the residual holds every client's product B_k A_k unnoised (only the means of "
                                      "A and B would be); use privacy.dp='local'"}

    def __init__(self, options: FedExOptions, spec, seed: int, aggregation: Aggregation = Aggregation()) -> None:
        if aggregation.rule != "mean":  # the residual makes the mean of the products exact, not a median's
            raise ConfigError(f"fedex makes the mean of the clients' updates exact and cannot take "
                              f"federation.aggregation={aggregation.rule!r}; use 'mean' (and federation.update_clip "
                              "against outliers)")
        super().__init__(options, spec, seed, aggregation)

    def setup(self, clients: list[ClientInfo], rounds: int | None = None) -> None:
        """Start from the shared seeded LoRA init, with no residuals."""
        super().setup(clients, rounds)
        self.global_lora = clone(self.lora_init())

    def configure(self, rnd: int, clients: list[str]) -> dict[str, Payload]:
        """The global LoRA and each client's unmerged residuals; the reply carries the trained global LoRA."""
        return {cid: Payload({"global": self.global_lora, **self._pending(cid)}, expects=frozenset({"global"}))
                for cid in clients}

    def configure_evaluate(self, rnd: int, clients: list[str]) -> dict[str, Payload]:
        """The same, for evaluation."""
        return {cid: Payload({"global": self.global_lora, **self._pending(cid)}) for cid in clients}

    def aggregate(self, rnd: int, replies: dict[str, Reply]) -> None:
        """A and B averaged; the residual of this round's products kept as its stack."""
        for cid in replies:  # they merged every residual up to the previous round before training
            self.merged_up_to[cid] = max(self.stacks, default=0)
        if replies:
            loras = {cid: r.states["global"] for cid, r in replies.items()}
            mean = self.client_mean(loras)
            self.stacks[rnd] = residual_stack(list(loras.values()), [self.weight(cid) for cid in loras], mean,
                                              self.spec.alpha)
            self.global_lora = mean
        oldest_needed = min(self.merged_up_to.values())
        self.stacks = {t: s for t, s in self.stacks.items() if t > oldest_needed}

    def state_dict(self) -> dict:
        """The global LoRA, the residuals not merged everywhere and each client's last merged round."""
        state = super().state_dict()
        state["tensors"]["global"] = self.global_lora
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` saved."""
        tensors = dict(state["tensors"])
        self.global_lora = tensors.pop("global")
        super().load_state_dict({"tensors": tensors, "meta": state["meta"]})


class FedExClient(FLoRAClient):
    """Merge the received residuals into the local base, train the global LoRA on top of it, send it back."""

    rank_problem = ClientAlgorithm.rank_problem  # every client at lora.r

    def fit(self, payload: Payload, state: ClientState, ctx: ClientContext) -> tuple[Reply, ClientState]:
        """Merge the pending residuals, then train the global LoRA and send it."""
        state.states["merged"] = self._merged(payload, state, record=True)
        with ctx.model.base_delta(state.states["merged"]):
            ctx.model.load_expert(0, payload.states["global"])
            metrics = ctx.trainer.train(experts=[0])
            lora = ctx.model.expert_state(0)
        return Reply({"global": lora}, len(ctx.data.train), metrics), state

    def personalize(self, payload: Payload, state: ClientState, ctx: ClientContext) -> Personalized:
        """The base with every residual merged, under the global LoRA."""
        ctx.model.load_expert(0, payload.states["global"])
        return Personalized(base_delta=self._merged(payload, state))
