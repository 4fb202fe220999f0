"""Several clients' local rounds trained together: one forward/backward per step over the shared base
(`engine.client_batch`; the joint model itself is `adapters/joint.py`).

Each client's turn (the method's whole `fit`, unchanged) runs as a coroutine of its own on a replica of the model
(`AdaptedModel.replica`: its own LoRA layers and head over the same frozen base). One turn runs at a time, in
slot order, each until it asks for a training step (`Trainer._backward`) or ends; once every running turn waits
for a step, one joint forward/backward over their concatenated batches gives each its gradients, and the turns
go on, each with its own AdamW step, clipping and schedule. A turn that has ended drops out of later steps; one
that starts another `train()` joins again. Running them one at a time keeps every step in a fixed order (and
torch's global random stream each client's own while it runs, `RandomStream`), so the result is the sequential
engine's to float tolerance. The coroutines are greenlets, not threads: a method's `fit` is plain code that calls
`train()`, so only a switch of stacks can pause it mid-call, and greenlets do that on one OS thread, where threads
would each bring an OpenMP team of their own that spins while another runs (measured: 0.6x on 2 cores).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
import logging
from dataclasses import dataclass
from typing import TypeVar

import greenlet
import torch

from ..adapters import AdaptedModel
from ..adapters.joint import JointPass, RowSlice, joint_model
from ..core.seeding import RandomStream
from ..data.tokenize import IGNORE_INDEX

log = logging.getLogger("fedlora")

T = TypeVar("T")
MAX_PADDING = 0.25  # a joint step's share of padding tokens beyond each client's own, before it is split
PAD_VALUES = {"attention_mask": 0, "token_type_ids": 0, "labels": IGNORE_INDEX}  # input_ids: the tokenizer's pad id


@dataclass
class StepRequest:
    """A turn waiting for one training step: its trainer (loss, scaler, pad id) and its batch on the device."""

    trainer: "object"  # a Trainer (not imported here: trainer.py imports this module)
    batch: Mapping[str, torch.Tensor]
    padded: bool  # whether the batch has padding (known on the host when it was built: no read from the device)


class Slot:
    """One client's place in a `ClientBatch`: its replica of the model and its way into the joint steps."""

    def __init__(self, owner: "ClientBatch", index: int, model: AdaptedModel) -> None:
        self.owner, self.index, self.model = owner, index, model

    def backward(self, trainer, batch: Mapping[str, torch.Tensor], padded: bool) -> torch.Tensor:
        """Wait for the joint step that puts this batch's gradients into the trainer's parameters; its loss (on the
        device, unread)."""
        return self.owner._request(StepRequest(trainer, batch, padded))


