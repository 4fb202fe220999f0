"""The round loop every engine shares, read top to bottom in `federate` (as Flower's `Strategy.start` reads):
configure -> send to the clients -> accept (validate, clip) -> aggregate -> evaluate -> record -> checkpoint.

An engine is a `Transport`, passed in: it carries a round's payloads to the clients and their replies back, in this
process (inprocess.py) or as Flower messages (fedlora.flower). Progress, tracking and the privacy budget are
observers of the rounds (observers.py), not steps of them.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Protocol

from ..algorithms import ClientInfo, ClientState, Payload, Reply, ServerAlgorithm
from ..core.config import Config
from ..core.devices import peak_cuda_memory
from ..core.errors import ClientFailure, ConfigError
from ..core.io import append_jsonl, jsonl_line, save_text
from .checkpoint import Checkpoint, restore_server, save_checkpoint
from .clipping import clip_updates
from .observers import Observer, Observers, ProgressBar, StopRun, describe
from .privacy import PrivacyLedger
from .results import RunResult, summarize
from .runtime import Evaluation
from .sampling import sample_clients
from .tracking import open_tracker
from .validation import evaluation_problem, reply_problem

log = logging.getLogger("fedlora")


class Transport(Protocol):
    """How a round's payloads reach its clients and their answers come back. A failed client is a reason in the
    failures, never an exception; a client's new state is kept only when its fit succeeded."""

    states: dict[str, ClientState]  # what a checkpoint keeps of each client (empty where nodes keep their own)

    def fit(self, rnd: int, payloads: dict[str, Payload], show: Observer) -> tuple[dict[str, Reply], dict[str, str]]:
        """One local round on each client of `payloads`: (replies, failure reason per failed client)."""

    def evaluate(self, rnd: int, payloads: dict[str, Payload], show: Observer
                 ) -> tuple[dict[str, Evaluation], dict[str, str]]:
        """Each client's evaluation on its own test split, and the failure reason of each client that could not."""


def federate(config: Config, server: ServerAlgorithm, transport: Transport, clients: list[ClientInfo],
             run_dir: Path, resume: Checkpoint | None = None, records: list[dict] | None = None) -> RunResult:
    """Run (or continue from `resume` and the records before it) every round of a config over `transport`."""
    fed = config.federation
    ids = [c.client_id for c in clients]
    ledger = PrivacyLedger(config, len(ids), server.dp_amplified)
    server.noise = ledger.noise  # under privacy.dp = client_clipping every sum the server forms is noised
    server.secure = fed.secure_aggregation  # the server sees only each round's means (aggregate_secure)
    server.uniform_weights = ledger.noise is not None or (config.privacy.dp == "local" and server.secure)
    wraps = server.secure and fed.secagg.wrap_problem(fed.clients_per_round or len(ids))
    if wraps:  # with every client every round, known only now
        raise ConfigError(wraps)
    if server.secure:
        log.info("secure aggregation (SecAgg+): the server learns only each round's weighted mean, so it cannot "
                 "check or clip single updates (federation.update_clip and max_state_norm do not apply)")
    server.setup(clients, fed.rounds)
    for warning in server.schedule_problems(fed.rounds):
        log.warning("%s: %s", config.algorithm.name, warning)
    records = list(records or [])
    first = _restore(server, transport, ledger, resume, records, run_dir) if resume else 1
    watch = Observers(ledger, open_tracker(config, run_dir), ProgressBar() if config.engine.progress else None)
    with watch:
        watch.run_started(first, fed.rounds)
        if fed.eval_at_start and first == 1:
            _record(run_dir, records, {"round": 0, **evaluate(0, ids, server, transport, clients, watch)}, watch)
        for rnd in range(first, fed.rounds + 1):
            try:
                watch.before_round(rnd)
            except StopRun as exc:  # the privacy budget: the last round ends the run as if it were planned so
                if rnd == first:  # spent before this command trained anything: an error (round 0 is written)
                    raise
                log.warning("%s", exc)
                if records and "eval" not in records[-1]:
                    records[-1].update(evaluate(rnd - 1, ids, server, transport, clients, watch))
                    save_text(run_dir / "metrics.jsonl", "".join(map(jsonl_line, records)))
                save_checkpoint(run_dir, Checkpoint(rnd - 1, server.state_dict(), transport.states))
                break
            start, cpu_start = time.perf_counter(), time.process_time()
            sampled = sample_clients(ids, fed.clients_per_round, config.seed, rnd)
            payloads = server.configure(rnd, sampled)
            payloads = {cid: payloads.get(cid, Payload()) for cid in sampled}
            if server.noise is not None:
                server.noise.start_round(rnd)
            if server.secure and any(p.expects for p in payloads.values()):
                from .secagg import fit_secure  # Flower's SecAgg+ code, imported only when asked for
                # the replies carry metrics only; the server folds in the round's means, or nothing (`unaggregated`)
                replies, failures, unaggregated = fit_secure(rnd, config, server, transport, payloads, watch)
                clipped: dict[str, dict[str, float]] = {}
            else:
                replies, failures = transport.fit(rnd, payloads, watch)
                replies, clipped = accept(rnd, config, server, payloads, replies, failures, dp=ledger.active)
                unaggregated = None
                if len(replies) < fed.min_clients:
                    raise ClientFailure(f"round {rnd}: only {len(replies)} of {len(sampled)} clients replied, fewer "
                                        f"than federation.min_clients={fed.min_clients}; failures: {failures}")
                server.aggregate(rnd, replies)
            fit = {cid: {**r.metrics, "bytes_down": payloads[cid].num_bytes + r.protocol_bytes[1],
                         "bytes_up": r.num_bytes + r.protocol_bytes[0]} for cid, r in replies.items()}
            if unaggregated:
                log.warning("round %d: nothing aggregated: %s", rnd, unaggregated)
            record = {"round": rnd, "sampled": sampled, "fit": fit, "failures": failures,
                      **({"unaggregated": unaggregated} if unaggregated else {}),
                      "comm": {"bytes_up": sum(f["bytes_up"] for f in fit.values()),
                               "bytes_down": sum(f["bytes_down"] for f in fit.values())},
                      "server": server.diagnostics(), **({"clipped": clipped} if clipped else {}),
                      "fit_seconds": time.perf_counter() - start}
            if rnd % fed.eval_every == 0 or rnd == fed.rounds:
                record.update(evaluate(rnd, ids, server, transport, clients, watch))
            record["seconds"] = time.perf_counter() - start
            # this process's CPU time: steady where a shared machine's wall time is not (under Flower, the clients'
            # own processes are not in it)
            record["cpu_seconds"] = time.process_time() - cpu_start
            peak = peak_cuda_memory()
            if peak is not None:
                record["peak_device_memory"] = peak
            _record(run_dir, records, record, watch)
            every = config.engine.checkpoint_every
            if rnd == fed.rounds or (every and rnd % every == 0):  # the last one holds the final adapters
                save_checkpoint(run_dir, Checkpoint(rnd, server.state_dict(), transport.states))
    return RunResult(run_dir, config.algorithm.name, records, transport.states, server.state_dict())


