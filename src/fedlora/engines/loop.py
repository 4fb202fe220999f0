"""The round loop every engine shares: sampling, configure, fit, aggregate, evaluate, record, checkpoint.

An engine subclasses `RoundLoop` and says only how a set of clients is fitted and evaluated
(`fit_clients`, `evaluate_clients`): in this process, or as Flower messages to SuperNodes.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from contextlib import nullcontext
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ..algorithms import METHODS, ClientInfo, ClientState, Payload, Reply, ServerAlgorithm
from ..core.config import Config
from ..core.devices import peak_cuda_memory
from ..core.errors import ClientFailure
from ..core.io import append_jsonl, jsonl_line, save_text
from .checkpoint import Checkpoint, restore_server, save_checkpoint
from .clipping import clip_updates
from .privacy import PrivacyBudgetSpent, PrivacyLedger
from .results import RunResult, summarize
from .runtime import Evaluation
from .sampling import sample_clients
from .tracking import open_tracker
from .validation import evaluation_problem, reply_problem

log = logging.getLogger("fedlora")


class RoundLoop(ABC):
    """The round loop of the design doc; subclasses move payloads to clients and replies back."""

    def __init__(self, config: Config, server: ServerAlgorithm, clients: list[ClientInfo], run_dir: Path,
                 resume: Checkpoint | None = None, records: list[dict] | None = None) -> None:
        self.config, self.server, self.clients, self.run_dir = config, server, clients, run_dir
        self.tasks = {c.client_id: c.task for c in clients}
        self.states: dict[str, ClientState] = {c.client_id: ClientState() for c in clients}
        self.records: list[dict] = list(records or [])
        self.resume = resume
        self.progress: Progress | None = None

    def run(self) -> RunResult:
        """Set up (or restore a checkpoint), evaluate round 0, then fit/aggregate/evaluate every round."""
        fed = self.config.federation
        ids = [c.client_id for c in self.clients]
        self.server.setup(self.clients, fed.rounds)
        for warning in self.server.schedule_problems(fed.rounds):
            log.warning("%s: %s", self.config.algorithm.name, warning)
        self.ledger = PrivacyLedger(self.config, len(ids), self.server)
        first = 1
        if self.resume is not None:
            if self.server.noise is not None:  # a server rebuilding its noised sums draws that round's noise
                self.server.noise.start_round(self.resume.round)
            restore_server(self.server, self.resume)
            self.ledger.restore(self.records)
            # the records up to the checkpoint, without what a stopped run recorded after it
            save_text(self.run_dir / "metrics.jsonl", "".join(map(jsonl_line, self.records)))
            self.states.update(self.resume.client_states)
            first = self.resume.round + 1
        if first <= fed.rounds:
            self.ledger.check_next(first)  # a budget spent before this command did anything is an error
        progress = self.progress = _progress(self.config.engine.progress)
        self.tracker = open_tracker(self.config, self.run_dir)
        try:
            self._rounds(first, ids, progress)
        finally:
            self.tracker.close()
        return RunResult(self.run_dir, self.config.algorithm.name, self.records, self.states, self.server.state_dict())

    def _rounds(self, first: int, ids: list[str], progress: Progress | None) -> None:
        fed = self.config.federation
        with progress or nullcontext():
            bar = progress.add_task("rounds", total=fed.rounds, completed=first - 1) if progress else None
            self.client_bar = progress.add_task("clients", total=len(ids)) if progress else None
            if fed.eval_at_start and first == 1:
                self._record(0, {"round": 0, **self.evaluate(0, ids)})
            for rnd in range(first, fed.rounds + 1):
                try:
                    self.ledger.check_next(rnd)
                except PrivacyBudgetSpent as exc:
                    log.warning("%s", exc)
                    self._finish_early(rnd - 1, ids)
                    break
                start = time.perf_counter()
                record = {"round": rnd, **self._fit_round(rnd, sample_clients(ids, fed.clients_per_round, self.config.seed, rnd))}
                if rnd % fed.eval_every == 0 or rnd == fed.rounds:
                    record.update(self.evaluate(rnd, ids))
                record["seconds"] = time.perf_counter() - start
                peak = peak_cuda_memory()
                if peak is not None:
                    record["peak_device_memory"] = peak
                privacy = self.ledger.after_round(record["comm"]["bytes_up"] > 0, self.server.noise is not None
                                                  and self.server.noise.released_individually)
                if privacy:
                    record["privacy"] = privacy
                self._record(rnd, record)
                every = self.config.engine.checkpoint_every
                if rnd == fed.rounds or (every and rnd % every == 0):  # the last one holds the final adapters
                    save_checkpoint(self.run_dir, Checkpoint(rnd, self.server.state_dict(), self.states))
                if progress:
                    progress.update(bar, advance=1, description=_describe(record))

    def _finish_early(self, rnd: int, ids: list[str]) -> None:
        """End a run stopped after round `rnd` as its last round ends: evaluated and checkpointed."""
        last = self.records[-1]
        if "eval" not in last:
            last.update(self.evaluate(rnd, ids))
            save_text(self.run_dir / "metrics.jsonl", "".join(map(jsonl_line, self.records)))
        save_checkpoint(self.run_dir, Checkpoint(rnd, self.server.state_dict(), self.states))

    def _fit_round(self, rnd: int, sampled: list[str]) -> dict:
        payloads = self.server.configure(rnd, sampled)
        payloads = {cid: payloads.get(cid, Payload()) for cid in sampled}
        replies, failures = self.fit_clients(rnd, payloads)
        any_rank = METHODS[self.config.algorithm.name].heterogeneous_ranks
        for cid in list(replies):
            problem = (reply_problem(replies[cid], payloads[cid], self.server.spec,
                                     self.config.federation.max_update_norm, any_rank)
                       or self.server.reply_problem(rnd, cid, replies[cid]))
            if problem:  # rejected: treated as a missing reply, never aggregated
                failures[cid] = f"update rejected: {problem}"
                del replies[cid]
        for cid, reason in failures.items():
            log.warning("round %d: client %s failed: %s", rnd, cid, reason)
        fit = {cid: {**r.metrics, "bytes_down": payloads[cid].num_bytes, "bytes_up": r.num_bytes}
               for cid, r in replies.items()}
        if len(replies) < self.config.federation.min_clients:
            raise ClientFailure(f"round {rnd}: only {len(replies)} of {len(sampled)} clients replied, fewer than "
                                f"federation.min_clients={self.config.federation.min_clients}; failures: {failures}")
        fed = self.config.federation
        if self.ledger.active and fed.update_clip == "adaptive":
            # an adaptive bound follows the round's median norm, so one client's data would move how far the
            # others are clipped: more than clip_norm of sensitivity. DP's own clip already bounds every upload.
            fed = fed.model_copy(update={"update_clip": None})
        replies, clipped = clip_updates(self.server, payloads, replies, fed)
        for cid, factors in clipped.items():
            log.warning("round %d: client %s's update clipped (%s)", rnd, cid,
                        ", ".join(f"{name} x{f:.3g}" for name, f in factors.items()))
        if self.server.noise is not None:
            self.server.noise.start_round(rnd)
        self.server.aggregate(rnd, replies)
        record = {"sampled": sampled, "fit": fit, "failures": failures,
                  "comm": {"bytes_up": sum(f["bytes_up"] for f in fit.values()),
                           "bytes_down": sum(f["bytes_down"] for f in fit.values())},
                  "server": self.server.diagnostics()}
        return {**record, "clipped": clipped} if clipped else record

    def evaluate(self, rnd: int, ids: list[str]) -> dict:
        """Every client of `ids` on its own test split with what the server sends at `rnd`:
        {"eval": metrics per client, "summary": their means, "diagnostics" per client when the method has any}."""
        payloads = self.server.configure_evaluate(rnd, ids)
        evaluations, failures = self.evaluate_clients(rnd, {cid: payloads.get(cid, Payload()) for cid in ids})
        for cid in list(evaluations):  # a diverged (NaN) or out-of-range evaluation never reaches the summary
            problem = evaluation_problem(evaluations[cid])
            if problem:
                failures[cid] = f"evaluation rejected: {problem}"
                del evaluations[cid]
        for cid, reason in failures.items():
            log.warning("round %d: client %s failed to evaluate: %s", rnd, cid, reason)
        if not evaluations:
            raise ClientFailure(f"round {rnd}: no client could be evaluated: {failures}")
        per_client = {cid: e.metrics for cid, e in evaluations.items()}
        out = {"eval": per_client, "summary": summarize(per_client, self.tasks)}
        diagnostics = {cid: e.diagnostics for cid, e in evaluations.items() if e.diagnostics}
        if diagnostics:
            out["diagnostics"] = diagnostics
        return {**out, "eval_failures": failures} if failures else out

    @abstractmethod
    def fit_clients(self, rnd: int, payloads: dict[str, Payload]) -> tuple[dict[str, Reply], dict[str, str]]:
        """Run one local round on each client of `payloads`: (replies, failure reason per failed client).

        A client's new state must be kept only when its fit succeeded."""

    @abstractmethod
    def evaluate_clients(self, rnd: int, payloads: dict[str, Payload]) -> tuple[dict[str, Evaluation], dict[str, str]]:
        """Each client's evaluation on its own test split, and the failure reason of each client that could not."""

    def show(self, what: str, done: int, total: int) -> None:
        """Update the clients progress bar (if progress is shown) with a description and a count."""
        if self.progress:
            self.progress.update(self.client_bar, description=what, completed=done, total=total)

    def _record(self, rnd: int, record: dict) -> None:
        self.records.append(record)
        append_jsonl(self.run_dir / "metrics.jsonl", record)
        self.tracker.log_record(record)
        log.info("%s", _describe(record))


def _describe(record: dict) -> str:
    mean = record.get("summary", {}).get("mean", {})
    shown = ", ".join(f"{k}={mean[k]:.3f}" for k in ("accuracy", "rouge1", "loss") if k in mean)
    if "privacy" in record:
        eps = record["privacy"]["epsilon"]
        shown += f"{', ' if shown else ''}epsilon={'inf' if eps is None else f'{eps:.3g}'}"
    return f"round {record['round']}" + (f": {shown}" if shown else "")


def _progress(enabled: bool) -> Progress | None:
    if not enabled:
        return None
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
