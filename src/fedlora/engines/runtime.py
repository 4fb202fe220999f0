"""The client runtime every engine shares: run a method's client side for one client on the shared model.

It swaps in what every method keeps per client but no method should have to manage: the private
classification head (trained locally, never shared, identical for every method) and, when
`training.reset_optimizer` is off, the optimizer moments. It also gives each client its budget
(`[clients]`: local steps or epochs, batch size, LoRA rank) and, for a client with several workers,
data-parallel local training on a pool of helper processes that lives as long as the runtime.
`personalize` is the one way to a client's personalized model: evaluation, export and predict use it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import torch

from ..adapters import AdaptedModel
from ..adapters.model import require_shapes
from ..algorithms import ClientAlgorithm, available_methods, ClientContext, ClientState, Diagnostic, Payload, Personalized, Reply
from ..core.config import Config
from ..core.devices import model_device
from ..core.errors import ConfigError
from ..core.seeding import derive_seed, generator
from ..training import ClientDataset, Trainer, WorkerPool, Workers, client_budgets
from ..training.batched import ClientBatch, Slot
from ..training.distributed import worker_threads
from .privacy import privatize

HEAD, OPTIMIZER = "_head", "_optimizer"  # reserved ClientState names


@dataclass
class Evaluation:
    """A client's evaluation: metrics (averaged over clients and tasks) and diagnostics (reported as they are)."""

    metrics: dict[str, float]
    diagnostics: dict[str, Diagnostic] = field(default_factory=dict)


@dataclass
class PersonalizedTurn:
    """A client's personalized model, loaded into the shared model: the turn's context and what `personalize` gave."""

    ctx: ClientContext
    personalized: Personalized


@dataclass
class ClientRuntime:
    """A data owner's side of a run: the method's client object, the shared model and the clients' data."""

    algorithm: ClientAlgorithm
    adapted: AdaptedModel
    tokenizer: object
    config: Config
    objective: str  # the model's: "classification" or "causal_lm"
    datasets: dict[str, ClientDataset]
    whole_split: bool = True  # False for a data owner that holds only its own data (per-client lists refused)

    def __post_init__(self) -> None:
        self._initial_heads: dict[str, dict[str, torch.Tensor]] = {}
        sizes = {cid: len(d.train) for cid, d in self.datasets.items()}
        self.budgets = client_budgets(self.config, sizes, self.whole_split)
        self._check_ranks()
        self._pool: WorkerPool | None = None
        self._lora_init: dict[str, torch.Tensor] | None = None
        self._batch: ClientBatch | None = None

    def lora_init(self) -> dict[str, torch.Tensor]:
        """The run's shared seeded LoRA init (every client's first start), built once."""
        if self._lora_init is None:
            self._lora_init = self.adapted.spec.init_lora(generator(self.config.seed, "lora-init"))
        return self._lora_init

    def _check_ranks(self) -> None:
        """Refuse per-client ranks the method cannot aggregate, before any round (a ConfigError naming it)."""
        if self.config.clients.lora_r is None:
            return
        ranks = {cid: b.lora_r for cid, b in self.budgets.items()}
        problem = self.algorithm.rank_problem(ranks)
        if problem:
            name = self.config.algorithm.name
            takers = [m.name for m in available_methods().values() if m.heterogeneous_ranks]
            hint = "" if name in takers else \
                f"; per-client ranks work with {', '.join(takers)}; otherwise set lora.r and drop clients.lora_r"
            raise ConfigError(f"algorithm {name!r} cannot train the ranks in clients.lora_r: {problem}{hint}")

    def check_states(self, states: dict[str, ClientState], where: str) -> None:
        """Refuse (CheckpointError, naming the client) a saved client state whose private head does not fit this
        model: at resume, once, rather than as that client's failure in every round."""
        params = dict(self.adapted.model.named_parameters())
        shapes = {n: tuple(params[n].shape) for n in self.adapted.head_names}
        for cid, state in states.items():
            if HEAD in state.states:
                require_shapes(state.states[HEAD], shapes, f"client {cid}'s head in {where}")

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

    def context(self, client_id: str, rnd: int, phase: str, payload: Payload, state: ClientState,
                slot: Slot | None = None) -> ClientContext:
        """This client's turn on the shared model (or its slot's replica of it): its layout (at its rank), private
        head and optimizer moments loaded, and a trainer whose random streams depend only on (seed, phase, client,
        round)."""
        seed = derive_seed(self.config.seed, phase, client_id, rnd)
        budget = self.budgets[client_id]
        workers = self.workers(budget.workers) if phase == "fit" and budget.workers > 1 else None
        adapted = slot.model if slot is not None else self.adapted
        trainer = Trainer(adapted, self.tokenizer, self.datasets[client_id], budget.training, self.objective,
                          seed, client_id, workers, slot)
        rank = budget.lora_r if budget.lora_r != adapted.spec.r else None
        adapted.set_layout(replace(self.algorithm.layout_for(payload), r=rank))
        adapted.set_expert_weights(torch.ones(adapted.layout.n_experts))
        adapted.set_own_expert(0)
        if adapted.head_names:
            adapted.load_head(state.states.get(HEAD) or self.initial_head(client_id))
        if OPTIMIZER in state.states:
            trainer.optimizer_state = _unflatten_optimizer(state.states[OPTIMIZER])
        return ClientContext(client_id, seed, self.datasets[client_id], trainer)

    def fit(self, client_id: str, rnd: int, payload: Payload, state: ClientState,
            slot: Slot | None = None) -> tuple[Reply, ClientState]:
        """One local round (alone, or in `slot` of a batch of clients trained together); the given state is not
        modified (a failed fit leaves the client as it was)."""
        state = _copy(state)
        ctx = self.context(client_id, rnd, "fit", payload, state, slot)
        reply, state = self.algorithm.fit(payload, state, ctx)
        if ctx.model.head_names:
            state.states[HEAD] = ctx.model.head_state()
        if ctx.trainer.optimizer_state is not None and not self.config.training.reset_optimizer:
            state.states[OPTIMIZER] = _flatten_optimizer(ctx.trainer.optimizer_state)
        if self.config.privacy.dp != "none":  # the upload's bound (and local noise) before anything leaves
            reply, state = privatize(reply, payload, state, self.config, ctx.seed, self.lora_init(),
                                     self.algorithm.started_from)
        state = self.algorithm.uploaded(reply, state)
        reply.metrics.setdefault("num_examples", reply.num_examples)
        return reply, state

    def fit_together(self, turns: list[tuple[str, int, Payload, ClientState]]) -> list[tuple[Reply, ClientState] | Exception]:
        """Several clients' local rounds in joint steps over the shared base (`engine.client_batch`), each one's
        result equal to its `fit` alone (to float tolerance), or the exception that failed it."""
        if self._batch is None or self._batch.size < len(turns):
            self._batch = ClientBatch(self.adapted, len(turns), grouped=self.config.engine.grouped_lora)
        return self._batch.run([lambda slot, t=turn: self.fit(*t, slot=slot) for turn in turns])

    def batching_problem(self) -> str | None:
        """Why this run's clients cannot train together (`engine.client_batch`), or None."""
        if self.algorithm.merges_into_base:
            return f"{self.config.algorithm.name} merges each client's update into the shared base weights"
        if any(b.workers > 1 for b in self.budgets.values()):
            return "a client trains on several data-parallel workers (clients.workers)"
        return None

    @contextmanager
    def personalize(self, client_id: str, rnd: int, payload: Payload, state: ClientState) -> Iterator[PersonalizedTurn]:
        """Within the block the shared model is the client's personalized model after round `rnd` (its base
        update merged, undone afterwards); the given state is not modified."""
        ctx = self.context(client_id, rnd, "evaluate", payload, state)
        personalized = self.algorithm.personalize(payload, _copy(state), ctx)
        with self.adapted.base_delta(personalized.base_delta):
            yield PersonalizedTurn(ctx, personalized)

    def evaluate(self, client_id: str, rnd: int, payload: Payload, state: ClientState) -> Evaluation:
        """The client's personalized metrics on its own test split, and the method's diagnostics."""
        with self.personalize(client_id, rnd, payload, state) as turn:
            hook = turn.personalized.hook
            metrics = turn.ctx.trainer.evaluate(before_batch=hook)
        return Evaluation(metrics, {**turn.personalized.diagnostics, **(hook.diagnostics() if hook else {})})