def accept(rnd: int, config: Config, server: ServerAlgorithm, payloads: dict[str, Payload], replies: dict[str, Reply],
           failures: dict[str, str], dp: bool = False) -> tuple[dict[str, Reply], dict[str, dict[str, float]]]:
    """The replies the server may aggregate: each validated (a rejected one joins `failures`, never aggregated), then
    updates above `federation.update_clip`'s bound scaled down to it ({client: {state: factor}} of those clipped)."""
    fed = config.federation
    replies = dict(replies)
    for cid in list(replies):
        weight = server.weight(cid)
        problem = (reply_problem(replies[cid], payloads[cid], server.spec, fed.max_state_norm,
                                 server.heterogeneous_ranks)
                   or (None if math.isfinite(weight) and weight > 0 else f"its aggregation weight is {weight!r}")
                   or server.reply_problem(rnd, cid, replies[cid]))
        if problem:
            failures[cid] = f"update rejected: {problem}"
            del replies[cid]
    for cid, reason in failures.items():
        log.warning("round %d: client %s failed: %s", rnd, cid, reason)
    if dp and fed.update_clip == "adaptive":
        # an adaptive bound follows the round's median norm, so one client's data would move how far the others
        # are clipped: more than clip_norm of sensitivity. DP's own clip already bounds every upload.
        fed = fed.model_copy(update={"update_clip": None})
    replies, clipped = clip_updates(server, payloads, replies, fed)
    for cid, factors in clipped.items():
        log.warning("round %d: client %s's update clipped (%s)", rnd, cid,
                    ", ".join(f"{name} x{f:.3g}" for name, f in factors.items()))
    return replies, clipped


def evaluate(rnd: int, ids: list[str], server: ServerAlgorithm, transport: Transport, clients: list[ClientInfo],
             show: Observer = Observer()) -> dict:
    """Every client of `ids` on its own test split with what the server sends at `rnd`:
    {"eval": metrics per client, "summary": their means, "diagnostics" per client when the method has any}."""
    payloads = server.configure_evaluate(rnd, ids)
    evaluations, failures = transport.evaluate(rnd, {cid: payloads.get(cid, Payload()) for cid in ids}, show)
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
    out = {"eval": per_client, "summary": summarize(per_client, {c.client_id: c.task for c in clients})}
    diagnostics = {cid: e.diagnostics for cid, e in evaluations.items() if e.diagnostics}
    if diagnostics:
        out["diagnostics"] = diagnostics
    return {**out, "eval_failures": failures} if failures else out


def _restore(server: ServerAlgorithm, transport: Transport, ledger: PrivacyLedger, resume: Checkpoint,
             records: list[dict], run_dir: Path) -> int:
    """Put the server, the clients' states and the budget where the checkpoint left them; the first round to run."""
    if server.noise is not None:  # a server rebuilding its noised sums draws that round's noise
        server.noise.start_round(resume.round)
    restore_server(server, resume)
    ledger.restore(records)
    # the records up to the checkpoint, without what a stopped run recorded after it
    save_text(run_dir / "metrics.jsonl", "".join(map(jsonl_line, records)))
    transport.states.update(resume.client_states)
    return resume.round + 1


def _record(run_dir: Path, records: list[dict], record: dict, watch: Observer) -> None:
    watch.after_round(record)  # the ledger adds its epsilon before the record is written and tracked
    records.append(record)
    append_jsonl(run_dir / "metrics.jsonl", record)
    log.info("%s", describe(record))
