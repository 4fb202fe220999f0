"""The client runtime both engines share: run a method's client side for one client on the shared model.

It swaps in what every method keeps per client but no method should have to manage: the private
classification head (trained locally, never shared, identical for every method) and, when
`training.reset_optimizer` is off, the optimizer moments. It also gives each client its budget
(`[clients]`: local steps or epochs, batch size, LoRA rank) and, for a client with several workers,
data-parallel local training on a pool of helper processes that lives as long as the runtime.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..adapters import AdaptedModel
from ..algorithms import METHODS, ClientAlgorithm, ClientState, Payload, Reply
from ..core.config import Config
from ..core.errors import ConfigError
from ..core.seeding import derive_seed
from ..training import ClientDataset, Trainer, WorkerPool, Workers, client_budgets
from ..training.distributed import worker_threads

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
    whole_split: bool = True  # False for a data owner that holds only its own data (per-client lists refused)

    def __post_init__(self) -> None:
        self._initial_heads: dict[str, dict[str, torch.Tensor]] = {}
        sizes = {cid: len(d.train) for cid, d in self.datasets.items()}
        self.budgets = client_budgets(self.config, sizes, self.whole_split)
        self._check_ranks()
        self._pool: WorkerPool | None = None

    def _check_ranks(self) -> None:
        """Refuse per-client ranks the method cannot aggregate, before any round (a ConfigError naming it)."""
        if self.config.clients.lora_r is None:
            return
        method = self.config.algorithm.name
        if getattr(self.algorithm.options, "ranks", None):
            raise ConfigError(f"{method}: both clients.lora_r and algorithm.options.ranks set the client ranks; "
                              "keep clients.lora_r")
        problem = self.algorithm.rank_problem({cid: b.lora_r for cid, b in self.budgets.items()})
        if problem:
            takers = ", ".join(m.name for m in METHODS.values() if m.client.heterogeneous_ranks)
            hint = "" if self.algorithm.heterogeneous_ranks else (
                f"; per-client ranks work with {takers}; otherwise set lora.r and drop clients.lora_r")
            raise ConfigError(f"algorithm {method!r} cannot train the ranks in clients.lora_r: {problem}{hint}")

    def workers(self, n: int) -> Workers:
        """n data-parallel workers for a local round; the helper pool starts on first use and is reused
        (restarted larger when a client needs more workers: a SuperNode starts only what its client uses)."""
        if self._pool is None or not self._pool.alive or self._pool.size < n:
            self.close()
            self._pool = WorkerPool(self.adapted, n, self.config.clients.worker_timeout)
        return Workers(self._pool, n, worker_threads(n, self.config.clients.worker_threads))

    def close(self) -> None:
        """Stop the data-parallel helper processes (they also stop when the runtime is collected or the process ends)."""
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def __enter__(self) -> "ClientRuntime":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

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
        budget = self.budgets[client_id]
        workers = self.workers(budget.workers) if phase == "fit" and budget.workers > 1 else None
        return Trainer(self.adapted, self.tokenizer, self.datasets[client_id], budget.training, self.task, seed,
                       client_id, workers)

    def enter(self, payload: Payload, state: ClientState, trainer: Trainer) -> None:
        """Give the shared model this client's layout (at its rank), private head and optimizer moments."""
        layout, rank = self.algorithm.layout_for(payload), self.budgets[trainer.client_id].lora_r
        if layout.r is None and rank != self.adapted.spec.r:  # a payload's own rank (FLoRA's options.ranks) wins
            layout = replace(layout, r=rank)
        self.adapted.set_layout(layout)
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
