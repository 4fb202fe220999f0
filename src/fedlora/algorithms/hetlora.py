"""HetLoRA-style heterogeneous ranks (after Cho et al., EMNLP 2024): one global LoRA of rank r_max = lora.r;
a client of rank r_k (`clients.lora_r`, at most r_max) trains its first r_k rank components; the server
zero-pads every reply to r_max and averages it (FedAvg, A and B separately).

Moving a LoRA between ranks keeps its update: a rank-r state is used with scaling alpha / r, so `resize`
scales B by r'/r as it drops components (truncation) or appends zero ones (padding), and
(alpha/r') B' A' = (alpha/r) B A on the components kept. Not implemented: HetLoRA's rank self-pruning and
its sparsity-weighted average (spec section 5). With every client at lora.r this is FedIT exactly.
"""

from __future__ import annotations

import torch

from ..core.tensors import StateDict
from .base import (BroadcastAverageServer, ClientAlgorithm, ClientContext, ClientInfo, ClientState, Payload, Personalized,
                   Reply, SecureMean, lora_rank)


PAD = "pad_to_global_rank"  # secure aggregation: the client zero-pads its reply, as the server would


def resize(lora: StateDict, r: int) -> StateDict:
    """An expert state at rank r: its first r components, or zero components appended, with B scaled by
    r / (its rank) so that the update (alpha / r) B A is unchanged on the components kept."""
    old = lora_rank(lora)
    if old is None or old == r:
        return dict(lora)
    out: StateDict = {}
    for key, value in lora.items():
        if key.endswith(".lora_A"):  # [rank, d_in]: rows are components
            out[key] = value[:r] if r < old else torch.cat([value, value.new_zeros(r - old, value.shape[1])])
        else:  # lora_B [d_out, rank]: columns are components
            value = value * (r / old)
            out[key] = value[:, :r] if r < old else torch.cat([value, value.new_zeros(value.shape[0], r - old)], dim=1)
    return out


class HetLoRAServer(BroadcastAverageServer):
    """The global LoRA at rank lora.r; a client receives it at its own rank once a reply has shown that rank."""

    heterogeneous_ranks = True
    secure_refusal = None  # secure: the clients pad their replies to lora.r themselves (`PAD`)
    dp_refusals = {"client_clipping": "zero-padding rescales B by r_max / r_k, so a padded update's norm is not "
                                      "bounded by clip_norm; use privacy.dp='local'"}

    def setup(self, clients: list[ClientInfo], rounds: int | None = None) -> None:
        """Also start with no known client ranks."""
        super().setup(clients, rounds)
        self.ranks: dict[str, int] = {}  # each client's rank, as its last reply showed

    def configure(self, rnd: int, clients: list[str]) -> dict[str, Payload]:
        """The global LoRA at each client's last shown rank (lora.r until then; secure: always, the client pads)."""
        if self.secure:  # a masked reply shows no rank: every client resizes the global LoRA itself
            return {cid: Payload({"global": self.global_state}, {PAD: True}, frozenset({"global"})) for cid in clients}
        return {cid: Payload({"global": resize(self.global_state, self.ranks.get(cid, self.spec.r))},
                             expects=frozenset({"global"})) for cid in clients}

    def aggregate(self, rnd: int, replies: dict[str, Reply]) -> None:
        """Record the replies' ranks, zero-pad them to lora.r and average."""
        if not replies:
            return
        self.ranks.update({cid: lora_rank(r.states["global"]) for cid, r in replies.items()})
        padded = {cid: resize(r.states["global"], self.spec.r) for cid, r in replies.items()}
        self.global_state = self.client_mean(padded)

    def aggregate_secure(self, rnd: int, mean: SecureMean) -> None:
        """The clients padded their replies to lora.r: the global LoRA becomes their secure mean."""
        super().aggregate_secure(rnd, mean)

    def reply_problem(self, rnd: int, client_id: str, reply: Reply) -> str | None:
        """A rank above lora.r cannot be padded; otherwise the base checks."""
        rank = lora_rank(reply.states.get("global", {}))
        if rank is not None and rank > self.spec.r:
            return f"state 'global' has LoRA rank {rank}, above the global rank lora.r={self.spec.r}"
        return None

    def state_dict(self) -> dict:
        """The global LoRA and the known client ranks."""
        return {"tensors": {"global": self.global_state}, "meta": {"ranks": self.ranks}}

    def load_state_dict(self, state: dict) -> None:
        """Restore the global LoRA and the client ranks."""
        super().load_state_dict(state)
        self.ranks = dict(state["meta"].get("ranks", {}))


class HetLoRAClient(ClientAlgorithm):
    """Train the first r_k components of the global LoRA (received at any rank, used at its own) and send them."""


    def rank_problem(self, ranks: dict[str, int]) -> str | None:
        """Any client rank up to lora.r; a larger one is the problem."""
        over = {cid: r for cid, r in ranks.items() if r > self.spec.r}
        if over:
            return (f"the global LoRA has rank lora.r={self.spec.r}, and {len(over)} client ranks exceed it "
                    f"({', '.join(f'{c}: {r}' for c, r in list(over.items())[:4])}); raise lora.r to the largest rank")
        return None

    def _load(self, payload: Payload, ctx: ClientContext) -> None:
        ctx.model.load_expert(0, resize(payload.states["global"], ctx.model.rank))

    def fit(self, payload: Payload, state: ClientState, ctx: ClientContext) -> tuple[Reply, ClientState]:
        """Train the first r_k components of the global LoRA and send them (secure: zero-padded to lora.r)."""
        self._load(payload, ctx)
        metrics = ctx.trainer.train(experts=[0])
        lora = ctx.model.expert_state(0)
        return Reply({"global": resize(lora, self.spec.r) if payload.config.get(PAD) else lora}, len(ctx.data.train),
                     metrics), state

    def personalize(self, payload: Payload, state: ClientState, ctx: ClientContext) -> Personalized:
        """The global LoRA at the client's rank."""
        self._load(payload, ctx)
        return Personalized()
