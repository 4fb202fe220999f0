"""The local trainer: a nanoGPT-style loop over one client's batches on the shared adapted model.

Per round it builds a fresh AdamW and a per-round linear decay to 0, as the official FedALT/FedLEASE
codes do through HF Trainer (configurable: `training.reset_optimizer`, `training.schedule`).
With `workers` (a client's data-parallel workers, `distributed.py`) each global batch is split over them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F

from ..adapters import AdaptedModel
from ..core.config import TrainingConfig
from ..core.devices import autocast, model_device
from ..core.seeding import generator, seed_everything
from ..data.tokenize import IGNORE_INDEX, Encoded, batch_indices, collate, collate_prompts, steps_for_epochs
from .batched import Slot
from .distributed import DataParallel, Workers, load_replica_state, replica_state
from .metrics import classification_metrics, generation_metrics

BatchHook = Callable[[Mapping[str, torch.Tensor]], None]


@torch.no_grad()
def last_prompt_hidden(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Last-layer hidden state of each example's last prompt token ([batch, hidden]).

    Right-padded batches: the last token before the response (causal LM) or the last real token;
    left-padded prompt batches: the final position. Exact for causal models, whose state at a
    position does not depend on later tokens.
    """
    model.eval()
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    mask = batch["attention_mask"]
    if bool(mask[:, -1].all()) and not bool(mask[:, 0].all()):  # left padding
        last = torch.full((mask.shape[0],), mask.shape[1] - 1, device=mask.device)
    elif "labels" in batch and batch["labels"].dim() == 2:
        last = (batch["labels"] == IGNORE_INDEX).long().cumprod(1).sum(1) - 1
    else:
        last = mask.sum(1) - 1
    return out.hidden_states[-1][torch.arange(mask.shape[0], device=mask.device), last]


@dataclass
class ClientDataset:
    """A client's tokenized splits; `n_labels` is the size of its task's label set (classification)."""

    train: Encoded
    test: Encoded
    n_labels: int = 0
    task: str = ""
    few_shot: Encoded | None = None  # labelled examples held out of train for a gradient-free search

    def hold_out(self, n: int, generator: torch.Generator) -> "ClientDataset":
        """A copy with `n` random training examples moved into `few_shot` (train and few_shot stay disjoint)."""
        if n >= len(self.train):
            raise ValueError(f"cannot hold out {n} of {len(self.train)} training examples; lower the few-shot size")
        order = torch.randperm(len(self.train), generator=generator).tolist()
        return ClientDataset(self.train.subset(sorted(order[n:])), self.test, self.n_labels, self.task,
                             self.train.subset(sorted(order[:n])))


def mean_loss(losses: list[float | torch.Tensor]) -> float:
    """The mean of a round's step losses, read from the device once (reading each step's would make every step
    wait for the last to finish)."""
    if torch.is_tensor(losses[0]):
        return torch.stack(losses).double().mean().item()
    return sum(losses) / len(losses)


def to_device(batch: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """A batch built on the CPU, on `device`: to a GPU from pinned memory without waiting for the copy (a copy
    from pageable memory makes the host wait on it at every step)."""
    if device.type != "cuda":
        return {k: v.to(device) for k, v in batch.items()}
    return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}


# `training.compile`: inductor, drawing dropout's random numbers as eager does (`fallback_random`), so that a
# compiled run equals an eager one to float tolerance and one seed still fixes every mask
COMPILE: dict[str, Any] = {"backend": "inductor", "options": {"fallback_random": True}}


def fused_adamw(device: torch.device) -> bool:
    """Whether AdamW steps in one fused kernel on this device: on CUDA, where a client's step is then a few
    launches rather than a few per tensor (a GPU round of many small clients is bound by launches)."""
    return device.type == "cuda"


