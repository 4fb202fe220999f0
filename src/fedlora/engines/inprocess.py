"""The in-process engine: every client runs sequentially on one shared base model, deterministically."""

from __future__ import annotations

import logging
from pathlib import Path

from ..algorithms import ClientInfo, ClientState, Payload, Reply, ServerAlgorithm
from ..core.config import Config
from ..core.io import json_text, save_text
from .checkpoint import Checkpoint, check_split
from .loop import RoundLoop
from .results import RunResult
from .runtime import ClientRuntime, Evaluation, auto_client_batch
from .session import build_session

log = logging.getLogger("fedlora")


class InProcessEngine(RoundLoop):
    """Client states live in a dict; the shared model is swapped from client to client by the runtime."""

    def __init__(self, config: Config, server: ServerAlgorithm, runtime: ClientRuntime, clients: list[ClientInfo],
                 run_dir: Path, resume: Checkpoint | None = None, records: list[dict] | None = None) -> None:
        super().__init__(config, server, clients, run_dir, resume, records)
        self.runtime = runtime
        self._said_sequential = False

    def fit_clients(self, rnd: int, payloads: dict[str, Payload]) -> tuple[dict[str, Reply], dict[str, str]]:
        replies: dict[str, Reply] = {}
        failures: dict[str, str] = {}
        ids = list(payloads)
        size = self._client_batch(len(ids))
        for start in range(0, len(ids), size):
            group = ids[start : start + size]
            self.show(f"round {rnd}: training {', '.join(group)}", start, len(ids))
            if size == 1:
                outcomes = [self._fit_alone(group[0], rnd, payloads[group[0]])]
            else:
                outcomes = self.runtime.fit_together([(cid, rnd, payloads[cid], self.states[cid]) for cid in group])
            for cid, outcome in zip(group, outcomes):
                if isinstance(outcome, Exception):  # a failing client is recorded and left out, never fatal on its own
                    failures[cid] = f"{type(outcome).__name__}: {outcome}"
                else:
                    replies[cid], self.states[cid] = outcome
        return replies, failures

    def _fit_alone(self, cid: str, rnd: int, payload: Payload) -> tuple[Reply, ClientState] | Exception:
        try:
            return self.runtime.fit(cid, rnd, payload, self.states[cid])
        except Exception as exc:
            return exc

    def _client_batch(self, n_clients: int) -> int:
        """How many of a round's clients train together (`engine.client_batch`; 1 when the run cannot, said once)."""
        wanted = self.config.engine.client_batch
        if wanted == 1 or n_clients == 1:
            return 1
        problem = self.runtime.batching_problem()
        if problem:
            if not self._said_sequential:
                log.info("engine.client_batch=%s: clients train one after another: %s", wanted, problem)
                self._said_sequential = True
            return 1
        return min(n_clients, auto_client_batch(self.runtime) if wanted == "auto" else wanted)

    def evaluate_clients(self, rnd: int, payloads: dict[str, Payload]) -> tuple[dict[str, Evaluation], dict[str, str]]:
        metrics, failures = {}, {}
        for i, (cid, payload) in enumerate(payloads.items()):
            self.show(f"round {rnd}: evaluating {cid}", i, len(payloads))
            try:
                metrics[cid] = self.runtime.evaluate(cid, rnd, payload, self.states[cid])
            except Exception as exc:  # recorded in the round's eval_failures, like a failed fit
                failures[cid] = f"{type(exc).__name__}: {exc}"
        return metrics, failures


def run_inprocess(cfg: Config, run_dir: Path, resume: Checkpoint | None = None,
                  records: list[dict] | None = None) -> RunResult:
    """Run (or, from a checkpoint and the records before it, continue) a config in this process."""
    s = build_session(cfg)
    split = json_text([c.to_json() for c in s.clients])
    if resume is not None:  # the data on disk may have changed under a stopped run
        check_split(run_dir, resume, split)
    save_text(run_dir / "clients.json", split)
    with s.runtime:  # stops a client's data-parallel workers, also when the run fails
        return InProcessEngine(cfg, s.server, s.runtime, s.infos, run_dir, resume, records).run()