def _copy(state: ClientState) -> ClientState:
    """A copy whose dicts can be changed without touching the original's (tensors are shared, never modified)."""
    return ClientState({k: dict(v) for k, v in state.states.items()}, dict(state.meta))


def _flatten_optimizer(opt: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {f"{param}|{key}": value for param, entries in opt.items() for key, value in entries.items()}


def _unflatten_optimizer(flat: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    out: dict[str, dict[str, torch.Tensor]] = {}
    for name, value in flat.items():
        param, _, key = name.rpartition("|")
        out.setdefault(param, {})[key] = value
    return out


CPU_CLIENT_BATCH = 4  # engine.client_batch="auto" off CUDA: a CPU gains little from more (benchmarks/batched.py)


def auto_client_batch(runtime: ClientRuntime) -> int:
    """`engine.client_batch = "auto"`: on CUDA, as many clients as fit into 80% of the free GPU memory by an
    estimate of one client's training memory (at most 64); elsewhere CPU_CLIENT_BATCH."""
    device = model_device(runtime.adapted.model)
    if device.type != "cuda":
        return CPU_CLIENT_BATCH
    free, _ = torch.cuda.mem_get_info(device)
    cfg, model_cfg = runtime.config, runtime.adapted.model.config
    # AdamW: the parameter, its gradient and two moments in fp32, for up to three experts and a router
    adapters = 16 * 4 * runtime.adapted.spec.lora_numel()
    # activations: about 34 bytes per token, layer and hidden unit in 16-bit (Korthikanti et al. 2022), twice in fp32
    tokens = max(b.training.batch_size for b in runtime.budgets.values()) * cfg.data.max_length
    per_token = 34 * getattr(model_cfg, "hidden_size", 1024) * getattr(model_cfg, "num_hidden_layers", 24)
    activations = tokens * per_token * (2 if cfg.training.precision == "fp32" else 1)
    return max(1, min(64, int(0.8 * free // (adapters + activations))))
