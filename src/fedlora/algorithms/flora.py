"""FLoRA (Wang et al., NeurIPS 2024): stacking aggregation, which allows heterogeneous client ranks.

The server stacks the clients' weighted B column-wise and their A row-wise,
    B_stack = [p_1 s_1 B_1, ..., p_K s_K B_K],   A_stack = [A_1; ...; A_K],   s_k = alpha / r_k,
so that B_stack A_stack = sum_k p_k s_k B_k A_k exactly (no cross terms). Clients merge every received
stack into their frozen base weights and start a fresh LoRA of their own rank r_k each round
(`clients.lora_r`; default lora.r).
"""

from __future__ import annotations

import torch

from ..core.errors import ConfigError
from ..core.seeding import generator
from ..core.tensors import StateDict
from .base import ClientAlgorithm, ClientContext, ClientInfo, ClientState, Payload, Personalized, Reply, ServerAlgorithm


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

    secure_refusal = "its server stacks each client's LoRA, so it needs every single one"
    heterogeneous_ranks = True
    dp_refusals = {"client_clipping": "the server stacks every client's LoRA unaveraged, so there is no sum to noise; "
                                      "use privacy.dp='local'"}

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.aggregation.rule != "mean":  # a stack keeps every client's LoRA exactly: there is nothing to vote on
            raise ConfigError(f"flora stacks the client LoRAs and cannot take federation.aggregation="
                              f"{self.aggregation.rule!r}; use 'mean' (and federation.update_clip against outliers)")

    def setup(self, clients: list[ClientInfo], rounds: int | None = None) -> None:
        """Start with no stacks."""
        super().setup(clients, rounds)
        self.stacks: dict[int, StateDict] = {}
        self.merged_up_to = {cid: 0 for cid in self.clients}  # the last round whose stack the client has merged

    def _pending(self, cid: str) -> dict[str, StateDict]:
        return {stack_key(t): s for t, s in sorted(self.stacks.items()) if t > self.merged_up_to[cid]}

    def configure(self, rnd: int, clients: list[str]) -> dict[str, Payload]:
        """Each client's unmerged stacks; the reply carries its fresh LoRA."""
        return {cid: Payload(self._pending(cid), expects=frozenset({"lora"})) for cid in clients}

    def configure_evaluate(self, rnd: int, clients: list[str]) -> dict[str, Payload]:
        """The same unmerged stacks, for evaluation."""
        return {cid: Payload(self._pending(cid)) for cid in clients}

    def aggregate(self, rnd: int, replies: dict[str, Reply]) -> None:
        """Stack the replies' LoRAs into this round's stack; drop stacks every client has merged."""
        for cid in replies:  # they merged every stack up to the previous round before training
            self.merged_up_to[cid] = max(self.stacks, default=0)
        if replies:
            self.stacks[rnd] = stack([r.states["lora"] for r in replies.values()],
                                     [self.weight(cid) for cid in replies], self.spec.alpha)
        oldest_needed = min(self.merged_up_to.values())
        self.stacks = {t: s for t, s in self.stacks.items() if t > oldest_needed}

    def state_dict(self) -> dict:
        """The stacks not merged everywhere and each client's last merged round."""
        return {"tensors": {stack_key(t): s for t, s in self.stacks.items()}, "meta": {"merged_up_to": self.merged_up_to}}

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` saved."""
        self.stacks = {int(k.removeprefix("stack_")): s for k, s in state["tensors"].items()}
        self.merged_up_to = dict(state["meta"]["merged_up_to"])


class FLoRAClient(ClientAlgorithm):
    """Merge the received stacks into the local base, train a fresh rank-r_k LoRA on top, send it."""

    merges_into_base = True

    def rank_problem(self, ranks: dict[str, int]) -> str | None:
        """Any rank: stacking is exact for every mix of ranks."""
        return None

    @staticmethod
    def _merged(payload: Payload, state: ClientState, record: bool = False) -> StateDict:
        """The client's merged update plus every received stack it has not merged yet (a stack is re-sent when
        the server never saw the client's reply); with `record`, the merged stack names are kept in state.meta."""
        merged = dict(state.states.get("merged", {}))
        done = set(state.meta.get("merged_stacks", []))
        for name, stacked in sorted(payload.states.items()):
            if name in done or not name.startswith("stack_"):  # a method built on FLoRA's may send more states
                continue
            for path, delta in stack_delta(stacked).items():
                merged[path] = merged[path] + delta if path in merged else delta
            done.add(name)
        if record:
            state.meta["merged_stacks"] = sorted(done)
        return merged

    def _fresh_lora(self, ctx: ClientContext) -> StateDict:
        return self.spec.init_lora(generator(ctx.seed, "flora-init"), r=ctx.model.rank)

    def fit(self, payload: Payload, state: ClientState, ctx: ClientContext) -> tuple[Reply, ClientState]:
        """Merge the pending stacks into the base, train a fresh LoRA on top and send it."""
        state.states["merged"] = self._merged(payload, state, record=True)
        with ctx.model.base_delta(state.states["merged"]):
            ctx.model.load_expert(0, self._fresh_lora(ctx))
            metrics = ctx.trainer.train(experts=[0])
            lora = ctx.model.expert_state(0)
        return Reply({"lora": lora}, len(ctx.data.train), metrics), state

    def personalize(self, payload: Payload, state: ClientState, ctx: ClientContext) -> Personalized:
        """The merged base update under a fresh LoRA that has no effect yet."""
        ctx.model.load_expert(0, self._fresh_lora(ctx))  # B = 0: the merged model alone
        return Personalized(base_delta=self._merged(payload, state))