class Trainer:
    """Trains and evaluates whatever adapter parts are trainable on one client's data."""

    def __init__(self, adapted: AdaptedModel, tokenizer, data: ClientDataset, cfg: TrainingConfig,
                 objective: str, seed: int, client_id: str = "", workers: Workers | None = None,
                 slot: Slot | None = None) -> None:
        self.adapted, self.tokenizer, self.data, self.cfg, self.seed = adapted, tokenizer, data, cfg, seed
        self.objective = objective  # the model's: "classification" or "causal_lm" (not the dataset's task)
        self.client_id = client_id
        self.workers = workers  # data-parallel workers of train(); None: this process alone
        self.slot = slot  # its place in a batch of clients trained together (batched.py); None: alone
        self.last_trainable: set[str] = set()  # parameter names trained by the last train() call
        self.optimizer_state: dict[str, dict[str, torch.Tensor]] | None = None  # kept across rounds if not reset
        self.pad_id = tokenizer.pad_token_id
        self.device = model_device(adapted.model)  # batches go where the model is; states stay on the CPU
        self.scaler: torch.amp.GradScaler | None = None  # fp16's loss scaling, during train()
        # torch.compile's wrapper is cheap; what it compiles is cached with the model's code, across trainers.
        # Clients trained together stay eager: each slot's replica would compile anew
        self._compiled = torch.compile(adapted.model, **COMPILE) if cfg.compile and slot is None else None

    @property
    def model(self) -> torch.nn.Module:
        """The underlying HF model."""
        return self.adapted.model

    def batch(self, data: Encoded, idx: Iterable[int]) -> dict[str, torch.Tensor]:
        """The padded batch of the examples of `data` at `idx`, on the model's device."""
        return to_device(collate(data, list(idx), self.pad_id), self.device)

    def forward(self, **inputs: torch.Tensor):
        """The model's forward pass in the training precision (autocast; trainable parameters stay fp32)."""
        return self.forward_on(self.model, inputs)

    def forward_on(self, model: torch.nn.Module, inputs: Mapping[str, torch.Tensor]):
        """`model`'s forward pass (this model, or a joint model over it) in the training precision."""
        if self._compiled is not None and model is self.model:
            model = self._compiled
        with autocast(self.device, self.cfg.precision):
            return model(**inputs)

    def first_batch(self, data: Encoded) -> dict[str, torch.Tensor]:
        """The first evaluation batch of a split (diagnostics look at it)."""
        return self.batch(data, range(min(len(data), self.cfg.eval_batch_size)))

    def num_steps(self, steps: int | None = None, epochs: float | None = None) -> int:
        """Optimizer steps of one local round: `steps`, or `epochs` over the train split."""
        if steps is None and epochs is None:
            steps, epochs = self.cfg.local_steps, self.cfg.local_epochs
        if steps is not None:
            return int(steps)
        return steps_for_epochs(epochs, len(self.data.train), self.cfg.batch_size)

    def batch_loss(self, batch: Mapping[str, torch.Tensor], n_items: int | None = None) -> torch.Tensor:
        """Mean loss of a batch: CE over the task's labels, or causal-LM CE over response tokens.

        With `n_items`, the sum of the per-item losses divided by n_items instead: a data-parallel shard's
        part of the global batch mean (items are examples, or predicted tokens for a causal LM).
        """
        if self.objective != "classification" and n_items is None:
            return self.forward(**batch).loss.float()
        return self.logits_loss(self.forward(**_inputs(batch)).logits, batch, n_items)

    def logits_loss(self, logits: torch.Tensor, batch: Mapping[str, torch.Tensor],
                    n_items: int | None = None) -> torch.Tensor:
        """The loss of `batch_loss` from the batch's logits: the mean, or the sum over items divided by n_items."""
        if self.objective == "classification":
            logits = logits[:, : self.data.n_labels].float()
            if n_items is None:
                return F.cross_entropy(logits, batch["labels"])
            return F.cross_entropy(logits, batch["labels"], reduction="sum") / n_items
        # token t predicts label t+1, as the HF loss: the last position predicts nothing
        logits, labels = logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten()
        if n_items is None:
            return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)
        return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum") / max(n_items, 1)

    def train(self, experts: Iterable[int] = (), router: bool = False, steps: int | None = None,
              epochs: float | None = None, data: Encoded | None = None, parts: str = "AB") -> dict[str, float]:
        """One local round training exactly these experts (and router, and the private head if configured).

        Returns the mean training loss and the step count. With data-parallel workers the helpers replay
        the same call on their shards of every batch (the result is rank 0's, here).
        """
        data = data if data is not None else self.data.train
        if len(data) == 0:  # an epoch of no batches would never reach the step count
            raise ValueError("train() was given no training examples; give the client data (or fewer few-shot examples)")
        args = {"experts": list(experts), "router": router, "n_steps": self.num_steps(steps, epochs), "parts": parts}
        if self.workers is None or self.workers.n == 1:
            return self._train(data, **args)
        job = TrainJob(replica_state(self.adapted), self.cfg, self.objective, self.seed, self.client_id, self.data.n_labels,
                       self.pad_id, Encoded(data.input_ids, data.targets, token_type_ids=data.token_type_ids),
                       self.optimizer_state, args)
        return self.workers.run(job, lambda dp: self._train(data, dp=dp, **args))

    def _train(self, data: Encoded, experts: list[int], router: bool, n_steps: int, parts: str,
               dp: DataParallel | None = None) -> dict[str, float]:
        self.adapted.set_trainable(experts, router, head=self.cfg.train_head and self.objective == "classification",
                                   parts=parts)
        self.last_trainable = self.adapted.trainable_names()
        params = self.adapted.trainable_parameters()
        if not params:
            raise ValueError("train() was asked to train nothing: name the experts and/or router to train")
        seed_everything(self.seed, "dropout", *([dp.rank] if dp and dp.rank else []))  # own masks per worker
        order = generator(self.seed, "order")  # the same batches on every worker
        optimizer = self._optimizer()
        schedule = self._schedule(optimizer, n_steps)
        self._checkpointing(self.cfg.gradient_checkpointing)
        # fp16's narrow range underflows small gradients: scale the loss (CUDA only: check_precision)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.cfg.precision == "fp16" else None
        self.model.train()
        losses: list[float | torch.Tensor] = []
        while len(losses) < n_steps:
            for idx in batch_indices(len(data), self.cfg.batch_size, order):
                optimizer.zero_grad(set_to_none=True)
                losses.append(self._backward(data, idx, params, dp))
                if self.scaler is not None:
                    self.scaler.unscale_(optimizer)
                if self.cfg.grad_clip:
                    torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
                if self.scaler is not None:
                    self.scaler.step(optimizer)
                    self.scaler.update()
                else:
                    optimizer.step()
                schedule.step()
                if len(losses) == n_steps:
                    break
        if not self.cfg.reset_optimizer:
            self._save_optimizer(optimizer)
        return {"train_loss": mean_loss(losses), "steps": n_steps}

    def _backward(self, data: Encoded, idx: list[int], params: list[torch.nn.Parameter],
                  dp: DataParallel | None) -> float | torch.Tensor:
        """Gradients of one global batch into `.grad`; returns its loss (alone: on the device, unread, so that
        the next step's launches need not wait for this one). Data-parallel: this worker's shard, normalised by
        the whole batch's item count, then summed over the workers."""
        if self.slot is not None:  # trained together with other clients: one joint step serves them all
            padded = len({len(data.input_ids[i]) for i in idx}) > 1  # known here: no read from the device
            return self.slot.backward(self, self.batch(data, idx), padded)
        if dp is None:
            loss = self.batch_loss(self.batch(data, idx))
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            return loss.detach()
        shard, loss = dp.shard(idx), None
        if shard:
            loss = self.batch_loss(self.batch(data, shard), loss_items(data, idx, self.objective))
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()  # unscaled after the sum
        elif self.scaler is not None:  # no items here this step: the scaler still needs its scale to unscale_
            self.scaler.scale(torch.zeros((), device=self.device))
        return dp.all_reduce(params, loss)

    def _checkpointing(self, enabled: bool) -> None:
        """HF activation (gradient) checkpointing on or off for this train call; non-reentrant, so the frozen
        embeddings' outputs need no grad. transformers >= 5.x names it activation_checkpointing_*."""
        model = self.model
        active = getattr(model, "is_activation_checkpointing", None)
        active = getattr(model, "is_gradient_checkpointing", False) if active is None else active
        if enabled == bool(active):
            return
        if enabled and not getattr(model, "supports_gradient_checkpointing", False):
            raise ValueError(f"{type(model).__name__} does not support gradient checkpointing; set "
                             "training.gradient_checkpointing=false")
        if hasattr(model, "activation_checkpointing_enable"):
            if enabled:
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.activation_checkpointing_disable()
        elif enabled:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_disable()

    def _optimizer(self) -> torch.optim.Optimizer:
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        exempt = lambda n: n.endswith("bias") or "norm" in n.lower()  # noqa: E731  (as HF Trainer: no decay)
        decay = [p for n, p in named if not exempt(n)]
        no_decay = [p for n, p in named if exempt(n)]
        fused = fused_adamw(self.device)
        optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": self.cfg.weight_decay},
                                       {"params": no_decay, "weight_decay": 0.0}], lr=self.cfg.lr, fused=fused)
        if self.optimizer_state and not self.cfg.reset_optimizer:
            for n, p in named:
                if n in self.optimizer_state:  # moments move to the parameter's device; AdamW keeps `step` on the
                    # CPU, the fused one beside its parameters
                    optimizer.state[p] = {k: v.to(p.device) if v.dim() or fused else v.clone()
                                          for k, v in self.optimizer_state[n].items()}
        return optimizer

    def _save_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        names = {id(p): n for n, p in self.model.named_parameters()}
        kept = dict(self.optimizer_state or {})
        for p, st in optimizer.state.items():
            kept[names[id(p)]] = {k: v.detach().cpu().clone() if torch.is_tensor(v) else torch.tensor(v)
                                  for k, v in st.items()}
        self.optimizer_state = kept

    def _schedule(self, optimizer: torch.optim.Optimizer, n_steps: int):
        from transformers import get_constant_schedule_with_warmup, get_linear_schedule_with_warmup

        if self.cfg.schedule == "linear":
            return get_linear_schedule_with_warmup(optimizer, self.cfg.warmup_steps, n_steps)
        return get_constant_schedule_with_warmup(optimizer, self.cfg.warmup_steps)

    @torch.no_grad()
    def loss(self, data: Encoded, before_batch: BatchHook | None = None) -> float:
        """Mean per-example loss over a split, without gradients (used by gradient-free searches)."""
        self.model.eval()
        total, n = 0.0, 0
        for idx in batch_indices(len(data), self.cfg.eval_batch_size, None):
            batch = self.batch(data, idx)
            if before_batch:
                before_batch(batch)
            total += float(self.batch_loss(batch)) * len(idx)
            n += len(idx)
        return total / max(n, 1)

    @torch.no_grad()
    def evaluate(self, data: Encoded | None = None, before_batch: BatchHook | None = None) -> dict[str, float]:
        """The client's metrics on its test split (or `data`): accuracy/macro-F1, or EM/ROUGE on greedy generations.

        `before_batch(batch)` runs before every forward pass (instance-wise adapter weighting uses it).
        """
        data = data if data is not None else self.data.test
        if self.objective != "classification":
            return {"loss": self.loss(data, before_batch),
                    **generation_metrics(self.generate(data.prompts, before_batch), data.references)}
        preds, loss = self.predict_labels(data, before_batch)
        return {"loss": loss, **classification_metrics(preds, data.targets, self.data.n_labels)}

    @torch.no_grad()
    def predict_labels(self, data: Encoded, before_batch: BatchHook | None = None) -> tuple[list[int], float]:
        """Predicted class ids (over the task's labels) and the mean cross-entropy against `data.targets`."""
        self.model.eval()
        preds: list[int] = []
        total = 0.0
        for idx in batch_indices(len(data), self.cfg.eval_batch_size, None):
            batch = self.batch(data, idx)
            if before_batch:
                before_batch(batch)
            logits = self.forward(**_inputs(batch)).logits
            logits = logits[:, : self.data.n_labels].float()
            total += float(F.cross_entropy(logits, batch["labels"])) * len(idx)
            preds += logits.argmax(-1).tolist()
        return preds, total / max(len(data), 1)

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], before_batch: BatchHook | None = None) -> list[str]:
        """Greedy answers to tokenized prompts (left-padded batches)."""
        self.model.eval()
        answers: list[str] = []
        for start in range(0, len(prompts), self.cfg.eval_batch_size):
            chunk = prompts[start : start + self.cfg.eval_batch_size]
            batch = {k: v.to(self.device) for k, v in collate_prompts(chunk, self.pad_id).items()}
            if before_batch:
                before_batch(batch)
            with autocast(self.device, self.cfg.precision):
                out = self.model.generate(**batch, max_new_tokens=self.cfg.max_new_tokens, do_sample=False,
                                      pad_token_id=self.pad_id, eos_token_id=self.tokenizer.eos_token_id)
            answers += self.tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:].cpu(), skip_special_tokens=True)
        return [a.strip() for a in answers]


