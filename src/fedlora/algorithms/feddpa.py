"""FedDPA (Yang et al., NeurIPS 2024): a global LoRA (FedAvg) and a local LoRA that never leaves the client,
combined at inference with instance-wise weights (spec section 5).

  FedDPA-T: each round, train the local LoRA with the global frozen (mixed 0.5/0.5), then the global alone.
  FedDPA-F: each round, train the global alone; in the last round, also fine-tune the local LoRA with the
            global frozen (mixed 0.5/0.5).
  Inference: w(x) = max_weight * mean_i cos(h(x), h(x_i)) over 5 random local training examples x_i, h the
  last-layer state of the last prompt token with the local adapter active; y = W0 x + w dW_global x +
  (1 - w) dW_local x, the direction the official code uses (`direction=local_gets_w` swaps it).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from ..adapters import Layout
from ..core.seeding import generator
from ..training import InstanceWeighting
from .base import (AveragingOptions, BroadcastAverageServer, ClientAlgorithm, ClientContext, ClientState, Payload,
                   Personalized, Reply)

GLOBAL, LOCAL = 0, 1


class FedDPAOptions(AveragingOptions):
    """Options of FedDPA: the variant (T or F), the training mix, instance-wise weighting and the budget split."""

    variant: Literal["T", "F"] = "T"
    train_mix: float = Field(0.5, ge=0, le=1)         # local's weight while the local LoRA trains ([a, 1-a] = 0.5/0.5)
    max_weight: float = Field(0.5, ge=0, le=1)
    reference_examples: int = Field(5, ge=1)
    direction: Literal["global_gets_w", "local_gets_w"] = "global_gets_w"  # the code: global w, local 1 - w
    # variant T trains two LoRAs per round, each for the whole local budget (the code). True: the local LoRA
    # gets ceil(S/2) steps and the global floor(S/2), so a comparison gives every method S steps per round.
    split_budget: bool = False


class FedDPAServer(BroadcastAverageServer):
    """FedAvg of the global LoRA, as FedIT; tells clients when FedDPA-F's local fine-tuning is due."""

    def payload_config(self, rnd: int) -> dict:
        """Whether the local LoRA trains this round (every round for T, the last one for F)."""
        return {"finetune_local": self.options.variant == "T" or rnd == self.rounds}


class FedDPAClient(ClientAlgorithm):
    """Slot 0 = global LoRA, slot 1 = local LoRA, fixed (or instance-wise) mixing weights."""

    layout = Layout(2, "none")

    def _load(self, payload: Payload, state: ClientState, ctx: ClientContext) -> None:
        if "local" not in state.states:
            state.states["local"] = self.spec.init_lora(generator(self.seed, "local-init", ctx.client_id))
        ctx.model.load_expert(GLOBAL, payload.states["global"])
        ctx.model.load_expert(LOCAL, state.states["local"])

    def fit(self, payload: Payload, state: ClientState, ctx: ClientContext) -> tuple[Reply, ClientState]:
        """Train the global LoRA, and the local one when due (T: first, every round; F: last round)."""
        self._load(payload, state, ctx)
        model, mix = ctx.model, self.options.train_mix
        metrics: dict[str, float] = {}
        local_steps = global_steps = None  # the whole budget for each pass
        if self.options.variant == "T" and self.options.split_budget:
            total = ctx.trainer.num_steps()
            global_steps = max(1, total // 2)
            local_steps = max(1, total - global_steps)
        if self.options.variant == "T":
            metrics["local_train_loss"] = self._train_local(ctx, mix, local_steps)
        model.set_expert_weights([1.0, 0.0])  # the global LoRA trains alone, as in FedIT
        metrics.update(ctx.trainer.train(experts=[GLOBAL], steps=global_steps))
        if self.options.variant == "F" and payload.config.get("finetune_local"):
            metrics["local_train_loss"] = self._train_local(ctx, mix)
        state.states["local"] = model.expert_state(LOCAL)
        return Reply({"global": model.expert_state(GLOBAL)}, len(ctx.data.train), metrics), state

    @staticmethod
    def _train_local(ctx: ClientContext, mix: float, steps: int | None = None) -> float:
        ctx.model.set_expert_weights([1.0 - mix, mix])
        return ctx.trainer.train(experts=[LOCAL], steps=steps)["train_loss"]

    def personalize(self, payload: Payload, state: ClientState, ctx: ClientContext) -> Personalized:
        """Both LoRAs, mixed by instance-wise weights from a few local reference examples."""
        self._load(payload, state, ctx)
        data = ctx.data.train
        g = generator(self.seed, "feddpa-reference", ctx.client_id)
        refs = torch.randperm(len(data), generator=g)[: self.options.reference_examples].tolist()
        hook = InstanceWeighting.from_examples(ctx.model, ctx.trainer.batch(data, refs),
                                               self.options.max_weight, GLOBAL if self.options.direction == "global_gets_w"
                                               else LOCAL, probe=LOCAL)
        return Personalized(hook=hook)
