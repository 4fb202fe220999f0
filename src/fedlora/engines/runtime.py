"""The client runtime both engines share: run a method's client side for one client on the shared model.

It swaps in what every method keeps per client but no method should have to manage: the private
classification head (trained locally, never shared, identical for every method) and, when
`training.reset_optimizer` is off, the optimizer moments.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..adapters import AdaptedModel
from ..algorithms import ClientAlgorithm, ClientState, Payload, Reply
from ..core.config import Config
from ..core.seeding import derive_seed
from ..training import ClientDataset, Trainer

HEAD, OPTIMIZER = "_head", "_optimizer"  # reserved ClientState names


@dataclass
class ClientRuntime:
    """A data owner's side of a run: the method's client object, the shared model and the clients' data."""

    algorithm: ClientAlgorithm
    adapted: AdaptedModel
    tokenizer: object
    config: Config
    task: str
    datasets: dict[str, ClientDataset]

    def __post_init__(self) -> None:
        self._initial_heads: dict[str, dict[str, torch.Tensor]] = {}

    def initial_head(self, client_id: str) -> dict[str, torch.Tensor]:
        """The head a client starts from: one seeded init per task, so clients that share a label space
        share a starting head, and label indices of different tasks are not spuriously aligned."""
        task = self.datasets[client_id].task
        if task not in self._initial_heads:
            self._initial_heads[task] = self.adapted.init_head(derive_seed(self.config.seed, "head", task))
        return self._initial_heads[task]

    def trainer(self, client_id: str, rnd: int, phase: str) -> Trainer:
        """A trainer on this client's data whose random streams depend only on (seed, client, round, phase)."""
        seed = derive_seed(self.config.seed, phase, client_id, rnd)
        return Trainer(self.adapted, self.tokenizer, self.datasets[client_id], self.config.training, self.task, seed, client_id)

    def enter(self, payload: Payload, state: ClientState, trainer: Trainer) -> None:
        """Give the shared model this client's layout, private head and optimizer moments."""
        self.adapted.set_layout(self.algorithm.layout_for(payload))
        self.adapted.set_expert_weights(torch.ones(self.adapted.layout.n_experts))
        self.adapted.set_own_expert(0)
        if self.adapted.head_names:
            self.adapted.load_head(state.states.get(HEAD) or self.initial_head(trainer.client_id))
        if OPTIMIZER in state.states:
            trainer.optimizer_state = _unflatten_optimizer(state.states[OPTIMIZER])

    def fit(self, client_id: str, rnd: int, payload: Payload, state: ClientState) -> tuple[Reply, ClientState]:
        """One local round; the given state is not modified (a failed fit leaves the client as it was)."""
        state = ClientState({k: dict(v) for k, v in state.states.items()}, dict(state.meta))
        trainer = self.trainer(client_id, rnd, "fit")
        self.enter(payload, state, trainer)
        reply, state = self.algorithm.fit(payload, state, trainer)
        if self.adapted.head_names:
            state.states[HEAD] = self.adapted.head_state()
        if trainer.optimizer_state is not None and not self.config.training.reset_optimizer:
            state.states[OPTIMIZER] = _flatten_optimizer(trainer.optimizer_state)
        reply.metrics.setdefault("num_examples", reply.num_examples)
        return reply, state

    def evaluate(self, client_id: str, rnd: int, payload: Payload, state: ClientState) -> dict[str, float]:
        """The client's personalized metrics on its own test split."""
        trainer = self.trainer(client_id, rnd, "evaluate")
        self.enter(payload, state, trainer)
        return self.algorithm.evaluate(payload, ClientState({k: dict(v) for k, v in state.states.items()},
                                                            dict(state.meta)), trainer)


def _flatten_optimizer(opt: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {f"{param}|{key}": value for param, entries in opt.items() for key, value in entries.items()}


def _unflatten_optimizer(flat: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    out: dict[str, dict[str, torch.Tensor]] = {}
    for name, value in flat.items():
        param, _, key = name.rpartition("|")
        out.setdefault(param, {})[key] = value
    return out
