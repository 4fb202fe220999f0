"""FLoRA (Wang et al., NeurIPS 2024): stacking aggregation, which allows heterogeneous client ranks.

The server stacks the clients' weighted B column-wise and their A row-wise,
    B_stack = [p_1 s_1 B_1, ..., p_K s_K B_K],   A_stack = [A_1; ...; A_K],   s_k = alpha / r_k,
so that B_stack A_stack = sum_k p_k s_k B_k A_k exactly (no cross terms). Clients merge every received
stack into their frozen base weights and start a fresh LoRA of their own rank r_k each round
(`clients.lora_r`, or the older `algorithm.options.ranks`; default lora.r).
"""

from __future__ import annotations

import torch
from pydantic import Field

from ..adapters import Layout
from ..core.errors import ConfigError
from ..core.seeding import generator
from ..core.tensors import StateDict
from ..training import Trainer
from .base import (AveragingOptions, ClientAlgorithm, ClientInfo, ClientState, Payload, Personalized, Reply,
                   ServerAlgorithm)


class FLoRAOptions(AveragingOptions):
    """Options of FLoRA: the weighting and the older per-client `ranks`."""

    ranks: list[int] | None = Field(None, description="one LoRA rank per client, in client order (default lora.r); "
                                   "clients.lora_r is the general spelling")


def stack(loras: list[StateDict], weights: list[float], alpha: float) -> StateDict:
    """The stacked update of one round: B columns p_k (alpha/r_k) B_k, A rows A_k; weights are normalised."""
    total = sum(weights)
    paths = [k.removesuffix(".lora_A") for k in loras[0] if k.endswith(".lora_A")]
    out: StateDict = {}
    for p in paths:
        scaled_b = [w / total * alpha / lora[f"{p}.lora_A"].shape[0] * lora[f"{p}.lora_B"] for lora, w in zip(loras, weights)]
        out[f"{p}.lora_B"] = torch.cat(scaled_b, dim=1)
        out[f"{p}.lora_A"] = torch.cat([lora[f"{p}.lora_A"] for lora in loras], dim=0)
    return out


def stack_delta(stacked: StateDict) -> StateDict:
    """The dense base update B_stack A_stack of a stack, per module path."""
    paths = [k.removesuffix(".lora_A") for k in stacked if k.endswith(".lora_A")]
    return {p: stacked[f"{p}.lora_B"] @ stacked[f"{p}.lora_A"] for p in paths}


def stack_key(rnd: int) -> str:
    """Payload name of the stack aggregated in round `rnd`."""
    return f"stack_{rnd}"


class FLoRAServer(ServerAlgorithm):
    """Keeps each round's stack until every client has merged it."""

    heterogeneous_ranks = True

    def setup(self, clients: list[ClientInfo], rounds: int | None = None) -> None:
        """FLoRA: check `options.ranks` against the clients and start with no stacks."""
        super().setup(clients, rounds)
        ranks = self.options.ranks or []
        if ranks and len(ranks) != len(clients):
            raise ConfigError(f"algorithm.options.ranks has {len(ranks)} entries for {len(clients)} clients; "
                              "give one rank per client, in client order")
        self.ranks = dict(zip(self.clients, ranks))  # sent to clients; without it they train their clients.lora_r
        self.stacks: dict[int, StateDict] = {}
        self.merged_up_to = {cid: 0 for cid in self.clients}  # the last round whose stack the client has merged

    def _payload(self, cid: str) -> Payload:
        pending = {stack_key(t): s for t, s in sorted(self.stacks.items()) if t > self.merged_up_to[cid]}
        return Payload(pending, {"rank": self.ranks[cid]} if cid in self.ranks else {})

    def configure(self, rnd: int, clients: list[str]) -> dict[str, Payload]:
        """FLoRA: each client's unmerged stacks (and its rank, if `options.ranks` sets one)."""
        return {cid: self._payload(cid) for cid in clients}

    def configure_evaluate(self, rnd: int, clients: list[str]) -> dict[str, Payload]:
        """FLoRA: the same unmerged stacks, for evaluation."""
        return {cid: self._payload(cid) for cid in clients}

    def aggregate(self, rnd: int, replies: dict[str, Reply]) -> None:
        """FLoRA: stack the replies' LoRAs into this round's stack; drop stacks every client has merged."""
        for cid in replies:  # they merged every stack up to the previous round before training
            self.merged_up_to[cid] = max(self.stacks, default=0)
        if replies:
            self.stacks[rnd] = stack([r.states["lora"] for r in replies.values()],
                                     [self.weight(cid) for cid in replies], self.spec.alpha)
        oldest_needed = min(self.merged_up_to.values())
        self.stacks = {t: s for t, s in self.stacks.items() if t > oldest_needed}

    def expected_states(self, rnd: int, client_id: str) -> set[str]:
        """FLoRA: every reply carries the client's fresh LoRA."""
        return {"lora"}

    def state_dict(self) -> dict:
        """FLoRA: the stacks not merged everywhere and each client's last merged round."""
        return {"tensors": {stack_key(t): s for t, s in self.stacks.items()}, "meta": {"merged_up_to": self.merged_up_to}}

    def load_state_dict(self, state: dict) -> None:
        """FLoRA: restore what `state_dict` saved."""
        self.stacks = {int(k.removeprefix("stack_")): s for k, s in state["tensors"].items()}
        self.merged_up_to = dict(state["meta"]["merged_up_to"])


class FLoRAClient(ClientAlgorithm):
    """Merge the received stacks into the local base, train a fresh rank-r_k LoRA on top, send it."""

    heterogeneous_ranks = True

    def layout_for(self, payload: Payload) -> Layout:
        """FLoRA: one LoRA at the rank the payload gives (else the client's own)."""
        return Layout(1, "none", payload.config.get("rank"))

    @staticmethod
    def _merged(payload: Payload, state: ClientState, record: bool = False) -> StateDict:
        """The client's merged update plus every received stack it has not merged yet (a stack is re-sent when
        the server never saw the client's reply); with `record`, the merged stack names are kept in state.meta."""
        merged = dict(state.states.get("merged", {}))
        done = set(state.meta.get("merged_stacks", []))
        for name, stacked in sorted(payload.states.items()):
            if name in done:
                continue
            for path, delta in stack_delta(stacked).items():
                merged[path] = merged[path] + delta if path in merged else delta
            done.add(name)
        if record:
            state.meta["merged_stacks"] = sorted(done)
        return merged

    def _fresh_lora(self, payload: Payload, trainer) -> StateDict:
        return self.spec.init_lora(generator(trainer.seed, "flora-init"), r=trainer.adapted.rank)

    def fit(self, payload: Payload, state: ClientState, trainer: Trainer) -> tuple[Reply, ClientState]:
        """FLoRA: merge the pending stacks into the base, train a fresh LoRA on top and send it."""
        state.states["merged"] = self._merged(payload, state, record=True)
        with trainer.adapted.base_delta(state.states["merged"]):
            trainer.adapted.load_expert(0, self._fresh_lora(payload, trainer))
            metrics = trainer.train(experts=[0])
            lora = trainer.adapted.expert_state(0)
        return Reply({"lora": lora}, len(trainer.data.train), metrics), state

    def personalize(self, payload: Payload, state: ClientState, trainer: Trainer) -> Personalized:
        """FLoRA: the merged base update under a fresh LoRA that has no effect yet."""
        trainer.adapted.load_expert(0, self._fresh_lora(payload, trainer))  # B = 0: the merged model alone
        return Personalized(base_delta=self._merged(payload, state))