class ClientBatch:
    """Up to `size` clients' turns trained in joint steps over `adapted`'s base (see the module docstring)."""

    def __init__(self, adapted: AdaptedModel, size: int, grouped: bool | None = None) -> None:
        self.joint = JointPass(grouped)
        self.slots = [Slot(self, k, adapted.replica()) for k in range(size)]
        layers = {p: [s.model.layers[p] for s in self.slots] for p in adapted.layers}
        heads = {p: [s.model.model.get_submodule(p) for s in self.slots] for p in adapted.head_modules()}
        self.model = joint_model(adapted.model, layers, heads, self.joint)
        self.retried_alone = 0  # joint steps that failed and were redone client by client (e.g. out of memory)

    @property
    def size(self) -> int:
        """How many turns can train together."""
        return len(self.slots)

    def run(self, turns: list[Callable[[Slot], T]]) -> list[T | Exception]:
        """Run the turns together (turn k on slot k); each one's result, or the exception that ended it."""
        if len(turns) > self.size:
            raise ValueError(f"{len(turns)} turns for a batch of {self.size}")
        self._coordinator = greenlet.getcurrent()
        self._turns = [greenlet.greenlet(self._turn(k, turn)) for k, turn in enumerate(turns)]
        self._streams = [RandomStream() for _ in turns]
        self._results: dict[int, T | Exception] = {}
        self._waiting: dict[int, StepRequest] = {}
        outside = RandomStream()
        try:
            for k in range(len(turns)):
                self._hand_over(k, None)
            while self._waiting:
                requests, self._waiting = sorted(self._waiting.items()), {}
                for k, outcome in self._step(requests).items():
                    self._hand_over(k, outcome)
        finally:
            outside.restore()
            self._turns = []  # a turn left waiting (only after an error here) is collected, its stack unwound
        return [self._results[k] for k in range(len(turns))]

    # -- the turns' side ----------------------------------------------------------------------------
    def _turn(self, k: int, turn: Callable[[Slot], T]) -> Callable[[object], tuple[str, object]]:
        def body(_: object) -> tuple[str, object]:
            try:
                return "done", turn(self.slots[k])
            except Exception as exc:  # a failing client is left out, as in the sequential engine
                return "done", exc
        return body

    def _request(self, request: StepRequest) -> torch.Tensor:
        outcome = self._coordinator.switch(("step", request))
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    # -- the coordinator's side ---------------------------------------------------------------------
    def _hand_over(self, k: int, outcome: object) -> None:
        """Let turn k run (with its random stream) until it asks for a step or ends."""
        self._streams[k].restore()
        kind, message = self._turns[k].switch(outcome)
        self._streams[k].capture()
        if kind == "step":
            self._waiting[k] = message
        else:
            self._results[k] = message

    def _step(self, requests: list[tuple[int, StepRequest]]) -> dict[int, torch.Tensor | Exception]:
        """Every waiting request's step, in joint steps of requests of similar length (`length_groups`)."""
        outcomes: dict[int, torch.Tensor | Exception] = {}
        for group in length_groups(requests):
            outcomes.update(self._step_group(group))
        return outcomes

    def _step_group(self, requests: list[tuple[int, StepRequest]]) -> dict[int, torch.Tensor | Exception]:
        """One joint step; if it fails, each request alone, so that one client's error fails only that client."""
        saved = {k: self._streams[k].copy() for k, _ in requests}
        try:
            return self._joint_backward(requests)
        except Exception as exc:
            if len(requests) == 1:
                return {requests[0][0]: exc}
            if not self.retried_alone:  # a joint step too big for the device would otherwise only be slow
                log.warning("a joint step of %d clients failed (%s: %s); its clients step one by one (said once)",
                            len(requests), type(exc).__name__, str(exc).splitlines()[0][:160] if str(exc) else "")
            self.retried_alone += 1
        outcomes: dict[int, torch.Tensor | Exception] = {}
        for k, request in requests:
            self._streams[k] = saved[k].copy()
            for p in request.trainer.adapted.trainable_parameters():
                p.grad = None
            try:
                outcomes.update(self._joint_backward([(k, request)]))
            except Exception as exc:
                outcomes[k] = exc
        return outcomes

    def _joint_backward(self, requests: list[tuple[int, StepRequest]]) -> dict[int, torch.Tensor]:
        """Gradients of every request's batch loss in one forward/backward (loss = the sum of per-client means)."""
        batches = [r.batch for _, r in requests]
        width = max(b["input_ids"].shape[1] for b in batches)
        # nothing in a joint step reads from the device (padding is known on the host, losses stay on the device): a
        # GPU round of many small clients is bound by such waits and by launches
        slices, start = [], 0
        for (k, request), b in zip(requests, batches):
            n, length = b["input_ids"].shape
            slices.append(RowSlice(k, start, start + n, length, self._streams[k], request.padded))
            start += n
        first = requests[0][1].trainer
        inputs = concat_batches(batches, width, first.pad_id)
        self.joint.set_checkpointing(first.cfg.gradient_checkpointing)  # as each client's Trainer sets its own
        self.model.train()
        with self.joint.over(slices, width):
            logits = first.forward_on(self.model, {k: v for k, v in inputs.items() if k != "labels"}).logits
        total, losses = 0, {}
        for (k, request), s in zip(requests, slices):
            rows = logits[s.start:s.stop]
            loss = request.trainer.logits_loss(rows[:, : s.length] if rows.dim() == 3 else rows, request.batch)
            total = total + (request.trainer.scaler.scale(loss) if request.trainer.scaler is not None else loss)
            losses[k] = loss
        total.backward()
        return {k: loss.detach() for k, loss in losses.items()}


def length_groups(requests: list[tuple[int, StepRequest]], max_waste: float = MAX_PADDING) -> list[list[tuple[int, StepRequest]]]:
    """The requests split into groups, each padded to its longest batch with at most `max_waste` of its tokens
    padding: the longest first, slot order within a group. Clients' steps are independent, so any grouping gives
    the same result; padding 64 clients' batches to the longest of them tripled the tokens on the WordNet sample."""
    by_length = sorted(requests, key=lambda kr: (-kr[1].batch["input_ids"].shape[1], kr[0]))
    groups: list[list[tuple[int, StepRequest]]] = []
    width = rows = tokens = 0
    for k, request in by_length:
        n, length = request.batch["input_ids"].shape
        if groups and width * (rows + n) > (1 + max_waste) * (tokens + n * length):
            groups[-1].sort(key=lambda kr: kr[0])
            groups.append([])
            width = rows = tokens = 0
        if not groups:
            groups.append([])
        width, rows, tokens = max(width, length), rows + n, tokens + n * length
        groups[-1].append((k, request))
    groups[-1].sort(key=lambda kr: kr[0])
    return groups


def concat_batches(batches: list[Mapping[str, torch.Tensor]], width: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batches padded to `width` and stacked by row (a key one batch lacks is filled with its pad
    value: token type 0, as BERT assumes without it)."""
    keys = {k for b in batches for k in b}
    out = {}
    for key in sorted(keys):
        value = pad_id if key == "input_ids" else PAD_VALUES[key]
        parts = []
        for b in batches:
            n, length = b["input_ids"].shape
            t = b.get(key)
            if t is None:
                t = torch.full((n, length), value, dtype=torch.long, device=b["input_ids"].device)
            if t.dim() == 2 and t.shape[1] < width:
                t = torch.cat((t, t.new_full((n, width - t.shape[1]), value)), dim=1)
            parts.append(t)
        out[key] = torch.cat(parts)
    return out