def _inputs(batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What a classification forward reads (token type ids mark a sentence pair's segments)."""
    return {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}


def loss_items(data: Encoded, idx: list[int], objective: str) -> int:
    """How many items the loss of a batch averages over: examples, or predicted (non-masked) tokens."""
    if objective == "classification":
        return len(idx)
    return sum(sum(t != IGNORE_INDEX for t in data.targets[i][1:]) for i in idx)


@dataclass
class TrainJob:
    """One `Trainer.train` call as a data-parallel helper replays it on its shards (picklable)."""

    replica: dict[str, Any]
    cfg: TrainingConfig
    objective: str
    seed: int
    client_id: str
    n_labels: int
    pad_id: int
    data: Encoded
    optimizer_state: dict[str, dict[str, torch.Tensor]] | None
    args: dict[str, Any]

    def __call__(self, dp: DataParallel, adapted: AdaptedModel) -> None:
        """Bring the helper's model to rank 0's state, then train on this worker's shards."""
        load_replica_state(adapted, self.replica)
        data = ClientDataset(self.data, self.data, self.n_labels)
        trainer = Trainer(adapted, SimpleNamespace(pad_token_id=self.pad_id), data, self.cfg, self.objective, self.seed,
                          self.client_id)
        trainer.optimizer_state = self.optimizer_state
        trainer._train(self.data, dp=dp, **self.args)
